"""Scaling laws: train a sweep (configs/sweeps/NAME.json), fit L(N), L(C), L(N, D), plot, predict a bigger run.

The command lives in gptjax/cli/scaling.py (installed as `gptjax-scaling`); `python scaling.py --help` shows its usage."""

import sys

from gptjax.hostmem import reexec_with_huge_pages


def main(*args, **kwargs):
    from gptjax.cli.scaling import main as command  # imports jax: after the restart below

    return command(*args, **kwargs)


if __name__ == "__main__":
    reexec_with_huge_pages()  # once, before jax is imported: huge pages for XLA's per-step host memory
    sys.exit(main())
