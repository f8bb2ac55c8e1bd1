"""Mixtures: one tokenizer for every source, each source its own cache and held-out split, and rows drawn from
the sources in proportion to their weights, as a pure function of (seed, step)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import VOCAB

from gptjax import data
from gptjax.config import DataConfig, MixtureSource
from gptjax.data import DataError


@pytest.fixture(scope="module")
def mixture(corpus_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    files = sorted(corpus_dir.glob("*.py"))
    for name, part in (("a", files[:10]), ("b", files[10:])):
        (root / name).mkdir()
        for p in part:
            shutil.copyfile(p, root / name / p.name)
    cfg = DataConfig(cache_dir=str(root / "cache"), tokenizer_sample_bytes=100_000, mixture=(
        MixtureSource(name="a", weight=0.7, paths=(f"{root}/a/*.py",)),
        MixtureSource(name="b", weight=0.3, paths=(f"{root}/b/*.py",))))
    lines: list[str] = []
    entries = data.prepare_mixture(cfg, VOCAB, log=lines.append)
    return cfg, entries, lines


def test_every_source_gets_its_own_cache_with_one_shared_tokenizer(mixture):
    cfg, entries, lines = mixture
    assert [e["name"] for e in entries] == ["a", "b"] and len({e["data_dir"] for e in entries}) == 2
    m = data.Mixture(entries)
    assert len({p.manifest["tokenizer"]["sha256"] for p in m.parts}) == 1
    # each source holds out its own documents, and only its own
    for part, s in zip(m.parts, cfg.mixture):
        own = data.split_documents(DataConfig(source="text", paths=s.paths))
        assert (part.path / "val.txt").read_text() == "\n".join(own[1]) and part.manifest["docs"]["train"] == len(own[0])
    assert m.tokens("val") == sum(p.tokens("val") for p in m.parts)
    again: list[str] = []
    assert data.prepare_mixture(cfg, VOCAB, log=again.append) == entries
    assert not any("training one tokenizer" in x for x in again) and sum("reusing" in x for x in again) == 2


def test_rows_follow_the_weights_and_come_from_their_source(mixture):
    _, entries, _ = mixture
    m = data.Mixture(entries)
    B, T, steps = 16, 16, 500
    shares = np.concatenate([m.sources(0, s, B) for s in range(steps)])
    n = shares.size
    assert abs((shares == 0).mean() - 0.7) < 4 * np.sqrt(0.21 / n)  # within 4 standard errors
    streams = [np.concatenate(p.shards["train"]) for p in m.parts]
    for s in range(3):
        batch, which = m.batch(0, s, B, T), m.sources(0, s, B)
        for row, c in zip(batch, which):
            stream = streams[c]
            hits = np.flatnonzero(stream[:len(stream) - T] == row[0])
            assert any(np.array_equal(stream[h:h + T + 1], row) for h in hits), (s, c)
    # a pure function of (seed, step); the processes' rows make up the global batch
    assert np.array_equal(m.batch(0, 7, B, T), m.batch(0, 7, B, T))
    halves = [m.batch(0, 7, B, T, process_index=i, process_count=2) for i in range(2)]
    assert np.array_equal(np.concatenate(halves), m.batch(0, 7, B, T))
    assert not np.array_equal(m.batch(1, 7, B, T), m.batch(0, 7, B, T))
    with pytest.raises(DataError, match="data.sampling=random"):
        m.batch(0, 0, B, T, sampling="epoch")


def test_a_run_on_a_mixture_reports_each_sources_heldout_loss(mixture, tmp_path):
    import json

    from conftest import TINY_MODEL

    from gptjax import config as config_lib
    from gptjax.train.pretrain import pretrain

    cfg, entries, _ = mixture
    preset = tmp_path / "mix.json"  # a mixture is written in a config file: a list of sources
    preset.write_text(json.dumps({"data": {"cache_dir": cfg.cache_dir, "tokenizer_sample_bytes": 100_000,
                                           "mixture": [config_lib.to_dict(s) for s in cfg.mixture]}}))
    run = tmp_path / "run"
    summary = pretrain(config_lib.resolve(str(preset), TINY_MODEL + [
        f"run_dir={run}", "steps=2", "optim.warmup_steps=1", "sample_tokens=0", "eval_every=1", "eval_batches=2"]),
        log=lambda *a, **k: None)
    for name in ("a", "b"):
        assert np.isfinite(summary[f"val_loss/{name}"]) and np.isfinite(summary[f"val_bits_per_byte/{name}"])
    assert summary["val_loss/a"] != summary["val_loss/b"]
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "val_loss/a" in x]
    assert [e["step"] for e in evals] == [1, 2]  # the evaluation at step 1, and the final one
    assert json.loads((run / "data.json").read_text())["mixture"] == entries



def test_a_mixture_on_the_command_line(tmp_path):
    from gptjax import config as config_lib
    from gptjax.errors import ConfigError

    mix = [{"name": "web", "weight": 0.7, "source": "jsonl", "paths": ["web/*.jsonl.zst"]},
           {"name": "code", "weight": 0.3, "source": "text", "paths": ["src/**/*.py"]}]
    f = tmp_path / "mix.json"
    f.write_text(json.dumps(mix))
    for value in (str(f), json.dumps(mix)):
        cfg = config_lib.resolve("tiny", [f"data.mixture={value}"])
        assert [(s.name, s.weight, s.paths) for s in cfg.data.mixture] == [
            ("web", 0.7, ("web/*.jsonl.zst",)), ("code", 0.3, ("src/**/*.py",))]
    assert config_lib.resolve("tiny", ["data.mixture="]).data.mixture == ()
    bad = [({"name": "a", "weight": 1, "pathz": ["x"]}, "unknown config key 'data.mixture\\[0\\].pathz'"),
           ({"name": "a b", "paths": ["x"]}, "names must be non-empty"),
           ({"name": "a", "weight": -1, "paths": ["x"]}, "weights must be positive")]
    for entry, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            config_lib.resolve("tiny", [f"data.mixture={json.dumps([entry])}"])
    with pytest.raises(ConfigError, match="no file"):
        config_lib.resolve("tiny", ["data.mixture=nowhere.json"])
    with pytest.raises(ConfigError, match="epoch is for a single source"):
        config_lib.resolve("tiny", [f"data.mixture={f}", "data.sampling=epoch"])
