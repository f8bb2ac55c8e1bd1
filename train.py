"""Train a GPT. With no arguments: the tiny preset on the Python standard library, on this machine.

The command lives in gptjax/cli/train.py (installed as `gptjax-train`); `python train.py --help` shows its usage."""

import sys

from gptjax.hostmem import reexec_with_huge_pages


def main(*args, **kwargs):
    from gptjax.cli.train import main as command  # imports jax: after the restart below

    return command(*args, **kwargs)


if __name__ == "__main__":
    reexec_with_huge_pages()  # once, before jax is imported: huge pages for XLA's per-step host memory
    sys.exit(main())
