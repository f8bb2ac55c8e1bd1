"""Compare two runs' metrics.jsonl record by record: the training losses, gradient norms and learning rates, and
every held-out evaluation, ignoring what depends on the machine (tokens/s, MFU, time). Prints the first
difference, or that they are identical; exits 1 if they differ. Used to prove a refactor kept behaviour:

  python bench/compare_metrics.py runs/before runs/after
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VOLATILE = {"tokens_per_s", "mfu", "time"}


def records(run: Path) -> list[dict]:
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            out.append({k: v for k, v in json.loads(line).items() if k not in VOLATILE})
    return out


def main(a: str, b: str) -> int:
    ra, rb = records(Path(a)), records(Path(b))
    train = sum("loss" in r for r in ra)
    for i, (x, y) in enumerate(zip(ra, rb)):
        if x != y:
            print(f"record {i} differs:\n  {a}: {x}\n  {b}: {y}")
            return 1
    if len(ra) != len(rb):
        print(f"{a} has {len(ra)} records, {b} {len(rb)}")
        return 1
    sa, sb = (json.loads((Path(r) / "summary.json").read_text()) for r in (a, b))
    same = all(sa[k] == sb[k] for k in ("step", "val_loss", "val_bits_per_byte", "sample"))
    last = [r for r in ra if "loss" in r][-1]
    print(f"{len(ra)} records identical ({train} training steps, final train loss {last['loss']}); "
          f"summary val_loss {sa['val_loss']} vs {sb['val_loss']}, bits/byte {sa['val_bits_per_byte']} vs "
          f"{sb['val_bits_per_byte']}, sample {'identical' if sa['sample'] == sb['sample'] else 'differs'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
