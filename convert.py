"""Convert between Hugging Face GPT-2 checkpoints and gptjax run directories.

The command lives in gptjax/cli/convert.py (installed as `gptjax-convert`); `python convert.py --help` shows its usage."""

import sys

from gptjax.hostmem import reexec_with_huge_pages


def main(*args, **kwargs):
    from gptjax.cli.convert import main as command  # imports jax: after the restart below

    return command(*args, **kwargs)


if __name__ == "__main__":
    reexec_with_huge_pages()  # once, before jax is imported: huge pages for XLA's per-step host memory
    sys.exit(main())
