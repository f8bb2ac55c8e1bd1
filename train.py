"""Train a GPT. With no arguments: the tiny preset on the Python standard library, on this machine.

The command lives in gptjax/cli/train.py (installed as `gptjax-train`); `python train.py --help` shows its usage."""

import sys

from gptjax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
