"""Plot training curves from runs' metrics.jsonl: training and held-out loss, learning rate and tokens/s against
the step, and every other held-out metric logged (bits per byte, a fine-tuning task's accuracy, ...); several runs
share one figure, one colour each.

  python plot.py runs/tiny                          # -> runs/tiny/plot.png
  python plot.py runs/a runs/b --out compare.png    # two runs on one figure (default ./plot.png)
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories holding a metrics.jsonl")
    p.add_argument("--out", default=None, help="the PNG to write (default RUN_DIR/plot.png for one run, "
                                               "plot.png for several)")
    args = p.parse_args(argv)
    from gptjax.errors import run_command

    return run_command(_main, args)


def _main(args) -> int:
    from gptjax.train.plot import plot_runs

    print(f"wrote {plot_runs(args.run_dirs, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
