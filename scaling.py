"""Scaling laws: train a sweep (configs/sweeps/NAME.json), fit L(N), L(C), L(N, D), plot, predict a bigger run.

The command lives in gptjax/cli/scaling.py (installed as `gptjax-scaling`); `python scaling.py --help` shows its usage."""

import sys

from gptjax.cli.scaling import main

if __name__ == "__main__":
    sys.exit(main())
