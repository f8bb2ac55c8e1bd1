"""The data pipeline: cache preparation and reuse, rebuild on change, the tokenizer, document separation,
deterministic batches, evaluation windows, and clear errors for bad sources."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import numpy as np
import pytest
from conftest import VOCAB

from gptjax import data
from gptjax.config import DataConfig
from gptjax.data import DataError


def logger():
    lines: list[str] = []
    return lines, lines.append


def segments(stream: np.ndarray, eot: int) -> list[np.ndarray]:
    """Split a token stream at end-of-text tokens (each document ends with one)."""
    cuts = np.flatnonzero(stream == eot)
    assert cuts.size and cuts[-1] == len(stream) - 1, "a split must end with end-of-text"
    return np.split(stream, cuts + 1)[:-1]


# ----------------------------------------------------------------------------------------------
# Preparation and cache


def test_prepare_writes_manifest_shards_and_tokenizer(prepared, corpus_dir):
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert (prepared / "tokenizer.model").exists() and (prepared / "val.txt").exists()
    assert manifest["tokenizer"]["vocab_size"] == VOCAB
    assert manifest["docs"]["train"] + manifest["docs"]["val"] == len(list(corpus_dir.glob("*.py")))
    assert manifest["docs"]["val"] >= 1
    dtype = np.dtype(manifest["dtype"])
    for split in ("train", "val"):
        shards = manifest["shards"][split]
        assert shards
        sizes = [(prepared / s["file"]).stat().st_size // dtype.itemsize for s in shards]
        assert sizes == [s["tokens"] for s in shards]
        assert sum(sizes) == manifest["tokens"][split]
    assert manifest["bytes"]["val"] == (prepared / "val.txt").stat().st_size
    # ~ 3 bytes per token on code with a 512-piece vocabulary: it is a real BPE, not bytes
    assert 1.5 < manifest["bytes"]["train"] / manifest["tokens"]["train"] < 6


def test_second_prepare_reuses_the_cache(prepared, tiny_cfg):
    tok = prepared / "tokenizer.model"
    before = (tok.stat().st_mtime_ns, (prepared / "manifest.json").read_bytes())
    lines, log = logger()
    again = data.prepare(tiny_cfg.data, VOCAB, log=log)
    assert again == prepared
    assert any("reusing" in line for line in lines), lines
    assert (tok.stat().st_mtime_ns, (prepared / "manifest.json").read_bytes()) == before
    # another vocabulary size is another cache
    assert data.data_dir_for(tiny_cfg.data, VOCAB * 2) != prepared


def test_changed_source_is_rebuilt(corpus_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(corpus_dir.glob("*.py"))[:8]:
        shutil.copyfile(p, src / p.name)
    cfg = DataConfig(source="text", paths=(f"{src}/*.py",), cache_dir=str(tmp_path / "cache"),
                     tokenizer_sample_bytes=100_000)
    first = data.prepare(cfg, VOCAB, log=lambda _: None)
    old = json.loads((first / "manifest.json").read_text())

    victim = sorted(src.glob("*.py"))[0]
    victim.write_text(victim.read_text() + "\n# an edit\n")
    lines, log = logger()
    second = data.prepare(cfg, VOCAB, log=log)
    assert second == first  # same place: the cache is keyed by the source spec, checked by content
    assert any("source changed" in line and "rebuilding" in line for line in lines), lines
    new = json.loads((second / "manifest.json").read_text())
    assert new["source_hash"] != old["source_hash"]
    assert new["bytes"]["train"] + new["bytes"]["val"] > old["bytes"]["train"] + old["bytes"]["val"]
    # no temporary build directories are left beside it
    assert [p.name for p in second.parent.iterdir()] == [second.name]

    # a deleted shard is noticed too
    (second / new["shards"]["train"][0]["file"]).unlink()
    lines, log = logger()
    data.prepare(cfg, VOCAB, log=log)
    assert any("incomplete" in line for line in lines), lines
    assert (second / new["shards"]["train"][0]["file"]).exists()


# ----------------------------------------------------------------------------------------------
# Tokenizer and documents


def test_tokenizer_round_trips_arbitrary_text(token_data):
    tok = token_data.tokenizer
    texts = [
        "",
        "def f(x):\n\treturn x  # tab\n",
        "\t\t  mixed \t indentation\r\n\r\nwindows newlines\n\n\n",
        "   leading and trailing spaces   ",
        "unicode: café, naïve, 日本語, Ελληνικά, emoji 🚀🐍, combining e\u0301, zero\u200bwidth",
        "digits 1234567890 and 3.14159e-10",
        "<|endoftext|> is just text here",
    ]
    rng = random.Random(0)
    alphabet = "abcXYZ019 \t\n\r{}()[]:;'\"\\#é中🙂\u00a0\x0b\x0c"
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))) for _ in range(50)]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.eot_id not in ids and tok.pad_id not in ids
        assert all(0 <= i < VOCAB for i in ids)
    assert tok.vocab_size == VOCAB
    assert tok.decode([tok.eot_id, tok.pad_id]) == ""


def test_end_of_text_separates_whole_documents(token_data, corpus_dir):
    tok = token_data.tokenizer
    originals = sorted(p.read_text() for p in corpus_dir.glob("*.py"))
    decoded = []
    for split in ("train", "val"):
        (stream,) = token_data.shards[split]
        docs = segments(np.asarray(stream), tok.eot_id)
        assert len(docs) == token_data.manifest["docs"][split]
        decoded += [tok.decode(d) for d in docs]
    assert sorted(decoded) == originals  # every document exactly once, byte for byte
    val_text = (token_data.path / "val.txt").read_text()
    (val_stream,) = token_data.shards["val"]
    assert val_text == "\n".join(tok.decode(d) for d in segments(np.asarray(val_stream), tok.eot_id))


def test_validation_membership_is_a_hash_of_content():
    texts = [f"document number {i}\n" for i in range(2000)]
    held = [data.is_validation(t, 0.1) for t in texts]
    assert 0.07 < np.mean(held) < 0.13
    assert held == [data.is_validation(t, 0.1) for t in texts]
    assert all(not data.is_validation(t, 1e-9) for t in texts[:100])


# ----------------------------------------------------------------------------------------------
# Batches


def test_batch_is_a_pure_function_of_seed_and_step(token_data):
    a = token_data.batch(0, 5, 8, 32)
    assert a.shape == (8, 33) and a.dtype == np.int32
    np.testing.assert_array_equal(a, token_data.batch(0, 5, 8, 32))
    assert not np.array_equal(a, token_data.batch(0, 6, 8, 32))
    assert not np.array_equal(a, token_data.batch(1, 5, 8, 32))
    assert not np.array_equal(token_data.batch(0, 5, 8, 32, split="val"), a)
    # every row is a contiguous window of the training stream
    (stream,) = token_data.shards["train"]
    windows = np.lib.stride_tricks.sliding_window_view(np.asarray(stream, np.int32), 33)
    for row in a:
        assert (windows == row).all(axis=1).any()


@pytest.mark.parametrize("processes", [2, 4, 8])
def test_process_slices_concatenate_to_the_global_batch(token_data, processes):
    full = token_data.batch(3, 11, 8, 32)
    parts = [token_data.batch(3, 11, 8, 32, process_index=i, process_count=processes) for i in range(processes)]
    assert all(p.shape == (8 // processes, 33) for p in parts)
    np.testing.assert_array_equal(np.concatenate(parts), full)


def test_batch_errors(token_data):
    with pytest.raises(DataError, match="not divisible by 3 processes"):
        token_data.batch(0, 0, 8, 32, process_count=3)
    with pytest.raises(DataError, match="fewer than .* tokens"):
        token_data.batch(0, 0, 8, token_data.tokens("val") + 10, split="val")


def test_eval_windows_cover_every_token_once(token_data):
    for seq_len, batch_size in ((32, 8), (7, 3)):
        streams = token_data.shards["val"]
        weight_sum, targets = 0.0, []
        for toks, w in token_data.eval_windows(seq_len=seq_len, batch_size=batch_size):
            assert toks.shape == (batch_size, seq_len + 1) and w.shape == (batch_size, seq_len)
            assert set(np.unique(w)) <= {0.0, 1.0}
            weight_sum += w.sum()
            targets.append(toks[:, 1:][w > 0])
        assert weight_sum == token_data.tokens("val") - len(streams)
        # the weighted targets are the stream's tokens after the first, in order
        np.testing.assert_array_equal(np.concatenate(targets), np.concatenate([np.asarray(s[1:]) for s in streams]))


def test_eval_windows_of_given_tokens(token_data):
    toks = np.arange(100) % 50
    rows = list(token_data.eval_windows(toks, seq_len=16, batch_size=4))
    assert sum(w.sum() for _, w in rows) == 99
    first_tokens, first_w = rows[0]
    np.testing.assert_array_equal(first_tokens[0], toks[:17])
    np.testing.assert_array_equal(first_tokens[1], toks[16:33])  # stride T: each target predicted once
    assert list(data.windows([np.arange(1)], 8, 2)) == []


# ----------------------------------------------------------------------------------------------
# Sources and their errors


def test_jsonl_source(corpus_dir, tmp_path):
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.py"))[:8]]
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)]
    lines.insert(3, "   ")  # blank lines are allowed
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source="jsonl", paths=(str(path),), text_field="body", cache_dir=str(tmp_path / "cache"),
                     tokenizer_sample_bytes=100_000)
    assert [t for _, t in data.iter_documents(cfg)] == texts
    out = data.prepare(cfg, VOCAB, log=lambda _: None)
    td = data.TokenData(out)
    assert td.manifest["docs"]["train"] + td.manifest["docs"]["val"] == len(texts)
    decoded = [td.tokenizer.decode(d) for sp in ("train", "val")
               for d in segments(np.asarray(td.shards[sp][0]), td.tokenizer.eot_id)]
    assert sorted(decoded) == sorted(texts)


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n{"text": "never read"}\n')
    cfg = DataConfig(source="jsonl", paths=(str(path),), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=f"{path}:3 is not valid JSON"):
        data.prepare(cfg, VOCAB, log=lambda _: None)
    path.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(DataError, match=f"{path}:2 has no string field 'text'.*data.text_field"):
        data.prepare(cfg, VOCAB, log=lambda _: None)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("manifest.json"))


def test_glob_matching_nothing_is_an_error(tmp_path):
    cfg = DataConfig(source="text", paths=(str(tmp_path / "nothing" / "*.txt"),), cache_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"data.paths entry '.*nothing/\*.txt' matches no file"):
        data.prepare(cfg, VOCAB, log=lambda _: None)


def test_too_small_corpus_and_missing_cache_are_clear_errors(tmp_path):
    (tmp_path / "a.txt").write_text("only one document")
    cfg = DataConfig(source="text", paths=(str(tmp_path / "a.txt"),), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="at least two documents"):
        data.prepare(cfg, VOCAB, log=lambda _: None)
    (tmp_path / "b.txt").write_text("and another one")
    cfg = dataclasses.replace(cfg, paths=(str(tmp_path / "*.txt"),))
    with pytest.raises(DataError, match="model.vocab_size=512"):
        data.prepare(cfg, VOCAB, log=lambda _: None)
    with pytest.raises(DataError, match="too small"):
        data.prepare(cfg, 100, log=lambda _: None)
    with pytest.raises(DataError, match="manifest.json missing"):
        data.TokenData(tmp_path)
