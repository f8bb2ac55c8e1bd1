"""Bad input and interrupted preparation: binary files are refused by name, invalid UTF-8 is decoded, counted and
reported in one line, SIGTERM or Ctrl-C leaves no temporary directory and no lost cache, and the next preparation
removes the temporary directory a SIGKILL left (and none a live process owns)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, VOCAB, subprocess_env

from gptjax import data
from gptjax.config import DataConfig
from gptjax.data import DataError, cache, tokenizers
from gptjax.data.sources import Utf8Report, decode_utf8, is_binary, iter_jsonl
from gptjax.errors import TaskError


def noise(seed: int, n: int, nul: bool = True) -> bytes:
    """Random bytes from a seeded generator; without NUL bytes if asked (then only the 5% rule can catch them)."""
    b = np.random.default_rng(seed).integers(0 if nul else 1, 256, n, dtype=np.uint8)
    return b.tobytes()


def copy_corpus(corpus_dir, dest, n: int | None = None):
    dest.mkdir(parents=True)
    for p in sorted(corpus_dir.glob("*.py"))[:n]:
        shutil.copyfile(p, dest / p.name)
    return dest


def text_cfg(pattern, cache_dir) -> DataConfig:
    return DataConfig(source="text", paths=(str(pattern),), cache_dir=str(cache_dir), tokenizer_sample_bytes=100_000)


# ----------------------------------------------------------------------------------------------
# Non-UTF-8 and binary input


def test_invalid_utf8_bytes_are_counted_exactly():
    assert decode_utf8("café 日本".encode()) == ("café 日本", 0)
    assert decode_utf8(b"caf\xe9 \xff\xfe!") == ("caf\ufffd \ufffd\ufffd!", 3)
    assert decode_utf8(b"\xe6\x97x") == ("\ufffdx", 2)  # a cut-off 3-byte character: one U+FFFD for 2 bytes
    assert decode_utf8("\ufffd".encode() + b"\xff") == ("\ufffd\ufffd", 1)  # a U+FFFD in the file is valid text


def test_binary_is_a_nul_in_the_first_8000_bytes_or_over_5_percent_invalid():
    assert is_binary(b"a" * 7999 + b"\0", 0, 8000)
    assert not is_binary(b"a" * 8000 + b"\0", 0, 8001)  # git looks no further either
    assert not is_binary(b"", 5, 100) and is_binary(b"", 6, 100)


def test_binary_files_are_refused_naming_them(tmp_path):
    bins = tmp_path / "bin"
    bins.mkdir()
    (bins / "a_text.txt").write_text("plain text\n" * 50)
    (bins / "b_noise.txt").write_bytes(noise(0, 20_000))
    (bins / "c_noise_without_nul.txt").write_bytes(noise(1, 20_000, nul=False))
    (bins / "d_text.txt").write_text("more plain text\n" * 50)
    cfg = text_cfg(bins / "*.txt", tmp_path / "cache")
    with pytest.raises(DataError) as e:
        data.prepare(cfg, VOCAB, log=lambda _: None)
    msg = str(e.value)
    assert "\n" not in msg and "2 binary or non-UTF-8 file(s)" in msg and "exclude them from data.paths" in msg
    assert str(bins / "b_noise.txt") in msg and str(bins / "c_noise_without_nul.txt") in msg
    assert "a_text" not in msg and "d_text" not in msg
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


def test_invalid_utf8_is_replaced_counted_reported_and_kept_in_the_manifest(corpus_dir, tmp_path):
    src = copy_corpus(corpus_dir, tmp_path / "src", 8)
    bad = sorted(src.glob("*.py"))[2]
    bad.write_bytes(bad.read_bytes() + b"# caf\xe9, \xff\xfe\n")  # Latin-1 and stray bytes: 3 invalid
    cfg = text_cfg(src / "*.py", tmp_path / "cache")
    lines: list[str] = []
    out = data.prepare(cfg, VOCAB, log=lines.append)
    (note,) = [line for line in lines if "UTF-8" in line]
    assert "1 of 8 file(s)" in note and "3 byte(s)" in note and "U+FFFD" in note and str(bad) in note
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["utf8"] == {"files": 8, "invalid_files": 1, "invalid_bytes": 3, "examples": [str(bad)]}
    doc = dict(data.iter_documents(cfg))[str(bad)]
    assert doc.endswith("# caf\ufffd, \ufffd\ufffd\n")
    # a reused cache says so again
    lines.clear()
    assert data.prepare(cfg, VOCAB, log=lines.append) == out
    assert any("reusing" in line for line in lines) and any(line == note for line in lines), lines


def test_jsonl_with_invalid_utf8_binary_or_bad_lines(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_bytes(b'{"text": "caf\xe9 au lait"}\r\n{"text": "fine"}\n')
    binary = tmp_path / "b.jsonl"
    binary.write_bytes(noise(2, 4000))
    cfg = DataConfig(source="jsonl", paths=(str(good),), cache_dir=str(tmp_path / "cache"))
    report = Utf8Report()
    assert [t for _, t in data.iter_documents(cfg, report)] == ["caf\ufffd au lait", "fine"]
    assert report.invalid_bytes == 1 and str(good) in report.line()

    cfg = DataConfig(source="jsonl", paths=(str(tmp_path / "*.jsonl"),), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=f"1 binary .*: {re.escape(str(binary))}; exclude them from data.paths"):
        list(data.iter_documents(cfg))
    # a task file, read with its own error class
    with pytest.raises(TaskError, match=f"{re.escape(str(binary))} is not UTF-8 text"):
        list(iter_jsonl(binary, TaskError))
    broken = tmp_path / "c.jsonl"
    broken.write_bytes(b'{"text": "fine"}\n{"text": \xff\n')
    bad_line = f"{re.escape(str(broken))}:2 is not valid JSON .* and holds bytes that are not UTF-8"
    with pytest.raises(DataError, match=bad_line):
        list(iter_jsonl(broken))


# ----------------------------------------------------------------------------------------------
# Interrupted preparation

# A preparation that stops inside SentencePiece's reading of the corpus (Python called back from C++, where a
# signal's exception has to find its way out) and says so, so the test signals it mid-build without a race.
PREPARE = r"""
import functools, sys, time
import tqdm.auto
from gptjax.config import DataConfig
from gptjax.data import cache, tokenizers
from gptjax.errors import run_command

cache.tqdm = tokenizers.tqdm = functools.partial(tqdm.auto.tqdm, disable=True)
real_chunks = tokenizers._chunks

def chunks_then_wait(texts, *a):
    for i, c in enumerate(real_chunks(texts, *a)):
        if i == 3:
            print("preparing", flush=True)
            time.sleep(120)
        yield c

tokenizers._chunks = chunks_then_wait
cfg = DataConfig(source="text", paths=(sys.argv[1],), cache_dir=sys.argv[2], tokenizer_sample_bytes=100_000)
sys.exit(run_command(cache.prepare, cfg, int(sys.argv[3])))
"""


def start_preparing(pattern, cache_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", PREPARE, str(pattern), str(cache_dir), str(VOCAB)], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "preparing":
        proc.kill()
        pytest.fail(f"the preparation did not start: {proc.communicate()[1]}")
    return proc


def test_sigterm_while_preparing_exits_with_one_line_and_leaves_no_temporary_directory(corpus_dir, tmp_path):
    proc = start_preparing(f"{corpus_dir}/*.py", tmp_path / "cache")
    (left,) = (tmp_path / "cache" / "data").iterdir()  # it is mid-build
    assert ".tmp-" in left.name
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    (line,) = err.splitlines()
    assert line.startswith("error: data preparation was stopped by SIGTERM") and "rerun" in line
    assert list((tmp_path / "cache" / "data").iterdir()) == []


def test_next_preparation_removes_what_a_sigkill_left_and_nothing_a_live_process_owns(corpus_dir, tmp_path):
    proc = start_preparing(f"{corpus_dir}/*.py", tmp_path / "cache")
    proc.kill()
    proc.wait()
    root = tmp_path / "cache" / "data"
    (killed,) = root.iterdir()
    assert f"-{proc.pid}-" in killed.name
    day_ago = time.time() - 2 * 86400
    live = root / f"other.tmp-{cache._host()}-{os.getpid()}-x1"  # this process's: alive, so kept
    fresh_unowned = root / "other.tmp-abcd1234"  # an older gptjax's name, recently changed: kept
    old_unowned = root / "other.tmp-efgh5678"  # the same, untouched for two days: removed
    old_other_host = root / "other.tmp-elsewhere-1-x2"  # another host's: by age only
    for d in (live, fresh_unowned, old_unowned, old_other_host):
        d.mkdir()
    for d in (old_unowned, old_other_host):
        os.utime(d, (day_ago, day_ago))

    lines: list[str] = []
    out = data.prepare(text_cfg(f"{corpus_dir}/*.py", tmp_path / "cache"), VOCAB, log=lines.append)
    (note,) = [line for line in lines if "temporary director" in line]
    assert "removed 3 temporary directories" in note and f"pid {proc.pid}" in note
    assert sorted(p.name for p in root.iterdir()) == sorted([out.name, live.name, fresh_unowned.name])
    # and the cache it built is whole: every document exactly once, byte for byte
    td = data.TokenData(out)
    tok = td.tokenizer
    decoded = []
    for sp in ("train", "val"):
        stream = np.asarray(td.shards[sp][0])
        decoded += [tok.decode(d) for d in np.split(stream, np.flatnonzero(stream == tok.eot_id) + 1)[:-1]]
    assert sorted(decoded) == sorted(p.read_text() for p in corpus_dir.glob("*.py"))
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the preparation's handler is gone again


def test_interrupted_rebuild_keeps_the_previous_cache(corpus_dir, tmp_path, monkeypatch):
    src = copy_corpus(corpus_dir, tmp_path / "src", 6)
    cfg = text_cfg(src / "*.py", tmp_path / "cache")
    out = data.prepare(cfg, VOCAB, log=lambda _: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    victim = min(src.glob("*.py"))
    victim.write_text(victim.read_text() + "\n# an edit\n")

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # Ctrl-C while tokenizing
        m.setattr(cache, "_write_tokens", ctrl_c)
        with pytest.raises(KeyboardInterrupt):
            data.prepare(cfg, VOCAB, log=lambda _: None)
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    real_replace = os.replace

    def stop_mid_swap(src_path, dst):
        if ".tmp-" in str(src_path) and not str(src_path).endswith("_old"):  # the new cache's move into place
            raise PermissionError("simulated")
        real_replace(src_path, dst)

    with monkeypatch.context() as m:
        m.setattr(cache.os, "replace", stop_mid_swap)
        with pytest.raises(PermissionError):
            data.prepare(cfg, VOCAB, log=lambda _: None)
    assert [p.name for p in out.parent.iterdir()] == [out.name]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert data.prepare(cfg, VOCAB, log=lambda _: None) == out  # and a clean run then rebuilds it
    new, old = json.loads((out / "manifest.json").read_text()), json.loads(before["manifest.json"])
    assert new["source_hash"] != old["source_hash"]


def test_an_exception_inside_sentencepiece_reading_comes_out_as_itself(monkeypatch):
    def stop(*a, **k):
        yield "some text\n"
        raise cache.PreparationInterrupted("stopped")

    monkeypatch.setattr(tokenizers, "_chunks", stop)
    with pytest.raises(cache.PreparationInterrupted, match="stopped"):
        tokenizers.train_tokenizer(["x"], VOCAB, None, 0, 1000)
