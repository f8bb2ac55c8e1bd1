"""Scaling laws: train a sweep (configs/sweeps/NAME.json), fit L(N), L(C), L(N, D), plot, predict a bigger run.

  python scaling.py sweep cpu-ladder --dry-run          # the planned points, N, D, C, FLOPs, estimated time
  python scaling.py sweep cpu-ladder                    # train every point (resumable) -> runs/sweeps/cpu-ladder
  python scaling.py predict cpu-ladder                  # fit on <= 1/10 of its compute, predict, then train it
  python scaling.py fit cpu-ladder                      # fits.json with bootstrap intervals
  python scaling.py plot cpu-ladder --out docs/scaling  # loss_vs_compute.png, isoflop.png, n_opt.png, capability.png, lr.png
  python scaling.py report cpu-ladder --out docs/scaling/tables.md   # the tables: lr sweep, minima, fits, prediction
  python scaling.py list                                # the sweep configs

key.sub=value overrides after the sweep name apply to every point (e.g. data.source=jsonl data.paths=c.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, overrides=True):
        sp.add_argument("sweep", help="sweep config: configs/sweeps/NAME.json or a JSON file path")
        sp.add_argument("--dir", default=None, help="sweep directory (default runs/sweeps/NAME)")
        if overrides:
            sp.add_argument("overrides", nargs="*", metavar="key.sub=value", help="applied to every point")

    s = sub.add_parser("sweep", help="train every ladder and isoFLOP point not yet finished")
    common(s)
    s.add_argument("--dry-run", action="store_true", help="print the planned points and train nothing")
    s.add_argument("--tflops", type=float, default=0.038,
                   help="effective TFLOP/s on every core for --dry-run's time estimate (2-core CPU: 0.038 for the "
                        "cpu-ladder's small models, measured 2026-12-04: docs/scaling.md; more for wider ones)")
    s.add_argument("--overhead", type=float, default=8.0,
                   help="seconds per point for --dry-run's estimate: start-up, compilation, evaluation, checkpoint, "
                        "capability scoring (8.3 measured on the cpu-ladder)")
    s.add_argument("--jobs", type=int, default=1,
                   help="train this many points at a time, each in a child process pinned to a core of its own "
                        "(CPU: 2 on the 2-core machine, 1.3x the throughput; keep 1 on a GPU)")
    f = sub.add_parser("fit", help="fit the scaling laws to results.jsonl -> fits.json")
    common(f, overrides=False)
    f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (0: none)")
    f.add_argument("--n-count", choices=("non_embedding", "total"), default=None,
                   help="which parameter count N is (default: the sweep's n_count)")
    f.add_argument("--json", default=None, help="also write the fits here")
    pl = sub.add_parser("plot", help="PNG plots from results.jsonl and fits.json")
    common(pl, overrides=False)
    pl.add_argument("--out", default=None, help="folder for the PNGs (default SWEEP_DIR/plots)")
    pr = sub.add_parser("predict", help="predict the prediction point's loss from cheaper points, then train it")
    common(pr)
    pr.add_argument("--no-train", action="store_true", help="only predict (written to SWEEP_DIR/prediction.json)")
    pr.add_argument("--min-ratio", type=float, default=10.0, help="compute of the point / largest fitted point")
    pr.add_argument("--bootstrap", type=int, default=200)
    rp = sub.add_parser("report", help="markdown tables: lr sweep, isoFLOP minima, fits, seeds, prediction, points")
    common(rp, overrides=False)
    rp.add_argument("--out", default=None, help="write the tables here (default: print them)")
    sub.add_parser("list", help="list the sweep configs")
    args, extra = p.parse_known_args(argv)
    # key=value overrides may come after options too (sweep cpu-ladder --dry-run model.n_layer=3)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")

    from gptjax import scaling
    from gptjax.errors import run_command

    if args.cmd == "list":
        print("\n".join(scaling.list_sweeps()))
        return 0
    return run_command(_main, args)


def _main(args) -> int:
    from gptjax import scaling

    sw = scaling.load_sweep(args.sweep)
    sweep_dir = Path(args.dir or Path("runs") / "sweeps" / sw.name)
    if args.cmd == "sweep":
        if args.dry_run:
            points, notes = scaling.plan_points(sw, sweep_dir, args.overrides)
            print(scaling.describe(points, sw.n_count, args.tflops, args.overhead, args.jobs))
            print("\n".join(f"note: {n}" for n in notes))
            return 0
        if args.jobs < 1 or args.jobs > len(os.sched_getaffinity(0)):
            raise scaling.SweepError(f"--jobs {args.jobs}: give 1 to {len(os.sched_getaffinity(0))} "
                                     f"(the cores this process may use)")
        scaling.sweep(sw, sweep_dir, args.overrides, jobs=args.jobs)
    elif args.cmd == "fit":
        recs = scaling.load_results(sweep_dir, args.sweep)
        count = args.n_count or sw.n_count
        fits = scaling.fit_all(recs, bootstrap=args.bootstrap, n_count=count)
        # the other parameter count too (Kaplan counts non-embedding parameters, Chinchilla all of them)
        other = "total" if count == "non_embedding" else "non_embedding"
        fits["alt"] = scaling.fit_all(recs, bootstrap=args.bootstrap, n_count=other)
        text = json.dumps(fits, indent=2) + "\n"
        (sweep_dir / "fits.json").write_text(text)
        if args.json:
            Path(args.json).write_text(text)
        print(f"N = {count.replace('_', '-')} parameters:")
        print(scaling.summarize_fits(fits))
        print(f"\nN = {other.replace('_', '-')} parameters:")
        print(scaling.summarize_fits(fits["alt"]))
        print(f"-> {sweep_dir / 'fits.json'}")
    elif args.cmd == "plot":
        for path in scaling.plot(sweep_dir, args.out):
            print(path)
    elif args.cmd == "report":
        from gptjax.scaling.report import report

        text = report(sweep_dir)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
            print(f"-> {args.out}")
        else:
            print(text, end="")
    elif args.cmd == "predict":
        scaling.predict(sw, sweep_dir, args.overrides, train=not args.no_train, min_ratio=args.min_ratio,
                        bootstrap=args.bootstrap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
