"""Streaming preparation: the same shards as preparing in memory, in one process or several; a preparation
stopped (SIGTERM) or killed (SIGKILL) half-way resumes from its finished shards to the same result; a reused
cache is recognised by its fingerprint without reading the corpus; epoch sampling visits every window once per
epoch; already-tokenized .bin files are read in place."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, VOCAB, subprocess_env

from gptjax import data
from gptjax.config import DataConfig
from gptjax.data import DataError, cache, sources, tokenizers


def cfg_for(src, cache_dir, **kw) -> DataConfig:
    return DataConfig(source="text", paths=(f"{src}/*.py",), cache_dir=str(cache_dir), tokenizer_sample_bytes=60_000,
                      **kw)


@pytest.fixture
def src(corpus_dir, tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    for p in sorted(corpus_dir.glob("*.py"))[:12]:
        shutil.copyfile(p, d / p.name)
    return d


def contents(out) -> dict:
    """Every file of a cache and the manifest without its creation time: what two preparations must share."""
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "manifest.json"}
    m = json.loads((out / "manifest.json").read_text())
    m.pop("created")
    return {**files, "manifest": m}


def test_streaming_gives_what_preparing_in_memory_gives(src, tmp_path):
    cfg = cfg_for(src, tmp_path / "cache", shard_tokens=5000)
    out = data.prepare(cfg, VOCAB, log=lambda _: None)
    td = data.TokenData(out)

    # the in-memory recipe: every document, split by hash, a tokenizer trained on the whole training split
    texts = [t for _, t in data.iter_documents(cfg)]
    train, val = data.split(texts, cfg.val_fraction)
    ref_tok = tmp_path / "ref.model"
    tokenizers.train_tokenizer(train, VOCAB, ref_tok, cfg.num_task_tokens, cfg.tokenizer_sample_bytes)
    assert (out / "tokenizer.model").read_bytes() == ref_tok.read_bytes()
    tok = td.tokenizer
    for sp, docs in (("train", train), ("val", val)):
        want = np.concatenate([np.array(tok.encode(t) + [tok.eot_id]) for t in docs])
        assert np.array_equal(np.concatenate(td.shards[sp]), want), sp
        assert td.manifest["docs"][sp] == len(docs)
    assert (out / "val.txt").read_text() == "\n".join(val)
    assert td.manifest["bytes"]["train"] == sum(len(t.encode()) for t in train)
    assert len(td.shards["train"]) > 2  # shards close at document boundaries past shard_tokens
    assert all(s["tokens"] >= 5000 for s in td.manifest["shards"]["train"][:-1])

    # several tokenizing processes: the same bytes
    cache_mp = tmp_path / "cache-mp"
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cache, "POOL_MIN_BYTES", 0)
        m.setattr(cache, "CHUNK_CHARS", 20_000)
        out_mp = data.prepare(dataclasses.replace(cfg, cache_dir=str(cache_mp), workers=2), VOCAB, log=lambda _: None)
    assert contents(out_mp) == contents(out)


def test_a_corpus_with_nothing_held_out_by_hash_gives_its_last_document(corpus_dir, tmp_path):
    d = tmp_path / "few"
    d.mkdir()
    kept = [p for p in sorted(corpus_dir.glob("*.py")) if not sources.is_validation(p.read_text(), 0.02)][:4]
    for p in kept:
        shutil.copyfile(p, d / p.name)
    td = data.TokenData(data.prepare(cfg_for(d, tmp_path / "cache"), VOCAB, log=lambda _: None))
    assert td.manifest["docs"] == {"train": 3, "val": 1}
    assert (td.path / "val.txt").read_text() == kept[-1].read_text()


# A preparation that stops after its second checkpoint: SIGTERM from the test, or SIGKILL by itself.
STOP = r"""
import functools, os, signal, sys, time
import tqdm.auto
from gptjax.config import DataConfig
from gptjax.data import cache, tokenizers
from gptjax.errors import run_command

cache.tqdm = tokenizers.tqdm = functools.partial(tqdm.auto.tqdm, disable=True)
real, seen = cache.write_atomic, []

def write_atomic(path, text):
    real(path, text)
    if path.name == "progress.json" and '"next_doc": 0' not in text:
        seen.append(1)
        if len(seen) == 2:
            if sys.argv[3] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            print("checkpoint", flush=True)
            time.sleep(120)

cache.write_atomic = write_atomic
cfg = DataConfig(source="text", paths=(sys.argv[1] + "/*.py",), cache_dir=sys.argv[2], tokenizer_sample_bytes=60_000,
                 shard_tokens=5000)
sys.exit(run_command(cache.prepare, cfg, int(sys.argv[4])))
"""


@pytest.mark.parametrize("how", ["sigterm", "kill"])
def test_a_stopped_preparation_resumes_from_its_finished_shards(src, tmp_path, how):
    proc = subprocess.Popen([sys.executable, "-c", STOP, str(src), str(tmp_path / "cache"), how, str(VOCAB)],
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if how == "sigterm":
        assert proc.stdout.readline().strip() == "checkpoint", proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    root = tmp_path / "cache" / "data"
    (left,) = root.iterdir()
    assert ".tmp-" in left.name and f"-{proc.pid}-" in left.name
    if how == "sigterm":
        assert proc.returncode == 143, err
        (line,) = err.splitlines()
        assert "stopped by SIGTERM" in line and "2 finished shard(s) are kept" in line and "resumes" in line
    else:
        assert proc.returncode == -signal.SIGKILL
    assert len(json.loads((left / "progress.json").read_text())["train"]["shards"]) == 2

    lines: list[str] = []
    encoded: list[int] = []
    real_encode = cache._encode

    def counting(texts, *a, **k):
        encoded.extend(texts)
        return real_encode(texts, *a, **k)

    cfg = cfg_for(src, tmp_path / "cache", shard_tokens=5000)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(cache, "_encode", counting)
        out = data.prepare(cfg, VOCAB, log=lines.append)
    assert any("resuming the preparation" in x and "2 finished shard(s)" in x for x in lines), lines
    assert [p.name for p in root.iterdir()] == [out.name]
    fresh = data.prepare(dataclasses.replace(cfg, cache_dir=str(tmp_path / "fresh")), VOCAB, log=lambda _: None)
    assert contents(out) == contents(fresh)
    # the resumed preparation tokenized only what the checkpoint did not cover
    assert 0 < len(encoded) < len(list(data.iter_documents(cfg)))


def test_a_reused_cache_is_recognised_without_reading_the_corpus(src, tmp_path, monkeypatch):
    cfg = cfg_for(src, tmp_path / "cache")
    out = data.prepare(cfg, VOCAB, log=lambda _: None)
    reads: list[int] = []
    real = cache.iter_documents

    def counted(*a, **k):
        reads.append(1)
        return real(*a, **k)

    monkeypatch.setattr(cache, "iter_documents", counted)
    lines: list[str] = []
    assert data.prepare(cfg, VOCAB, log=lines.append) == out
    assert reads == [] and any("reusing" in x for x in lines)

    # touched but unchanged files: the content is hashed once, the cache kept, the new fingerprint recorded
    victim = sorted(src.glob("*.py"))[3]
    os.utime(victim, (1e9, 1e9))
    lines.clear()
    assert data.prepare(cfg, VOCAB, log=lines.append) == out
    assert len(reads) == 1 and any("not their content" in x for x in lines) and any("reusing" in x for x in lines)
    assert data.prepare(cfg, VOCAB, log=lambda _: None) == out and len(reads) == 1
    # data.verify=true hashes the content every time
    assert data.prepare(dataclasses.replace(cfg, verify=True), VOCAB, log=lambda _: None) == out and len(reads) == 2

    # a manifest from before fingerprints: recognised by its content, then given one
    m = json.loads((out / "manifest.json").read_text())
    fp = m.pop("fingerprint")
    (out / "manifest.json").write_text(json.dumps(m))
    assert data.prepare(cfg, VOCAB, log=lambda _: None) == out
    assert json.loads((out / "manifest.json").read_text())["fingerprint"] == fp

    # a changed file is a changed corpus
    victim.write_text(victim.read_text() + "# more\n")
    lines.clear()
    data.prepare(cfg, VOCAB, log=lines.append)
    assert any("source changed" in x for x in lines), lines


def test_permute_is_a_bijection():
    for n in (1, 2, 3, 7, 64, 1000, 4097):
        p = cache.permute(np.arange(n), n, key=12345)
        assert sorted(p.tolist()) == list(range(n))
    a, b = cache.permute(np.arange(1000), 1000, 1), cache.permute(np.arange(1000), 1000, 2)
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(1000))


def test_epoch_sampling_visits_every_window_once_per_epoch(token_data):
    T, B = 32, 8
    n = token_data.windows_per_epoch(T)
    steps = -(-2 * n // B)  # two epochs and a bit
    got = np.concatenate([token_data.batch(3, s, B, T, sampling="epoch") for s in range(steps)])
    stream = np.concatenate(token_data.shards["train"])
    all_windows = {}
    offset = 0
    for s in token_data.shards["train"]:
        for k in range((len(s) - 1) // T):
            all_windows[tuple(stream[offset + k * T: offset + k * T + T + 1])] = all_windows.get(
                tuple(stream[offset + k * T: offset + k * T + T + 1]), 0) + 1
        offset += len(s)
    for epoch in (0, 1):
        seen: dict = {}
        for row in got[epoch * n:(epoch + 1) * n]:
            seen[tuple(row)] = seen.get(tuple(row), 0) + 1
        assert seen == all_windows, epoch
    assert not np.array_equal(got[:n], got[n:2 * n])  # each epoch its own order
    # a pure function of (seed, step), and the processes' rows make up the global batch
    assert np.array_equal(token_data.batch(3, 5, B, T, sampling="epoch"), got[5 * B:6 * B])
    halves = [token_data.batch(3, 5, B, T, sampling="epoch", process_index=i, process_count=2) for i in range(2)]
    assert np.array_equal(np.concatenate(halves), got[5 * B:6 * B])
    assert not np.array_equal(token_data.batch(4, 5, B, T, sampling="epoch"), got[5 * B:6 * B])


def test_bin_files_are_read_in_place(prepared, tmp_path):
    td = data.TokenData(prepared)
    train, val = np.concatenate(td.shards["train"]), np.concatenate(td.shards["val"])
    d = tmp_path / "bins"
    d.mkdir()
    train.astype(np.uint16).tofile(d / "train.bin")  # nanoGPT's layout: raw uint16
    header = np.zeros(256, np.int32)
    header[:3] = [20240520, 1, len(val)]  # llm.c's
    with open(d / "corpus_val_000000.bin", "wb") as f:
        f.write(header.tobytes() + val.astype(np.uint16).tobytes())
    shutil.copyfile(prepared / "tokenizer.model", tmp_path / "tokenizer.model")
    cfg = DataConfig(source="bin", paths=(f"{d}/*.bin",), tokenizer=str(tmp_path / "tokenizer.model"),
                     cache_dir=str(tmp_path / "cache"))
    out = data.prepare(cfg, VOCAB, log=lambda _: None)
    tb = data.TokenData(out)
    assert np.array_equal(np.concatenate(tb.shards["train"]), train)
    assert np.array_equal(np.concatenate(tb.shards["val"]), val)
    assert (out / "val.txt").read_bytes() == (prepared / "val.txt").read_bytes()  # decoded back to the same text
    assert tb.bytes_per_token() == pytest.approx(td.bytes_per_token())
    assert not any(p.suffix == ".bin" for p in out.iterdir())  # nothing copied
    lines: list[str] = []
    assert data.prepare(cfg, VOCAB, log=lines.append) == out and any("reusing" in x for x in lines)

    big = np.full(10, VOCAB + 5, np.uint16)
    big.tofile(d / "train.bin")
    with pytest.raises(DataError, match=f"token id {VOCAB + 5}, outside the {VOCAB} ids"):
        data.prepare(cfg, VOCAB, log=lambda _: None)
    (d / "corpus_val_000000.bin").unlink()
    with pytest.raises(DataError, match="held out when its name contains 'val'"):
        data.prepare(cfg, VOCAB, log=lambda _: None)
