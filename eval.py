"""Evaluate a trained or imported run: held-out loss, bits per byte, zero- and few-shot tasks, samples.

The command lives in gptjax/cli/eval.py (installed as `gptjax-eval`); `python eval.py --help` shows its usage."""

import sys

from gptjax.hostmem import reexec_with_huge_pages


def main(*args, **kwargs):
    from gptjax.cli.eval import main as command  # imports jax: after the restart below

    return command(*args, **kwargs)


if __name__ == "__main__":
    reexec_with_huge_pages()  # once, before jax is imported: huge pages for XLA's per-step host memory
    sys.exit(main())
