"""Plot training curves from runs' metrics.jsonl (loss, held-out metrics, learning rate, tokens/s).

The command lives in gptjax/cli/plot.py (installed as `gptjax-plot`); `python plot.py --help` shows its usage."""

import sys

from gptjax.cli.plot import main

if __name__ == "__main__":
    sys.exit(main())
