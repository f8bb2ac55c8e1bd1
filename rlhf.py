"""InstructGPT's post-training stages: `python rlhf.py sft|rank|reward|ppo ...` (SFT, rankings, reward model, PPO).

The command lives in gptjax/cli/rlhf.py (installed as `gptjax-rlhf`); `python rlhf.py --help` shows its usage."""

import sys

from gptjax.hostmem import reexec_with_huge_pages


def main(*args, **kwargs):
    from gptjax.cli.rlhf import main as command  # imports jax: after the restart below

    return command(*args, **kwargs)


if __name__ == "__main__":
    reexec_with_huge_pages()  # once, before jax is imported: huge pages for XLA's per-step host memory
    sys.exit(main())
