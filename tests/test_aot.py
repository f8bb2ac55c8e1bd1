"""Ahead-of-time compilation: the training step compiled for a TPU topology on this CPU machine (libtpu),
per-device memory that falls as FSDP grows, "does not fit" reported as a result, and train.py's
--compile-only command with its errors; a PPO iteration (update and reward scoring, four models) likewise."""

from __future__ import annotations

import json
import logging

import jax
import pytest
from conftest import run_script

from gptjax import aot, attention, config

# The smallest model splash attention can tile (T a multiple of 128), dense and banded layers, scanned.
AOT_MODEL = ["model.n_layer=2", "model.d_model=128", "model.n_head=2", "model.block_size=128",
             "model.vocab_size=512", "model.attention_pattern=dense,banded", "model.local_window=32",
             "model.scan_layers=true", "batch_size=8"]


@pytest.fixture(scope="module")
def v5e_2x2():
    return aot.topology_devices("v5e:2x2")


def test_train_step_compiles_for_a_tpu_topology_with_splash_attention(v5e_2x2, caplog):
    assert len(v5e_2x2) == 4 and v5e_2x2[0].platform == "tpu"
    cfg = config.resolve("tiny", AOT_MODEL + ["model.dtype=bfloat16", "mesh.fsdp=2", "mesh.tensor=2",
                                              "mesh.rules=fsdp_tp"])
    attention._said.clear()
    with caplog.at_level(logging.WARNING, logger="gptjax.attention"):
        r = aot.compile_step(cfg, v5e_2x2, topology="v5e:2x2")
    assert not caplog.records, "splash attention fell back: " + caplog.records[0].getMessage()
    assert r["attention_impl"] == "splash"  # "auto" resolved for the target, not for this CPU
    assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
    assert r["hbm_gib"] == 16 and r["fits"] is True
    assert 0 < r["total_gib"] < 1 and r["argument_gib"] > 0 and r["temp_gib"] > 0
    assert r["xla_flops_per_step"] > 0 and r["kernel_flops_per_step"] > 0
    assert 0.3 < r["mfu_ceiling"] <= 1.0
    text = aot.describe(r)
    assert "v5e:2x2" in text and "fits" in text and "MFU ceiling" in text


def test_a_model_too_big_for_the_chips_is_reported_not_raised(v5e_2x2):
    # ~7B parameters of float32 weights + Adam state over 4 chips of 16 GiB
    cfg = config.resolve("tiny", ["model.n_layer=2", "model.d_model=16384", "model.n_head=128",
                                  "model.block_size=128", "model.vocab_size=512", "batch_size=4"])
    r = aot.compile_step(cfg, v5e_2x2, topology="v5e:2x2")
    assert r["fits"] is False
    assert r["total_gib"] > 16, r
    assert "DOES NOT FIT" in aot.describe(r)


def test_per_device_state_memory_falls_as_fsdp_grows():
    """Parameters + optimizer state per device ~ total / fsdp (the batch per device stays the same). One layer:
    every kind of parameter (embeddings, attention, MLP, norms) is there, in about half two layers' compile time."""
    args = {}
    for fsdp in (1, 2, 4, 8):
        cfg = config.resolve("tiny", AOT_MODEL + ["model.attention_pattern=dense", f"mesh.fsdp={fsdp}", "mesh.data=-1",
                                                  "model.vocab_size=4096", "model.scan_layers=false",
                                                  "model.n_layer=1"])
        args[fsdp] = aot.compile_step(cfg, jax.devices())["argument_gib"]
    batch_gib = 8 / 8 * 129 * 4 / 2**30  # int32 tokens, one sequence per device
    state = {f: a - batch_gib for f, a in args.items()}
    for f in (2, 4, 8):
        assert abs(state[f] - state[1] / f) / (state[1] / f) < 0.1, state


def test_compiler_flops_count_every_micro_batch_and_every_scanned_layer():
    """XLA counts a loop body once; the report corrects for both loops of the step. The micro-batched step has
    twice the plain step's batch in two micro-batches of the plain step's size: the programs the report compiles
    for one of its micro-batches (scanned, and two layers unrolled) are then the scanned step's own, found in
    the session's compilation cache, and it must count twice the plain step's FLOPs."""
    base = AOT_MODEL + ["model.attention_pattern=dense", "model.n_layer=4"]
    configs = {"plain": ["model.scan_layers=false"], "scanned": ["model.scan_layers=true"],
               "micro": ["model.scan_layers=true", "micro_batches=2", "batch_size=16"]}
    flops, tokens = {}, {}
    for name, extra in configs.items():
        cfg = config.resolve("tiny", base + extra)
        r = aot.compile_step(cfg, jax.devices()[:1])
        flops[name], tokens[name] = r["xla_flops_per_step"], cfg.tokens_per_step
        assert r["model_flops_per_step"] == flops_model(base + extra)
    per_token = {name: f / tokens[name] for name, f in flops.items()}
    assert tokens["micro"] == 2 * tokens["plain"] == 2 * tokens["scanned"]
    assert flops_model(base + configs["micro"]) == 2 * flops_model(base)
    assert abs(per_token["scanned"] / per_token["plain"] - 1) < 0.01, flops
    assert abs(per_token["micro"] / per_token["plain"] - 1) < 0.02, flops
    assert 0.9 < flops_model(base) / flops["plain"] <= 1.0  # the analytic count misses only elementwise work


def flops_model(overrides):
    from gptjax import flops as flops_lib

    cfg = config.resolve("tiny", overrides)
    return flops_lib.flops_per_token(cfg.model) * cfg.tokens_per_step


def test_compile_only_command(tmp_path):
    # the command, not the kernels (the in-process test above compiles both attention layers): one dense layer,
    # which compiles for the TPU in about half the time of AOT_MODEL's two
    out = tmp_path / "r.json"
    proc = run_script("train.py", "--config", "tiny", *AOT_MODEL, "model.n_layer=1", "model.attention_pattern=dense",
                      "--compile-only", "--topology", "v5e:2x2", "--json", out, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fits" in proc.stdout and not (tmp_path / "runs").exists()
    r = json.loads(out.read_text())
    assert r["devices"] == 4 and r["fits"] is True and r["attention_impl"] == "splash"


@pytest.mark.parametrize("argv, message", [
    (["--topology", "v5e:2x2"], "--compile-only"),
    (["--compile-only", "--topology", "v5e"], "not a TPU topology"),
    (["--compile-only", "--topology", "v99:2x2"], "does not know the topology"),
])
def test_compile_only_errors_are_one_line(argv, message):
    proc = run_script("train.py", "--config", "tiny", *AOT_MODEL, *argv, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# PPO's iteration (gptjax/rlhf/ppo_aot.py): the update and the reward model's scoring, four models resident

PPO_MODEL = ["model.n_layer=1", "model.d_model=128", "model.n_head=2", "model.block_size=128",
             "model.vocab_size=512", "model.attention_pattern=dense"]


def _ppo_cfg(*extra):
    from gptjax.rlhf.config import resolve_ppo

    return resolve_ppo(["init_from=<compile-only>", "reward=<compile-only>", "prompts=8", "minibatch=8",
                        "ppo_epochs=1", *extra])


def test_ppo_compile_only_command_compiles_for_a_tpu_topology(v5e_2x2, tmp_path):
    """Through the command (in this process: libtpu's devices are already open): the update and the reward
    model's scoring compile for v5e:2x2 with PPO-ptx, splash attention and per-chip memory of the four models."""
    from conftest import run_main

    from gptjax.cli.rlhf import main

    out = tmp_path / "ppo.json"
    proc = run_main(main, "ppo", "--compile-only", "--topology", "v5e:2x2", "--policy", "tiny",
                    *[f"--model-override={o}" for o in PPO_MODEL + ["model.dtype=bfloat16"]], "--json", out,
                    "prompts=8", "minibatch=8", "ppo_epochs=1", "mesh.fsdp=4", "ptx_coef=1", "ptx_batch=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["attention_impl"] == "splash" and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert r["topology"] == "v5e:2x2" and r["policy"] == r["value"] == "tiny"
    assert r["hbm_gib"] == 16 and r["fits"] is True and r["ptx_batch"] == 4 and r["score_rows"] == 64
    for prog in ("update", "score"):
        assert r[prog]["total_gib"] > 0 and r[prog]["argument_gib"] > 0 and r[prog]["temp_gib"] >= 0
    res = r["resident_gib"]
    # the reward and value models share the policy's size here: parameters once, or with two Adam moments
    assert res["reward"] == pytest.approx(res["reference"], rel=0.01)
    assert res["policy_state"] == pytest.approx(3 * res["reference"], rel=0.01)
    assert res["value_state"] == pytest.approx(3 * res["reward"], rel=0.01)
    # the update's arguments are the policy and value states and the reference, plus the rollout batch
    assert r["update"]["argument_gib"] >= res["policy_state"] + res["value_state"] + res["reference"]
    assert r["peak_gib"] == pytest.approx(max(r["update"]["total_gib"] + res["reward"], r["score"]["total_gib"]
                                              + res["policy_state"] + res["value_state"] + res["reference"]))
    assert "v5e:2x2" in proc.stdout and "reward model" in proc.stdout and "-> fits" in proc.stdout


def test_ppo_resident_memory_per_device_falls_as_fsdp_grows():
    from gptjax.rlhf import ppo_aot

    policy = ppo_aot.model_from_preset("tiny", PPO_MODEL + ["model.attention_impl=reference"])
    res = {f: ppo_aot.compile_ppo(_ppo_cfg(f"mesh.fsdp={f}", "mesh.data=-1"), policy, policy, jax.devices(),
                                  programs=())["resident_gib"]["total"] for f in (1, 8)}
    assert res[8] < res[1] / 4, res  # embeddings, projections and Adam moments all split 8 ways (norms do not)


def test_ppo_compile_only_errors_are_one_line():
    from conftest import run_main

    from gptjax.cli.rlhf import main

    for argv, message in ((["ppo", "--topology", "v5e:2x2"], "--topology only applies to --compile-only"),
                          (["ppo", "--compile-only"], "needs the policy's preset: --policy"),
                          (["ppo", "--compile-only", "--policy", "tiny", "--model-override", "dtype=bf16"],
                           "give model.KEY=VALUE"),
                          (["ppo", "--compile-only", "runs/sft", "--policy", "tiny"], "reads no run")):
        p = run_main(main, *argv)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
