"""The console scripts (pyproject.toml's [project.scripts]): each restarts itself once with huge pages for host
memory (gptjax/hostmem.py) before the command's module, and jax with it, is imported, then runs its main()."""

from __future__ import annotations

import functools
import importlib

from gptjax.hostmem import reexec_with_huge_pages


def _run(command: str) -> int:
    reexec_with_huge_pages()
    return importlib.import_module(f"gptjax.cli.{command}").main()


train, finetune, rlhf, eval_, sample, convert, scaling = (
    functools.partial(_run, name) for name in ("train", "finetune", "rlhf", "eval", "sample", "convert", "scaling"))
