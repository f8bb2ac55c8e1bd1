"""Corpus sources and the one held-out split.

Each source yields (name, text) documents in a fixed order (`iter_documents`; `data.source`, or each entry of
`data.mixture`):

  stdlib   this interpreter's standard library source (no test suites), one document per file
  text     UTF-8 files (`data.paths`, globs allowed): one document per file, or with `data.separator` (escapes
           \\n \\t \\r \\\\ allowed) each file split at that string, read in chunks (any size); names PATH#K
  jsonl    one JSON object per line, the text under `data.text_field`; .jsonl.gz and .jsonl.zst (zstandard)
           are decompressed as they are read; names PATH:LINE
  parquet  the `data.text_field` column (string or binary) of parquet files, read a batch at a time (pyarrow);
           null values are skipped; names PATH:ROW
  bin      token ids, not text: llm.c shards (a 1024-byte header) or nanoGPT's raw uint16; the token cache
           reads them itself (`read_bin_header`), so `iter_documents` refuses them

`corpus_files` lists the files a source reads and `fingerprint_files` hashes their names, sizes and mtimes (and
a sample of their bytes) cheaply, for the token cache to tell whether the corpus changed.

A document is held out for validation by a hash of its content (`is_validation`), so the split is stable across
runs and machines; `split` is the only place that applies it (token preparation, the built-in tasks and eval.py
all call it).

Files are read as UTF-8. A file is refused as binary (a DataError naming it) when its first 8000 bytes hold a
NUL byte (git's and grep's test: it catches executables, images, archives and UTF-16) or when more than 5% of
its bytes are not valid UTF-8 (random bytes, or text in an encoding far from ASCII: it would train on U+FFFD
soup). Below that (a stray byte, Latin-1 accents), invalid bytes are decoded as U+FFFD (Python's
errors="replace": one per maximal invalid sequence), counted in a `Utf8Report`, and reported by data
preparation in one line. Files that are streamed (separated text, JSONL, parquet) may have yielded some
documents before they are found binary; the DataError still comes, once every file has been looked at.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from gptjax.config import DataConfig, MixtureSource
from gptjax.errors import DataError

STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
SNIFF_BYTES = 8000  # a NUL byte in the first this many bytes makes a file binary (git's FIRST_FEW_BYTES)
MAX_INVALID_FRACTION = 0.05  # more invalid UTF-8 than this and a file is not text we should train on
TEXT_CHUNK_BYTES = 1 << 20  # separated text files are read this many bytes at a time
PARQUET_BATCH_ROWS = 1024
ZST_MISSING = "reading .zst needs the zstandard package: pip install -e '.[data]'"
PARQUET_MISSING = "reading parquet needs pyarrow: pip install -e '.[data]'"
LLMC_MAGIC = 20240520  # llm.c's .bin shards: 256 int32 (magic, version, token count, ...), then the tokens
LLMC_HEADER_BYTES = 256 * 4
LLMC_DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
_FFFD = "\ufffd".encode()


def decode_utf8(data: bytes) -> tuple[str, int]:
    """(text, how many bytes were not valid UTF-8): invalid sequences become U+FFFD."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    text = data.decode("utf-8", errors="replace")
    inserted = text.count("\ufffd") - data.count("\ufffd".encode())  # U+FFFD already in the file is valid
    return text, len(data) - (len(text.encode("utf-8")) - 3 * inserted)


class _Utf8Stream:
    """`decode_utf8` a piece at a time: the same text and, over the whole stream, the same count of invalid
    bytes (`invalid`) as decoding all the bytes at once."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._tail = b""  # the last 2 bytes seen: a U+FFFD already in the data may straddle two pieces
        self.size = self._out = self._inserted = 0

    def decode(self, data: bytes, final: bool = False) -> str:
        text = self._decoder.decode(data, final)
        self.size += len(data)
        self._out += len(text.encode("utf-8"))
        self._inserted += text.count("\ufffd") - (self._tail + data).count(_FFFD)  # EF BF BD cannot overlap itself
        self._tail = (self._tail + data)[-2:]
        return text

    @property
    def invalid(self) -> int:
        """Invalid bytes so far (bytes the decoder holds back, a possible start of a character, not counted)."""
        return max(0, self.size - len(self._decoder.getstate()[0]) - (self._out - 3 * self._inserted))


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


def decode_separator(sep: str) -> str:
    """`data.separator` as typed on a command line: \\n, \\t, \\r and \\\\ stand for themselves decoded."""
    out, i = [], 0
    while i < len(sep):
        c = sep[i]
        if c == "\\":
            esc = sep[i + 1:i + 2]
            if esc not in _ESCAPES:
                got = f"'\\{esc}'" if esc else "a lone '\\' at the end"
                raise DataError(f"data.separator '{sep}' has {got}; the escapes it takes are \\n \\t \\r \\\\ "
                                f"(write \\\\ for a backslash)")
            out.append(_ESCAPES[esc])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def iter_separated(path: Path, sep: str, report: Utf8Report,
                   emit: bool = True) -> Iterator[tuple[str, str]]:
    """(PATH#K, text) of the documents of a text file split at `sep` (K: the piece's index in the file; pieces
    that are only whitespace are skipped), read TEXT_CHUNK_BYTES at a time so a file of any size fits. The
    file is counted in `report` as `read_text` counts it; a binary one yields nothing more once it is found
    (a NUL byte in its head: nothing at all). With `emit` false, the file is only looked at."""
    name = str(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(SNIFF_BYTES)
        if b"\0" in head:
            report.add(name, 0, size, head)
            return
        f.seek(0)
        stream = _Utf8Stream()
        doc: list[str] = []  # the current document's text, but for `carry`
        carry = ""  # the end of the text read so far that could be the start of a separator
        k = 0
        keep_back = len(sep) - 1
        while True:
            data = f.read(TEXT_CHUNK_BYTES)
            text = carry + stream.decode(data, final=not data)
            if stream.invalid > MAX_INVALID_FRACTION * size:  # binary already: stop reading
                report.add(name, stream.invalid, size, head)
                return
            pos = 0
            while (j := text.find(sep, pos)) >= 0:
                doc.append(text[pos:j])
                piece = "".join(doc)
                if emit and piece.strip():
                    yield f"{path}#{k}", piece
                doc, k, pos = [], k + 1, j + len(sep)
            if not data:
                break
            cut = max(pos, len(text) - keep_back)
            doc.append(text[pos:cut])
            carry = text[cut:]
        doc.append(text[pos:])
        piece = "".join(doc)
        if not report.add(name, stream.invalid, stream.size, head):
            return
        if emit and piece.strip():
            yield f"{path}#{k}", piece


def iter_documents(cfg: DataConfig | MixtureSource, report: Utf8Report | None = None) -> Iterator[tuple[str, str]]:
    """(name, text) of every document, in corpus order. Invalid UTF-8 is counted in `report`; binary files
    raise one DataError naming them all, once every file has been looked at (so one fix covers them).
    `cfg` is a DataConfig or one `data.mixture` entry (its source, paths, text_field and separator)."""
    report = Utf8Report() if report is None else report
    if cfg.source == "stdlib":
        root = stdlib_root()
        for p in stdlib_files():
            text = read_text(p, report, str(p.relative_to(root)))
            if text is not None and not report.binary:
                yield str(p.relative_to(root)), text
    elif cfg.source == "text":
        sep = decode_separator(getattr(cfg, "separator", "") or "")
        for p in _expand(cfg.paths):
            if sep:
                # after a binary file, only look for more of them
                for doc in iter_separated(p, sep, report, emit=not report.binary):
                    if not report.binary:
                        yield doc
                continue
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
    elif cfg.source == "parquet":
        for p in _expand(cfg.paths):
            for doc in iter_parquet(p, cfg.text_field, report):
                if not report.binary:
                    yield doc
    elif cfg.source == "bin":
        raise DataError("data.source=bin holds token ids, not text; the token cache reads its shards directly "
                        "(llm.c or nanoGPT .bin files), so there are no documents to list: use a text, jsonl or "
                        "parquet source where text is needed")
    else:
        raise DataError(f"unknown data.source '{cfg.source}'")
    report.raise_if_binary()


def _open_stream(path: Path, error: type[ValueError]) -> IO[bytes]:
    """A binary file object over the file's bytes, decompressed as it is read for .gz and .zst."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise error(f"{ZST_MISSING} (for {path})") from None
        fh = open(path, "rb")  # noqa: SIM115 (the reader returned owns and closes it)
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True, closefd=True)
        except BaseException:
            fh.close()
            raise
        return io.BufferedReader(reader, buffer_size=1 << 20)  # type: ignore[arg-type]
    return open(path, "rb")


def _decompression_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [gzip.BadGzipFile, EOFError]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def iter_jsonl(path: Path, error: type[ValueError] = DataError,
               report: Utf8Report | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, record) for every non-blank line of a JSONL file; a bad line raises `error` naming it.
    A binary file (the module docstring's rule) raises `error` too, or with `report` is recorded there and
    skipped (`iter_documents` then names every such file at once). Lines end at \\n, \\r\\n or \\r.
    A path ending .gz (gzip) or .zst (zstandard) is decompressed as it is read, a line at a time."""
    path = Path(path)
    own = report is None
    report = Utf8Report() if own else report
    compressed = path.suffix.lower() in (".gz", ".zst")
    broken = _decompression_errors() if compressed else ()
    try:
        with _open_stream(path, error) as f:
            head = f.read(SNIFF_BYTES)
        if b"\0" in head:  # binary: do not try to parse it line by line
            report.add(str(path), 0, len(head), head)
        else:
            with _open_stream(path, error) as f:
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
                            raise error(f"{path}:{i} is not valid JSON ({e.msg}){note}; "
                                        f"fix or remove that line") from None
                        yield i, rec
            report.add(str(path), invalid, size, b"")
    except broken as e:
        kind = "gzip" if path.suffix.lower() == ".gz" else "zstandard"
        raise error(f"{path} is not a readable {kind} file ({e}); recompress it or remove it") from None
    if own and report.binary:
        raise error(f"{path} is not UTF-8 text (a NUL byte in its first {SNIFF_BYTES} bytes, or over "
                    f"{MAX_INVALID_FRACTION:.0%} of bytes not valid UTF-8); convert it to UTF-8 JSONL or use "
                    f"another file")


def iter_parquet(path: Path, column: str, report: Utf8Report) -> Iterator[tuple[str, str]]:
    """(PATH:ROW, text) for every non-null value of a string or binary column of a parquet file (ROW counts
    from 0, nulls included), read PARQUET_BATCH_ROWS rows at a time. A string column is valid UTF-8 by
    parquet's rule; a binary one is decoded and counted in `report` like a text file."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{PARQUET_MISSING} (for {path})") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a parquet file ({e}); check data.paths and data.source") from None
    with pf:
        names = pf.schema_arrow.names
        if column not in names:
            raise DataError(f"{path} has no column '{column}' (its columns: {', '.join(names) or 'none'}); "
                            f"set data.text_field to the column that holds the text")
        kind = pf.schema_arrow.field(column).type
        string = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        if not (string or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            raise DataError(f"{path}: column '{column}' holds {kind}, not text (string or binary); "
                            f"set data.text_field to the column that holds the text")
        head = bytearray()
        size = invalid = row = 0
        try:
            for batch in pf.iter_batches(columns=[column], batch_size=PARQUET_BATCH_ROWS):
                for value in batch.column(0).to_pylist():
                    row += 1
                    if value is None:
                        continue
                    if not string:
                        if len(head) < SNIFF_BYTES:
                            head += value[:SNIFF_BYTES - len(head)]
                            if b"\0" in head:
                                report.add(str(path), invalid, size + len(value), bytes(head))
                                return
                        size += len(value)
                        value, bad = decode_utf8(value)
                        invalid += bad
                    yield f"{path}:{row - 1}", value
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot read parquet past row {row} ({e}); the file may be damaged") from None
    report.add(str(path), invalid, size, bytes(head))


def read_bin_header(path: Path) -> tuple[int, np.dtype, int]:
    """(offset of the first token in bytes, token dtype, token count) of a .bin token file: llm.c's layout
    (256 little-endian int32: magic 20240520, version 1 for uint16 or 2 for uint32 tokens, the token count;
    tokens from byte 1024) or else nanoGPT's headerless little-endian uint16."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(LLMC_HEADER_BYTES)
    except OSError as e:
        raise DataError(f"cannot read token file {path}: {e.strerror or e}") from None
    if len(head) >= 4 and int(np.frombuffer(head[:4], "<i4")[0]) == LLMC_MAGIC:
        if len(head) < LLMC_HEADER_BYTES:
            raise DataError(f"{path} starts like an llm.c token shard but is only {size} bytes, shorter than its "
                            f"{LLMC_HEADER_BYTES}-byte header (truncated?)")
        _, version, n = (int(x) for x in np.frombuffer(head, "<i4")[:3])
        if version not in LLMC_DTYPES:
            raise DataError(f"{path} is an llm.c token shard of version {version}; the versions read are 1 "
                            f"(uint16 tokens) and 2 (uint32 tokens)")
        dtype = LLMC_DTYPES[version]
        want = LLMC_HEADER_BYTES + n * dtype.itemsize
        if n < 0 or size != want:
            raise DataError(f"{path}: its llm.c header says {n:,} tokens ({want:,} bytes with the header) but the "
                            f"file is {size:,} bytes (truncated?); rewrite or remove it")
        return LLMC_HEADER_BYTES, dtype, n
    if size % 2:
        raise DataError(f"{path} is {size:,} bytes, an odd size: not raw uint16 tokens (nanoGPT's .bin) and no "
                        f"llm.c header (magic {LLMC_MAGIC}); check the file")
    return 0, np.dtype("<u2"), size // 2


def corpus_files(cfg: DataConfig | MixtureSource) -> list[Path]:
    """The files `cfg`'s source reads, in corpus order (for the token cache's cheap fingerprint)."""
    if cfg.source == "stdlib":
        return stdlib_files()
    if cfg.source in ("text", "jsonl", "parquet", "bin"):
        return _expand(cfg.paths)
    raise DataError(f"unknown data.source '{cfg.source}'")


def fingerprint_files(files: Iterable[Path | str], sample: int = 64, chunk: int = 65536) -> str:
    """A sha256 (hex) of every file's path, size and mtime (ns), and of the first and last `chunk` bytes of
    an evenly spaced sample of at most `sample` of them (the first and the last always among them): cheap
    for any number of files, and it sees an edit that kept a sampled file's size and mtime. A file that is
    gone raises DataError."""
    files = [os.fspath(f) for f in files]
    h = hashlib.sha256(b"gptjax-files-v1\0")
    sizes, rows = [], []
    for f in files:  # os.stat is the cost (a path can hold no NUL: the rows cannot run together)
        try:
            st = os.stat(f)
        except OSError as e:
            raise DataError(f"corpus file {f} vanished or cannot be read ({e.strerror or e}); "
                            f"check data.paths") from None
        sizes.append(st.st_size)
        rows.append(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0")
    h.update("".join(rows).encode("utf-8", "surrogateescape"))
    n = len(files)
    if n <= sample:
        picks = list(range(n))
    else:
        k = max(2, sample)
        picks = sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
    for i in picks:
        try:
            with open(files[i], "rb") as fh:
                first = fh.read(chunk)
                if sizes[i] > chunk:
                    fh.seek(max(chunk, sizes[i] - chunk))
                    last = fh.read(chunk)
                else:
                    last = b""
        except OSError as e:
            raise DataError(f"corpus file {files[i]} vanished or cannot be read ({e.strerror or e}); "
                            f"check data.paths") from None
        h.update(b"%d\0%d\0%d\0" % (i, len(first), len(last)))
        h.update(first)
        h.update(last)
    return h.hexdigest()


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
