"""Evaluate a trained or imported run: held-out loss, bits per byte, zero- and few-shot tasks, samples.

The command lives in gptjax/cli/eval.py (installed as `gptjax-eval`); `python eval.py --help` shows its usage."""

import sys

from gptjax.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
