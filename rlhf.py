"""InstructGPT's post-training stages: `python rlhf.py sft|rank|reward|ppo ...` (SFT, rankings, reward model, PPO).

The command lives in gptjax/cli/rlhf.py (installed as `gptjax-rlhf`); `python rlhf.py --help` shows its usage."""

import sys

from gptjax.cli.rlhf import main

if __name__ == "__main__":
    sys.exit(main())
