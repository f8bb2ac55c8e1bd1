"""Corpus sources (gptjax/data/sources.py): separated text read in chunks, compressed JSONL, parquet, the .bin
token-file headers, and the cheap corpus fingerprint. Tiny files only."""

from __future__ import annotations

import gzip
import os
import random
import re

import numpy as np
import pytest

from gptjax.config import DataConfig, MixtureSource
from gptjax.data import sources
from gptjax.data.sources import (
    Utf8Report,
    corpus_files,
    decode_separator,
    decode_utf8,
    fingerprint_files,
    iter_documents,
    iter_jsonl,
    read_bin_header,
    read_text,
)
from gptjax.errors import DataError, TaskError


@pytest.fixture
def small_chunks(monkeypatch):
    """7-byte reads: separators and multi-byte characters straddle chunk boundaries."""
    monkeypatch.setattr(sources, "TEXT_CHUNK_BYTES", 7)


def docs(cfg, report=None):
    return list(iter_documents(cfg, report))


# ----------------------------------------------------------------------------------------------
# text, split at a separator


def test_decode_separator():
    assert decode_separator(r"\n\n") == "\n\n"
    assert decode_separator(r"<|end|>\t\r\\") == "<|end|>\t\r\\"
    assert decode_separator("plain") == "plain"
    for bad in (r"\x00", "ends\\"):
        with pytest.raises(DataError, match="data.separator"):
            decode_separator(bad)


@pytest.mark.parametrize("chunk", [7, 1, 3, 1 << 20])
def test_separated_text_round_trips(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(sources, "TEXT_CHUNK_BYTES", chunk)
    parts = ["café 日本語 one", "  \n ", "two\nlines 🎉", "", "three€"]
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(parts), encoding="utf-8")
    other = tmp_path / "b.txt"
    other.write_text("whole file\n\nstill split", encoding="utf-8")
    cfg = DataConfig(source="text", paths=(str(path), str(other)), separator=r"\n\n")
    report = Utf8Report()
    assert docs(cfg, report) == [(f"{path}#0", parts[0]), (f"{path}#2", parts[2]), (f"{path}#4", parts[4]),
                                 (f"{other}#0", "whole file"), (f"{other}#1", "still split")]
    assert report.files == 2 and not report.invalid_files and not report.binary
    # the separator is text: a multi-character one with no escape, not at the file's start or end
    path.write_text("<END>a<EN<END><END>b<END>", encoding="utf-8")
    cfg = DataConfig(source="text", paths=(str(path),), separator="<END>")
    assert docs(cfg) == [(f"{path}#1", "a<EN"), (f"{path}#3", "b")]


def test_separator_splits_as_str_split(tmp_path, small_chunks):
    rng = random.Random(0)
    alphabet = ["a", "b", "\n", "é", "日", "🎉", " "]
    for trial in range(40):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        sep = rng.choice(["\n", "\n\n", "ab", "日🎉", "aba"])
        path = tmp_path / f"{trial}.txt"
        path.write_text(text, encoding="utf-8")
        want = [(f"{path}#{k}", d) for k, d in enumerate(text.split(sep)) if d.strip()]
        assert list(sources.iter_separated(path, sep, Utf8Report())) == want, (text, sep)


def test_without_separator_a_file_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\n\ntwo", encoding="utf-8")
    assert docs(DataConfig(source="text", paths=(str(path),))) == [(str(path), "one\n\ntwo")]


def test_mixture_source_is_read_like_data_config(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("x||y", encoding="utf-8")
    src = MixtureSource(name="m", source="text", paths=(str(path),), separator="||")
    assert docs(src) == [(f"{path}#0", "x"), (f"{path}#1", "y")]


def test_invalid_utf8_counted_as_whole_file_reading(tmp_path, small_chunks):
    rng = random.Random(1)
    pieces = [b"caf\xe9", b"\xff\xfe", "\ufffd".encode(), "日".encode()[:2], "日本".encode(), b"\n\n", b"ok ",
              "🎉".encode()[:3], b"\xed\xa0\x80", b"x" * 9]
    for trial in range(30):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randrange(20, 80))) + b"x" * 2000
        path = tmp_path / f"{trial}.txt"
        path.write_bytes(data)
        whole = Utf8Report()
        text = read_text(path, whole)
        assert text is not None
        streamed = Utf8Report()
        got = [d for _, d in docs(DataConfig(source="text", paths=(str(path),), separator=r"\n\n"), streamed)]
        assert got == [d for d in text.split("\n\n") if d.strip()]
        assert streamed.invalid_bytes == whole.invalid_bytes == decode_utf8(data)[1]
        assert streamed.invalid_files == whole.invalid_files and streamed.line() == whole.line()


def test_binary_file_with_separator_is_refused(tmp_path, small_chunks):
    good = tmp_path / "a.txt"
    good.write_text("fine\n\ntext", encoding="utf-8")
    nul = tmp_path / "b.txt"
    nul.write_bytes(b"text\n\n" + b"\0" * 10 + b"\n\nmore")
    noise = tmp_path / "c.txt"
    noise.write_bytes(b"ok\n\n" + bytes(random.Random(2).randrange(128, 256) for _ in range(3000)))
    later = tmp_path / "d.txt"
    later.write_text("after\n\nthem", encoding="utf-8")
    cfg = DataConfig(source="text", paths=(str(tmp_path / "*.txt"),), separator=r"\n\n")
    seen: list[tuple[str, str]] = []
    msg = (f"2 binary or non-UTF-8 file.*: {re.escape(str(nul))}, {re.escape(str(noise))}; "
           f"exclude them from data.paths")
    with pytest.raises(DataError, match=msg):
        seen.extend(iter_documents(cfg))  # keeps what came before the error
    assert seen[:2] == [(f"{good}#0", "fine"), (f"{good}#1", "text")]
    assert not any(name.startswith((str(nul), str(later))) for name, _ in seen)  # a NUL: nothing from the file


# ----------------------------------------------------------------------------------------------
# JSONL, plain and compressed

RECORDS = b'{"text": "caf\xc3\xa9 one"}\n\n{"text": "two", "n": 2}\r\n{"text": "three \xe9"}\n'


def test_jsonl_plain_gz_zst_round_trip(tmp_path):
    zstandard = pytest.importorskip("zstandard")
    (tmp_path / "a.jsonl").write_bytes(RECORDS)
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(RECORDS)
    # two zstd frames, as concatenated or parallel-compressed files have
    cctx = zstandard.ZstdCompressor()
    (tmp_path / "c.jsonl.zst").write_bytes(cctx.compress(RECORDS[:30]) + cctx.compress(RECORDS[30:]))
    want = ["café one", "two", "three \ufffd"]
    for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst"):
        path = tmp_path / name
        report = Utf8Report()
        got = docs(DataConfig(source="jsonl", paths=(str(path),)), report)
        assert got == [(f"{path}:{i}", t) for i, t in zip((1, 3, 4), want)], name
        assert report.invalid_bytes == 1 and report.invalid_files == [str(path)]
        assert [i for i, _ in iter_jsonl(path)] == [1, 3, 4]  # the task-file reader decompresses too


def test_jsonl_compressed_faults(tmp_path, monkeypatch):
    fake = tmp_path / "a.jsonl.gz"
    fake.write_bytes(b'{"text": "not gzip"}\n')
    with pytest.raises(TaskError, match=f"{re.escape(str(fake))} is not a readable gzip file"):
        list(iter_jsonl(fake, TaskError))
    binary = tmp_path / "b.jsonl.gz"
    with gzip.open(binary, "wb") as f:
        f.write(b"\0\1\2" * 100)
    with pytest.raises(DataError, match=f"{re.escape(str(binary))} is not UTF-8 text"):
        list(iter_jsonl(binary))
    import builtins
    real_import = builtins.__import__

    def no_zstandard(name, *args, **kwargs):
        if name == "zstandard":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_zstandard)
    zst = tmp_path / "c.jsonl.zst"
    zst.write_bytes(b"whatever")
    with pytest.raises(DataError, match=re.escape("reading .zst needs the zstandard package: pip install -e '.[data]'")):
        docs(DataConfig(source="jsonl", paths=(str(zst),)))


# ----------------------------------------------------------------------------------------------
# parquet


def test_parquet_string_and_binary_columns(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 2)
    texts = ["café", None, "日本語", "", "last"]
    s = tmp_path / "s.parquet"
    pq.write_table(pa.table({"id": list(range(5)), "body": pa.array(texts, pa.string())}), s, row_group_size=3)
    b = tmp_path / "b.parquet"
    raw = [t.encode() if t is not None else None for t in texts]
    raw[4] = b"l\xe9st" + b", the last of them" * 2  # one bad byte in 55: under the binary rule's 5%
    pq.write_table(pa.table({"body": pa.array(raw, pa.binary())}), b, row_group_size=2)
    report = Utf8Report()
    got = docs(DataConfig(source="parquet", paths=(str(s), str(b)), text_field="body"), report)
    want = [(0, "café"), (2, "日本語"), (3, ""), (4, "last")]
    assert got == [(f"{s}:{r}", t) for r, t in want] + [(f"{b}:{r}", t) for r, t in want[:3]] + \
        [(f"{b}:4", "l\ufffdst" + ", the last of them" * 2)]
    assert report.files == 2 and report.invalid_files == [str(b)] and report.invalid_bytes == 1


def test_parquet_faults(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": ["x"], "id": [1]}), path)
    with pytest.raises(DataError, match=re.escape(f"{path} has no column 'text' (its columns: content, id); "
                                                  f"set data.text_field")):
        docs(DataConfig(source="parquet", paths=(str(path),)))
    with pytest.raises(DataError, match="column 'id' holds int64, not text"):
        docs(DataConfig(source="parquet", paths=(str(path),), text_field="id"))
    nul = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": pa.array([b"ok", b"\0\1\2"], pa.binary())}), nul)
    with pytest.raises(DataError, match=f"1 binary or non-UTF-8 file.*: {re.escape(str(nul))}; exclude"):
        docs(DataConfig(source="parquet", paths=(str(nul),)))
    fake = tmp_path / "b.parquet"
    fake.write_text("not parquet at all", encoding="utf-8")
    with pytest.raises(DataError, match=f"{re.escape(str(fake))} is not a parquet file"):
        docs(DataConfig(source="parquet", paths=(str(fake),), text_field="content"))


# ----------------------------------------------------------------------------------------------
# .bin token files


def llmc(path, tokens, version=1, count=None):
    header = np.zeros(256, "<i4")
    header[:3] = 20240520, version, len(tokens) if count is None else count
    path.write_bytes(header.tobytes() + np.asarray(tokens, "<u2" if version == 1 else "<u4").tobytes())


def test_bin_headers(tmp_path):
    a = tmp_path / "a.bin"
    llmc(a, [1, 2, 50256])
    assert read_bin_header(a) == (1024, np.dtype("<u2"), 3)
    b = tmp_path / "b.bin"
    llmc(b, [7, 100_000], version=2)
    offset, dtype, n = read_bin_header(b)
    assert (offset, dtype, n) == (1024, np.dtype("<u4"), 2)
    assert np.fromfile(b, dtype, offset=offset).tolist() == [7, 100_000]
    raw = tmp_path / "c.bin"
    np.asarray([5, 6, 7, 8, 9], "<u2").tofile(raw)
    assert read_bin_header(raw) == (0, np.dtype("<u2"), 5)

    short = tmp_path / "d.bin"
    llmc(short, [1, 2, 3], count=10)
    with pytest.raises(DataError, match=f"{re.escape(str(short))}: its llm.c header says 10 tokens.*truncated"):
        read_bin_header(short)
    cut = tmp_path / "e.bin"
    cut.write_bytes(np.asarray([20240520, 1, 0], "<i4").tobytes())
    with pytest.raises(DataError, match="truncated"):
        read_bin_header(cut)
    odd = tmp_path / "f.bin"
    odd.write_bytes(b"abc")
    with pytest.raises(DataError, match="odd size"):
        read_bin_header(odd)
    with pytest.raises(DataError, match="data.source=bin holds token ids, not text"):
        docs(DataConfig(source="bin", paths=(str(a),), tokenizer="t.json"))


# ----------------------------------------------------------------------------------------------
# corpus files and their fingerprint


def test_corpus_files(tmp_path):
    for name in ("b.txt", "a.txt", "c.md"):
        (tmp_path / name).write_text(name, encoding="utf-8")
    cfg = DataConfig(source="text", paths=(str(tmp_path / "*.txt"), str(tmp_path / "c.md")))
    assert corpus_files(cfg) == [tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.md"]
    assert corpus_files(DataConfig()) == sources.stdlib_files()


def test_fingerprint_files(tmp_path):
    files = []
    for i in range(10):
        path = tmp_path / f"{i}.txt"
        path.write_bytes(bytes([65 + i]) * (100 + i))
        files.append(path)
    base = fingerprint_files(files, sample=4, chunk=16)
    every = fingerprint_files(files, sample=10, chunk=16)
    assert fingerprint_files(files, sample=4, chunk=16) == base
    assert fingerprint_files([str(f) for f in files], sample=4, chunk=16) == base
    assert fingerprint_files(files[:-1], sample=4, chunk=16) != base

    def edit(path, data):
        """New content of the same size, size and mtime put back."""
        st = path.stat()
        path.write_bytes(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))

    # sampled (4 of 10: files 0, 3, 6, 9): a same-size edit in the first or last chunk shows
    for i in (0, 9):
        old = files[i].read_bytes()
        edit(files[i], b"Z" + old[1:])
        assert fingerprint_files(files, sample=4, chunk=16) != base
        edit(files[i], old[:-1] + b"Z")
        assert fingerprint_files(files, sample=4, chunk=16) != base
        edit(files[i], old)
        assert fingerprint_files(files, sample=4, chunk=16) == base
    # not sampled: a same-size edit that kept the mtime is not read (that is data.verify's job) ...
    old = files[1].read_bytes()
    edit(files[1], b"Z" * len(old))
    assert fingerprint_files(files, sample=4, chunk=16) == base
    assert fingerprint_files(files, sample=10, chunk=16) != every  # sampled when every file is
    edit(files[1], old)
    assert fingerprint_files(files, sample=10, chunk=16) == every
    # ... but a new mtime or size is seen in any file
    st = files[1].stat()
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
    assert fingerprint_files(files, sample=4, chunk=16) != base
    os.utime(files[1], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fingerprint_files(files, sample=4, chunk=16) == base
    st = files[2].stat()
    files[2].write_bytes(files[2].read_bytes() + b"!")
    os.utime(files[2], ns=(st.st_atime_ns, st.st_mtime_ns))  # only the size differs
    assert fingerprint_files(files, sample=4, chunk=16) != base
    files[5].unlink()
    with pytest.raises(DataError, match=f"{re.escape(str(files[5]))} vanished"):
        fingerprint_files(files)
