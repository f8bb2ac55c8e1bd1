"""Corpus sources and the one held-out split.

Each source yields (name, text) documents in a fixed order. A document is held out for validation by a
hash of its content (`is_validation`), so the split is stable across runs and machines; `split` is the only
place that applies it (token preparation, the built-in tasks and eval.py all call it).

Files are read as UTF-8. A file is refused as binary (a DataError naming it) when its first 8000 bytes hold a
NUL byte (git's and grep's test: it catches executables, images, archives and UTF-16) or when more than 5% of
its bytes are not valid UTF-8 (random bytes, or text in an encoding far from ASCII: it would train on U+FFFD
soup). Below that (a stray byte, Latin-1 accents), invalid bytes are decoded as U+FFFD (Python's
errors="replace": one per maximal invalid sequence), counted in a `Utf8Report`, and reported by data
preparation in one line.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from gptjax.config import DataConfig
from gptjax.errors import DataError

STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
SNIFF_BYTES = 8000  # a NUL byte in the first this many bytes makes a file binary (git's FIRST_FEW_BYTES)
MAX_INVALID_FRACTION = 0.05  # more invalid UTF-8 than this and a file is not text we should train on


def decode_utf8(data: bytes) -> tuple[str, int]:
    """(text, how many bytes were not valid UTF-8): invalid sequences become U+FFFD."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", errors="replace")
    inserted = text.count("\ufffd") - data.count("\ufffd".encode())  # U+FFFD already in the file is valid
    return text, len(data) - (len(text.encode("utf-8")) - 3 * inserted)


def is_binary(head: bytes, invalid: int, size: int) -> bool:
    """The rule of the module docstring: a NUL in the first SNIFF_BYTES, or over 5% of the bytes invalid."""
    return b"\0" in head[:SNIFF_BYTES] or invalid > MAX_INVALID_FRACTION * size


@dataclass
class Utf8Report:
    """What reading a corpus found: files with some invalid UTF-8 (decoded with U+FFFD) and binary files
    (refused). Filled in by `iter_documents`; `line()` is what data preparation prints."""

    files: int = 0  # files read
    invalid_files: list[str] = field(default_factory=list)
    invalid_bytes: int = 0
    binary: list[str] = field(default_factory=list)

    def add(self, name: str, invalid: int, size: int, head: bytes) -> bool:
        """Count one file; False if it is binary (and so refused)."""
        self.files += 1
        if is_binary(head, invalid, size):
            self.binary.append(name)
            return False
        if invalid:
            self.invalid_files.append(name)
            self.invalid_bytes += invalid
        return True

    def as_dict(self) -> dict:
        return {"files": self.files, "invalid_files": len(self.invalid_files), "invalid_bytes": self.invalid_bytes,
                "examples": self.invalid_files[:5]}

    def line(self) -> str:
        """One line naming the files that held invalid UTF-8, or "" if none did."""
        n = len(self.invalid_files)
        if not n:
            return ""
        return (f"data: note: {n} of {self.files} file(s) are not valid UTF-8 ({self.invalid_bytes:,} byte(s) in all), "
                f"decoded with U+FFFD replacement: {_names(self.invalid_files)}")

    def raise_if_binary(self) -> None:
        if self.binary:
            raise DataError(f"data.paths matches {len(self.binary)} binary or non-UTF-8 file(s) (a NUL byte in the "
                            f"first {SNIFF_BYTES} bytes, or over {MAX_INVALID_FRACTION:.0%} of bytes not valid UTF-8): "
                            f"{_names(self.binary)}; exclude them from data.paths (or convert them to UTF-8 text)")


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def read_text(path: Path, report: Utf8Report, name: str | None = None) -> str | None:
    """A file's text, counted in `report`; None if it is binary."""
    data = path.read_bytes()
    text, invalid = decode_utf8(data)
    return text if report.add(name or str(path), invalid, len(data), data) else None


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


def iter_documents(cfg: DataConfig, report: Utf8Report | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) of every document, in corpus order. Invalid UTF-8 is counted in `report`; binary files
    raise one DataError naming them all, once every file has been looked at (so one fix covers them)."""
    report = Utf8Report() if report is None else report
    if cfg.source == "stdlib":
        root = stdlib_root()
        for p in stdlib_files():
            text = read_text(p, report, str(p.relative_to(root)))
            if text is not None and not report.binary:
                yield str(p.relative_to(root)), text
    elif cfg.source == "text":
        for p in _expand(cfg.paths):
            text = read_text(p, report)
            if text is not None and not report.binary:  # after a binary file, only look for more of them
                yield str(p), text
    elif cfg.source == "jsonl":
        for p in _expand(cfg.paths):
            for i, rec in iter_jsonl(p, report=report):
                if not isinstance(rec, dict) or not isinstance(rec.get(cfg.text_field), str):
                    raise DataError(f"{p}:{i} has no string field '{cfg.text_field}'; "
                                    f"set data.text_field to the field that holds the text")
                yield f"{p}:{i}", rec[cfg.text_field]
    else:
        raise DataError(f"unknown data.source '{cfg.source}'")
    report.raise_if_binary()


def iter_jsonl(path: Path, error: type[ValueError] = DataError,
               report: Utf8Report | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, record) for every non-blank line of a JSONL file; a bad line raises `error` naming it.
    A binary file (the module docstring's rule) raises `error` too, or with `report` is recorded there and
    skipped (`iter_documents` then names every such file at once). Lines end at \\n, \\r\\n or \\r."""
    own = report is None
    report = Utf8Report() if own else report
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
        if b"\0" in head:  # binary: do not try to parse it line by line
            report.add(str(path), 0, len(head), head)
        else:
            f.seek(0)
            size = invalid = 0
            i = 0
            for raw in f:
                size += len(raw)
                for part in raw.rstrip(b"\n").removesuffix(b"\r").split(b"\r"):
                    i += 1
                    line, bad = decode_utf8(part)
                    invalid += bad
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as e:
                        note = " and holds bytes that are not UTF-8" if bad else ""
                        raise error(f"{path}:{i} is not valid JSON ({e.msg}){note}; fix or remove that line") from None
                    yield i, rec
            report.add(str(path), invalid, size, b"")
    if own and report.binary:
        raise error(f"{path} is not UTF-8 text (a NUL byte in its first {SNIFF_BYTES} bytes, or over "
                    f"{MAX_INVALID_FRACTION:.0%} of bytes not valid UTF-8); convert it to UTF-8 JSONL or use "
                    f"another file")


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
