"""Sample from a trained or imported run with the KV cache.

The command lives in gptjax/cli/sample.py (installed as `gptjax-sample`); `python sample.py --help` shows its usage."""

import sys

from gptjax.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
