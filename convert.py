"""Convert between Hugging Face GPT-2 checkpoints and gptjax run directories.

The command lives in gptjax/cli/convert.py (installed as `gptjax-convert`); `python convert.py --help` shows its usage."""

import sys

from gptjax.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
