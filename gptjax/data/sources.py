"""Corpus sources and the one held-out split.

Each source yields (name, text) documents in a fixed order. A document is held out for validation by a
hash of its content (`is_validation`), so the split is stable across runs and machines; `split` is the only
place that applies it (token preparation, the built-in tasks and eval.py all call it).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from pathlib import Path
from typing import Any, Iterator, Sequence

from gptjax.config import DataConfig
from gptjax.errors import DataError

STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}



def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[Path]:
    """The running interpreter's standard library source, without its test suites."""
    root = stdlib_root()
    return [p for p in sorted(root.rglob("*.py")) if not (STDLIB_SKIP & set(p.relative_to(root).parts[:-1]))]


def _expand(paths: tuple[str, ...]) -> list[Path]:
    files: list[Path] = []
    for pattern in paths:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"data.paths entry '{pattern}' matches no file; check the path or quote the glob")
        files += [Path(m) for m in matches]
    return files


def iter_documents(cfg: DataConfig) -> Iterator[tuple[str, str]]:
    if cfg.source == "stdlib":
        root = stdlib_root()
        for p in stdlib_files():
            yield str(p.relative_to(root)), p.read_text(encoding="utf-8", errors="replace")
    elif cfg.source == "text":
        for p in _expand(cfg.paths):
            yield str(p), p.read_text(encoding="utf-8", errors="replace")
    elif cfg.source == "jsonl":
        for p in _expand(cfg.paths):
            for i, rec in iter_jsonl(p):
                if not isinstance(rec, dict) or not isinstance(rec.get(cfg.text_field), str):
                    raise DataError(f"{p}:{i} has no string field '{cfg.text_field}'; "
                                    f"set data.text_field to the field that holds the text")
                yield f"{p}:{i}", rec[cfg.text_field]
    else:
        raise DataError(f"unknown data.source '{cfg.source}'")


def iter_jsonl(path: Path, error: type[ValueError] = DataError) -> Iterator[tuple[int, Any]]:
    """(line number, record) for every non-blank line of a JSONL file; a bad line raises `error` naming it."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{i} is not valid JSON ({e.msg}); fix or remove that line") from None


def is_validation(text: str, fraction: float) -> bool:
    """Held-out membership from a hash of the document's content: stable across runs and machines."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction



def split(texts: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """(training, held-out) documents, in corpus order. A corpus too small to hold anything out by hash
    gives up its last document instead, so there is always something to validate on."""
    train = [t for t in texts if not is_validation(t, fraction)]
    val = [t for t in texts if is_validation(t, fraction)]
    if not val:
        val, train = train[-1:], train[:-1]
    return train, val


def split_documents(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(training, held-out) documents of the corpus `cfg` names, split as the token cache splits them."""
    return split([text for _, text in iter_documents(cfg)], cfg.val_fraction)
