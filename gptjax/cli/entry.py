"""The console scripts (pyproject.toml's [project.scripts]): each restarts itself once with huge pages for host
memory (gptjax/hostmem.py) before the command's module, and jax with it, is imported, then runs its main()."""

from __future__ import annotations

import importlib

from gptjax.hostmem import reexec_with_huge_pages


def _run(command: str) -> int:
    reexec_with_huge_pages()
    return importlib.import_module(f"gptjax.cli.{command}").main()


def train() -> int:
    return _run("train")


def finetune() -> int:
    return _run("finetune")


def rlhf() -> int:
    return _run("rlhf")


def eval_() -> int:
    return _run("eval")


def sample() -> int:
    return _run("sample")


def convert() -> int:
    return _run("convert")


def scaling() -> int:
    return _run("scaling")
