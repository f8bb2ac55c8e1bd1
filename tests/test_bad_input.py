"""Bad input gets one clear line naming the fix: config values, object-store paths, sampling settings, prompts
that are not UTF-8, corrupt JSON in a run directory. Most checks run in-process through the commands' main()."""

from __future__ import annotations

import json

import pytest

from gptjax import config as config_lib
from gptjax.cli import eval as eval_cli
from gptjax.cli import finetune as finetune_cli
from gptjax.cli import sample as sample_cli
from gptjax.cli import train as train_cli
from gptjax.errors import ConfigError, GenerationError
from gptjax.finetune import config as ft_config
from gptjax.generate import check_sampling, unescape


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


@pytest.mark.parametrize("override, says", [
    ("batch_size=0", "batch_size must be positive"),
    ("model.n_head=0", "model.n_head must be positive"),
    ("log_every=0", "log_every must be positive"),
    ("optim.lr=-1", "optim.lr must be positive"),
    ("optim.lr=0", "optim.lr must be positive"),
    ("optim.warmup_steps=-5", "optim.warmup_steps must be >= 0"),
    ("optim.b2=1.5", "optim.b1 and optim.b2 must be in [0, 1)"),
    ("temperature=-1", "temperature must be >= 0"),
    ("eval_every=-1", "eval_every must be >= 0"),
    ("model.d_model=0", "model.d_model must be positive"),
    ("mesh.fsdp=0", "mesh sizes must be positive"),
    ("profile.steps=-1", "profile.start_step and profile.steps must be >= 0"),
    ("log.wandb_mode=cloud", "log.wandb_mode must be one of"),
])
def test_bad_train_values_are_refused_naming_the_key(override, says):
    with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        config_lib.resolve("tiny", [override])


def test_bad_value_from_the_command_line_is_one_line_and_exit_2(capsys):
    assert train_cli.main(["batch_size=0"]) == 2
    assert "batch_size must be positive" in one_error_line(capsys)


@pytest.mark.parametrize("override", ["optim.lr=-1", "batch_size=0", "log_every=0", "optim.warmup_steps=-1"])
def test_bad_finetune_values_are_refused(override):
    with pytest.raises(ConfigError):
        ft_config.resolve(["init_from=runs/x", "task=code-package", override])


@pytest.mark.parametrize("key", ["run_dir", "init_from", "data.cache_dir"])
def test_object_store_paths_are_refused_with_how_to_mount(key):
    with pytest.raises(ConfigError, match=r"gs:// paths are not supported; mount the bucket") as e:
        config_lib.resolve("tiny", [f"{key}=gs://bucket/run", "run_dir=runs/x"] if key != "run_dir"
                           else [f"{key}=gs://bucket/run"])
    assert f"{key}=/mnt/BUCKET/" in str(e.value)


def test_object_store_corpus_and_finetune_paths_are_refused():
    with pytest.raises(ConfigError, match="s3:// paths are not supported"):
        config_lib.resolve("tiny", ["data.source=text", "data.paths=s3://b/*.txt"])
    for key in ("task", "run_dir", "init_from"):
        args = {"init_from": "runs/x", "task": "code-package", key: "gs://b/x"}
        with pytest.raises(ConfigError, match="gs:// paths are not supported"):
            ft_config.resolve([f"{k}={v}" for k, v in args.items()])


def test_local_paths_with_colons_are_not_mistaken_for_object_stores():
    cfg = config_lib.resolve("tiny", ["run_dir=runs/a:b", "data.cache_dir=/tmp/c:d"])
    assert cfg.run_dir == "runs/a:b"


@pytest.mark.parametrize("kw, says", [
    (dict(temperature=-1.0, top_k=0, top_p=1.0), "temperature must be >= 0"),
    (dict(temperature=float("nan"), top_k=0, top_p=1.0), "temperature must be >= 0"),
    (dict(temperature=1.0, top_k=-3, top_p=1.0), "top_k must be >= 0"),
    (dict(temperature=1.0, top_k=0, top_p=0.0), "top_p must be in"),
])
def test_sampling_settings_that_would_sample_wrong_are_refused(kw, says):
    with pytest.raises(GenerationError, match=says):
        check_sampling(**kw)
    check_sampling(temperature=0.0, top_k=0, top_p=1.0)  # greedy is fine


def test_sample_refuses_negative_temperature_before_loading_anything(capsys, tmp_path):
    # the run directory does not even exist: the settings are checked first
    assert sample_cli.main([str(tmp_path / "nowhere"), "--temperature", "-1"]) == 2
    assert "temperature must be >= 0" in one_error_line(capsys)


def test_prompt_that_is_not_utf8_is_one_line_not_a_tokenizer_crash(capsys, tmp_path):
    prompt = b"\xff\xfedef f(".decode("utf-8", "surrogateescape")  # how Python hands over such argv bytes
    with pytest.raises(GenerationError, match=r"not valid UTF-8 \(byte 0xff at position 0\)"):
        unescape(prompt)
    assert sample_cli.main([str(tmp_path / "nowhere"), "--prompt", prompt]) == 2
    assert "the prompt is not valid UTF-8" in one_error_line(capsys)
    assert eval_cli.main([str(tmp_path / "nowhere"), "--prompt", "ok", "--stop", prompt]) == 2
    assert "a --stop text is not valid UTF-8" in one_error_line(capsys)
    assert unescape("déf\\n") == "déf\n"  # real Unicode is untouched


def test_corrupt_config_json_is_one_line_naming_the_checkpoint_copy(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"model": {"n_layer": ')  # torn
    assert train_cli.main([f"run_dir={run}", "steps=1"]) == 2
    line = one_error_line(capsys)
    assert "config.json is not valid JSON" in line and "checkpoints/STEP/config/metadata" in line
    # as a parent of init_from, and as a fine-tuned run being evaluated
    assert train_cli.main([f"init_from={run}", f"run_dir={tmp_path / 'child'}"]) == 2
    assert "config.json is not valid JSON" in one_error_line(capsys)
    (run / "finetune.json").write_text("{}")
    assert eval_cli.main([str(run)]) == 2
    assert "config.json is not valid JSON" in one_error_line(capsys)
    (run / "config.json").write_text("[1, 2]")
    assert train_cli.main([f"run_dir={run}", "steps=1"]) == 2
    assert "holds no config" in one_error_line(capsys)


def test_finetune_cli_bad_value_is_one_line(capsys):
    assert finetune_cli.main(["runs/x", "--task", "code-package", "optim.lr=-0.1"]) == 2
    assert "optim.lr must be positive" in one_error_line(capsys)


def test_read_json_reports_file_and_fix(tmp_path):
    p = tmp_path / "manifest.json"
    p.write_bytes(b"\xff\x00garbage")
    with pytest.raises(ConfigError, match="manifest.json is not valid JSON.*; rebuild it"):
        config_lib.read_json(p, "the token cache", "rebuild it")
    p.write_text(json.dumps({"a": 1}))
    assert config_lib.read_json(p, "x") == {"a": 1}
