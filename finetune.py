"""Fine-tune a pretrained run on a labelled task, GPT-1 style: a linear head on the extract token, L2 + λ·L1.

The command lives in gptjax/cli/finetune.py (installed as `gptjax-finetune`); `python finetune.py --help` shows its usage."""

import sys

from gptjax.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
