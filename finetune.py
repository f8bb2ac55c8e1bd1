"""Fine-tune a pretrained run on a labelled task, GPT-1 style: a linear head on the extract token, L2 + λ·L1.

The command lives in gptjax/cli/finetune.py (installed as `gptjax-finetune`); `python finetune.py --help` shows its usage."""

import sys

from gptjax.hostmem import reexec_with_huge_pages


def main(*args, **kwargs):
    from gptjax.cli.finetune import main as command  # imports jax: after the restart below

    return command(*args, **kwargs)


if __name__ == "__main__":
    reexec_with_huge_pages()  # once, before jax is imported: huge pages for XLA's per-step host memory
    sys.exit(main())
