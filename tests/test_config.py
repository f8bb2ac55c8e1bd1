"""Presets, typed dotted overrides, helpful errors, and the JSON round trip."""

from __future__ import annotations

import dataclasses
import json

import pytest

from gptjax import config
from gptjax.config import ConfigError

PRESETS = ["gpt1", "gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "gpt3-small", "gpt3-medium",
           "gpt3-large", "gpt3-xl", "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b", "gpt3-175b", "tiny"]


def test_every_preset_loads_and_validates():
    assert set(PRESETS) <= set(config.list_presets())
    for name in config.list_presets():
        cfg = config.load_preset(name)
        assert isinstance(cfg, config.TrainConfig)
        assert cfg.preset == name
        assert cfg.model.name == name
        assert cfg.model.d_model % cfg.model.n_head == 0
        assert cfg.model.n_layer % len(cfg.model.attention_pattern) == 0


def test_variants_are_data():
    gpt1, gpt2, gpt3 = (config.load_preset(n).model for n in ("gpt1", "gpt2-small", "gpt3-small"))
    assert (gpt1.norm, gpt1.final_norm, gpt1.scaled_resid_init) == ("post", False, False)
    assert (gpt2.norm, gpt2.final_norm, gpt2.scaled_resid_init) == ("pre", True, True)
    assert (gpt1.block_size, gpt2.block_size, gpt3.block_size) == (512, 1024, 2048)
    assert gpt2.vocab_size == gpt3.vocab_size == 50257


def test_resolve_defaults_run_dir_to_the_preset():
    cfg = config.resolve("gpt2-small")
    assert cfg.run_dir == "runs/gpt2-small"
    assert config.resolve("tiny", ["run_dir=/tmp/x"]).run_dir == "/tmp/x"


def test_overrides_are_parsed_to_the_field_type():
    cfg = config.resolve("tiny", [
        "model.n_layer=6", "optim.lr=3e-4", "optim.warmup_steps=1_000", "model.scan_layers=false",
        "checkpoint.async_save=0", "model.attention_pattern=dense,banded", "data.paths=a.txt, b/*.txt",
        "optim.weight_decay=1", "model.dtype=bfloat16", "seed=7",
    ])
    assert cfg.model.n_layer == 6 and type(cfg.model.n_layer) is int
    assert cfg.optim.lr == 3e-4 and type(cfg.optim.lr) is float
    assert cfg.optim.warmup_steps == 1000
    assert cfg.model.scan_layers is False
    assert cfg.checkpoint.async_save is False
    assert cfg.model.attention_pattern == ("dense", "banded")
    assert cfg.data.paths == ("a.txt", "b/*.txt")
    assert cfg.optim.weight_decay == 1.0 and type(cfg.optim.weight_decay) is float
    assert cfg.model.dtype == "bfloat16"
    assert cfg.seed == 7
    # everything not overridden keeps the preset's value
    tiny = config.load_preset("tiny")
    assert cfg.model.d_model == tiny.model.d_model and cfg.optim.b2 == tiny.optim.b2
    # the later override wins
    assert config.resolve("tiny", ["steps=5", "steps=9"]).steps == 9
    assert config.resolve("tiny", ["model.scan_layers=TRUE"]).model.scan_layers is True


@pytest.mark.parametrize("key, suggestion", [
    ("model.n_layers", "model.n_layer"),
    ("n_layers", "model.n_layer"),
    ("optim.warmup", "optim.warmup_steps"),
    ("checkpoint.evry", "checkpoint.every"),
])
def test_unknown_key_suggests_the_nearest(key, suggestion):
    with pytest.raises(ConfigError) as e:
        config.resolve("tiny", [f"{key}=3"])
    msg = str(e.value)
    assert f"unknown config key '{key}'" in msg
    assert f"did you mean '{suggestion}'" in msg


def test_unknown_section_and_section_as_leaf_are_errors():
    with pytest.raises(ConfigError, match="unknown config key 'modle.n_layer'.*did you mean 'model.n_layer'"):
        config.resolve("tiny", ["modle.n_layer=3"])
    with pytest.raises(ConfigError, match="unknown config key 'model'"):
        config.resolve("tiny", ["model=3"])
    with pytest.raises(ConfigError, match="unknown config key 'steps.x'"):
        config.resolve("tiny", ["steps.x=3"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        config.resolve("tiny", ["model.n_layer"])


@pytest.mark.parametrize("override, expects", [
    ("model.n_layer=abc", "expects an integer"),
    ("model.n_layer=2.5", "expects an integer"),
    ("optim.lr=fast", "expects a number"),
    ("model.scan_layers=maybe", "expects true or false"),
])
def test_wrong_type_is_a_config_error(override, expects):
    with pytest.raises(ConfigError) as e:
        config.resolve("tiny", [override])
    assert override.split("=")[0] in str(e.value)
    assert expects in str(e.value)


def test_wrong_type_in_a_preset_file_is_a_config_error():
    with pytest.raises(ConfigError, match="'model.n_layer' expects an integer"):
        config.from_dict(config.TrainConfig, {"model": {"n_layer": True}})
    with pytest.raises(ConfigError, match="'model' must be a mapping"):
        config.from_dict(config.TrainConfig, {"model": 3})
    with pytest.raises(ConfigError, match="unknown config key 'model.heads'"):
        config.from_dict(config.TrainConfig, {"model": {"heads": 3}})


@pytest.mark.parametrize("overrides, fragment", [
    (["model.d_model=100", "model.n_head=3"], "not divisible by model.n_head=3"),
    (["model.attention_pattern=dense,banded", "model.n_layer=3"], "must be a multiple of the attention pattern"),
    (["model.attention_pattern=dense,sparse"], "attention_pattern entries"),
    (["model.norm=middle"], "model.norm"),
    (["model.remat=everything"], "model.remat"),
    (["model.dtype=float16"], "model.dtype"),
    (["model.attention_impl=flash"], "model.attention_impl"),
    (["model.resid_pdrop=1.0"], "resid_pdrop"),
    (["mesh.rules=zero"], "mesh.rules"),
    (["steps=0"], "steps must be positive"),
    (["batch_size=10", "micro_batches=3"], "divisible by micro_batches=3"),
    (["data.source=text"], "data.paths"),
    (["data.val_fraction=0.7"], "val_fraction"),
])
def test_bad_values_are_rejected(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        config.resolve("tiny", overrides)
    assert fragment in str(e.value)


def test_unknown_preset_suggests_the_nearest():
    with pytest.raises(ConfigError, match="unknown preset 'gpt2-smal'; did you mean 'gpt2-small'"):
        config.load_preset("gpt2-smal")


def test_preset_can_be_a_json_path(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"model": {"n_layer": 2, "d_model": 64, "n_head": 2}, "steps": 5}))
    cfg = config.load_preset(str(p))
    assert (cfg.preset, cfg.model.n_layer, cfg.steps) == ("mine", 2, 5)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        config.load_preset(str(bad))


def test_json_round_trip(tmp_path):
    cfg = config.resolve("gpt3-small", [
        "model.attention_pattern=dense,banded", "model.local_window=128", "data.source=text",
        "data.paths=x/*.txt,y.txt", "optim.lr=1.5e-4", "model.scan_layers=false", "run_dir=/tmp/r"])
    path = tmp_path / "config.json"
    config.save_json(cfg, path)
    back = config.load_json(path)
    assert back == cfg
    assert back.model.attention_pattern == ("dense", "banded")
    assert back.data.paths == ("x/*.txt", "y.txt")
    # plain JSON a user can read: nested sections, lists for tuples
    raw = json.loads(path.read_text())
    assert raw["model"]["attention_pattern"] == ["dense", "banded"]
    assert raw["optim"]["lr"] == 1.5e-4
    # and every flattened key of it is a valid override that reproduces the config
    flat = config.flatten(raw)
    overrides = [f"{k}={','.join(v) if isinstance(v, list) else v}" for k, v in flat.items()]
    assert config.resolve("tiny", overrides) == cfg


def test_configs_are_frozen():
    cfg = config.load_preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.n_layer = 3  # type: ignore[misc]
