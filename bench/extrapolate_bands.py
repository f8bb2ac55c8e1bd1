"""Power laws in compute through a few runs' held-out losses, by context position and by overlap with training,
extrapolated to larger runs: which part of the loss a ladder predicts, and which it misses.

    python bench/extrapolate_bands.py --icl runs/icl/all.json --overlap runs/icl/overlap.json \\
        --fit iso1.5e11-d16-L2=1.5e11 iso6e11-d24-L2=6e11 iso2.4e12-d48-L2=2.4e12 \\
        --predict c7.2e12-d64-L3=7.2e12 target-d64-L4=2.46e13

--icl is bench/icl_score.py's --json, --overlap bench/heldout_overlap.py's (optional). Each run is named by its
run directory's last component, with its training FLOPs. For every quantity, log L = a + b log C by least squares
through the --fit runs (the offset-free law, Kaplan's L(C_min) form), evaluated at the --predict runs' compute.
Prints a markdown table (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROWS = [("mean", "held-out loss, all tokens"), ("0", "position 0 (no context)"), ("1-7", "positions 1-7"),
        ("early", 'positions T/16..T/8 ("early")'), ("mid", "positions T/4..T/2"), ("late", 'last T/8 positions ("late")'),
        ("seen", "tokens in lines also in training"), ("unseen", "the other tokens")]


def named(pairs: list[str]) -> dict[str, float]:
    out = {}
    for p in pairs:
        name, sep, c = p.partition("=")
        if not sep:
            raise SystemExit(f"error: '{p}': give RUN=FLOPS, e.g. iso6e11-d24-L2=6e11")
        out[name] = float(c)
    return out


def table(last: dict[str, dict], fit: dict[str, float], predict: dict[str, float]) -> str:
    names = list(fit) + list(predict)
    head = ["quantity"] + [f"{n} ({c:.3g})" for n, c in {**fit, **predict}.items()] + ["slope"] \
        + [f"{n} extrapolated" for n in predict]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in ROWS:
        if not all(key in last[n] for n in names):
            continue
        slope, icpt = np.polyfit(np.log(list(fit.values())), np.log([last[n][key] for n in fit]), 1)
        cells = [f"{last[n][key]:.3f}" for n in names]
        ext = []
        for n, c in predict.items():
            p = float(np.exp(icpt + slope * np.log(c)))
            ext.append(f"{p:.3f} ({100 * (p / last[n][key] - 1):+.1f}%)")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {slope:.4f} | " + " | ".join(ext) + " |")
    lines.append("| ICL score (late - early) | " + " | ".join(f"{last[n]['icl_score']:.3f}" for n in names)
                 + " |" + " |" * (1 + len(predict)))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--icl", required=True, help="bench/icl_score.py --json output")
    ap.add_argument("--overlap", help="bench/heldout_overlap.py --json output")
    ap.add_argument("--fit", nargs="+", required=True, help="RUN=FLOPS: the runs the law is fitted on (two or more)")
    ap.add_argument("--predict", nargs="+", required=True, help="RUN=FLOPS: the runs it is extrapolated to")
    args = ap.parse_args(argv)
    fit, predict = named(args.fit), named(args.predict)
    if len(fit) < 2:
        raise SystemExit("error: --fit needs two or more runs")
    last: dict[str, dict] = {}
    for r in json.loads(Path(args.icl).read_text()):  # records in step order: the last one per run wins
        last[Path(r["run"]).name] = dict(r)
    if args.overlap:
        for r in json.loads(Path(args.overlap).read_text())["runs"]:
            last.setdefault(Path(r["run"]).name, {}).update(seen=r["seen"], unseen=r["unseen"])
    missing = [n for n in [*fit, *predict] if n not in last or "mean" not in last[n]]
    if missing:
        raise SystemExit(f"error: {', '.join(missing)} not in {args.icl}; names are run directories' last components")
    print(table(last, fit, predict))
    return 0


if __name__ == "__main__":
    sys.exit(main())
