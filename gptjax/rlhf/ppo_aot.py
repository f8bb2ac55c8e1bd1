"""Ahead-of-time compilation of a PPO iteration for this machine's devices or a TPU topology we do not have, as
`train.py --compile-only` does for pretraining:

    python rlhf.py ppo --compile-only --topology v5p:8x8x8 --policy gpt3-xl --value gpt3-6.7b \\
        --model-override model.dtype=bfloat16 --model-override model.remat=full prompts=512 minibatch=64

InstructGPT's setting: a 1.3B (or 6B, 175B) policy with a 6B reward model and a 6B value model initialised from
it. Nothing is allocated and no run is read: the models come from presets, every array is abstract and carries
its sharding (the pretraining rules for all four models), and XLA compiles two real programs of the PPO stage
for the target chips:
  update  one PPO iteration's update (ppo_stage.Models.iterate: the rollout batch's log-probs under policy and
          reference, values, GAE, then ppo_epochs epochs of minibatch steps of policy and value with AdamW), with
          the policy and value states donated; its arguments are the policy, value (parameters and Adam state)
          and reference parameters
  score   the reward model's scoring of the rollouts (reward.make_score), a batch of 64 sequences as the stage
          scores them
From each, XLA's memory analysis per chip (arguments, outputs, temporaries, donated). The four models' parameters
(and the two trained models' Adam state) stay resident on every chip for the whole run, so the peak of an
iteration's update is the update program's memory plus the reward model's parameters, which must fit the chip's
HBM; the scoring runs with the policy, value and reference resident. The report's peak is the larger of
the two. The KV-cache sampler (generation) is not compiled here: its cache is sized by the sampler's batch, not by
the models, and it runs between the two programs above.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax import config as config_lib
from gptjax import flops as flops_lib
from gptjax.aot import _OOM, GIB
from gptjax.attention import resolve_impl
from gptjax.config import ModelConfig
from gptjax.errors import ConfigError
from gptjax.rlhf.config import PPOConfig
from gptjax.sharding import make_mesh


def model_from_preset(preset: str, overrides: list[str]) -> ModelConfig:
    """A preset's model with `model.key=value` overrides (the pretraining config's loader and validation)."""
    bad = [o for o in overrides if not o.startswith("model.")]
    if bad:
        raise ConfigError(f"--model-override {bad[0]}: give model.KEY=VALUE (e.g. model.dtype=bfloat16)")
    return config_lib.resolve(preset, list(overrides)).model


def _memory(compiled) -> dict[str, float]:
    mem = compiled.memory_analysis()
    out = {"argument_gib": mem.argument_size_in_bytes / GIB, "output_gib": mem.output_size_in_bytes / GIB,
           "temp_gib": mem.temp_size_in_bytes / GIB, "alias_gib": mem.alias_size_in_bytes / GIB}
    out["total_gib"] = out["argument_gib"] + out["output_gib"] + out["temp_gib"] - out["alias_gib"]
    return out


def _nbytes_per_device(tree) -> float:
    """Bytes of the largest shard of every leaf of an abstract tree with shardings (what one chip holds)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        n = 1
        for d in shape:
            n *= d
        total += n * jnp.dtype(x.dtype).itemsize
    return total


def _compile(what: str, fn, args, where: str):
    t0 = time.perf_counter()
    try:
        return fn.lower(*args).compile(), time.perf_counter() - t0, None
    except Exception as e:
        msg = str(e)
        if not _OOM.search(msg):
            raise ConfigError(f"the PPO {what} program did not compile for {where}: {type(e).__name__}: "
                              f"{msg.strip().splitlines()[0][:400] if msg.strip() else ''}") from e
        return None, time.perf_counter() - t0, msg.strip().splitlines()[0][:300]


def compile_ppo(cfg: PPOConfig, policy: ModelConfig, value: ModelConfig, devices: list | None = None, *,
                topology: str | None = None, policy_name: str = "", value_name: str = "",
                programs: tuple[str, ...] = ("update", "score")) -> dict[str, Any]:
    """Compile a PPO iteration's update and the reward model's scoring for `devices` (default: this machine's);
    report per-chip memory of each and of the four models' resident parameters. programs=(): only the resident
    memory, from the shardings (nothing compiled)."""
    from gptjax.rlhf.ppo_stage import Models, no_dropout
    from gptjax.rlhf.reward import make_score, param_shardings

    devices = list(devices if devices is not None else jax.devices())
    platform = devices[0].platform
    policy, value = (no_dropout(dataclasses.replace(m, attention_impl=resolve_impl(m.attention_impl, platform)))
                     for m in (policy, value))
    if policy.vocab_size != value.vocab_size:
        raise ConfigError(f"the policy's vocabulary ({policy.vocab_size}) and the reward/value model's "
                          f"({value.vocab_size}) differ: they must read one tokenizer")
    T = min(policy.block_size, value.block_size)
    mesh = make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.rules
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = cfg.prompts * cfg.k
    if cfg.ptx_coef > 0 and cfg.ptx_batch % shards:
        raise ConfigError(f"ptx_batch={cfg.ptx_batch} must be divisible by the {shards} data x fsdp devices")
    if rows % shards or cfg.minibatch % shards or rows % cfg.minibatch:
        raise ConfigError(f"prompts x k = {rows} rollouts and minibatch={cfg.minibatch} must be divisible by the "
                          f"{shards} data x fsdp devices, and the rollouts by the minibatch; change them or the mesh")
    where = topology or f"{len(devices)} x {platform}"
    models = Models(cfg, policy, value, mesh, rules)
    replicated = NamedSharding(mesh, P())
    state, ref = models.abstract_state(), models.abstract_policy()
    tok = jax.ShapeDtypeStruct((rows, T), jnp.int32, sharding=models.tok_sh)
    resp = jax.ShapeDtypeStruct((rows, T), jnp.float32, sharding=models.tok_sh)
    vec = jax.ShapeDtypeStruct((rows,), jnp.float32, sharding=models.vec_sh)
    key_shape = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key_shape.shape, key_shape.dtype, sharding=replicated)
    args = [state, ref, tok, resp, vec, vec, key]
    fn = models.iterate
    if cfg.ptx_coef > 0:
        n_steps = cfg.ppo_epochs * (rows // cfg.minibatch)
        args.append(jax.ShapeDtypeStruct((n_steps, cfg.ptx_batch, T), jnp.int32, sharding=models.ptx_sh))
        fn = models.iterate_ptx
    hbm = flops_lib.device_memory_gib(devices[0])
    report: dict[str, Any] = {
        "policy": policy_name, "value": value_name, "topology": topology, "platform": platform,
        "device_kind": getattr(devices[0], "device_kind", ""), "devices": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "rules": rules,
        "policy_params": flops_lib.param_counts(policy)["total"],
        "value_params": flops_lib.param_counts(value)["total"] + value.d_model + 1,
        "rollouts": rows, "context": T, "minibatch": cfg.minibatch, "ppo_epochs": cfg.ppo_epochs,
        "ptx_batch": cfg.ptx_batch if cfg.ptx_coef > 0 else 0, "dtype": [policy.dtype, value.dtype],
        "remat": [policy.remat, value.remat], "attention_impl": policy.attention_impl, "hbm_gib": hbm,
    }
    rm_shapes, rm_sh = param_shardings(value, mesh, rules)
    rm_params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), rm_shapes, rm_sh)
    score, (row_tok, row_vec) = make_score(value, mesh, rules, rm_sh)
    # as the stage scores: load_reward_model's batch of 64 sequences (a multiple of the shards) at its context
    score_rows = max(shards, -(-64 // shards) * shards)
    score_args = (rm_params, jax.ShapeDtypeStruct((score_rows, value.block_size), jnp.int32, sharding=row_tok),
                  jax.ShapeDtypeStruct((score_rows,), jnp.int32, sharding=row_vec))
    report["score_rows"] = score_rows
    for name, f, a in (("update", fn, args), ("score", score, score_args)):
        if name in programs:
            c, secs, err = _compile(name, f, a, where)
            report[name] = {"compile_s": secs, **(_memory(c) if c else {"fits": False, "error": err})}
    resident = {"policy_state": _nbytes_per_device(state["params"]["policy"])
                + _nbytes_per_device(state["opt_state"]["policy"]),
                "value_state": _nbytes_per_device(state["params"]["value"])
                + _nbytes_per_device(state["opt_state"]["value"]),
                "reference": _nbytes_per_device(ref), "reward": _nbytes_per_device(rm_params)}
    report["resident_gib"] = {k: v / GIB for k, v in resident.items()}
    report["resident_gib"]["total"] = sum(resident.values()) / GIB
    # each program runs with the other models resident: the update with the reward model, the scoring with the
    # policy and value states and the reference
    res = report["resident_gib"]
    peaks = {}
    if "total_gib" in report.get("update", {}):
        peaks["update"] = report["update"]["total_gib"] + res["reward"]
    if "total_gib" in report.get("score", {}):
        peaks["score"] = report["score"]["total_gib"] + res["policy_state"] + res["value_state"] + res["reference"]
    failed = any(name in report and "total_gib" not in report[name] for name in ("update", "score"))
    if peaks:
        report["peak_gib"] = max(peaks.values())
        report["peak_program"] = max(peaks, key=peaks.get)
    report["fits"] = False if failed else None if hbm is None or not peaks else report["peak_gib"] <= hbm
    return report


def describe(r: dict) -> str:
    """The report as a few lines for a person."""
    where = r["topology"] or f"{r['devices']} x {r['device_kind'] or r['platform']}"
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    size = lambda n: f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"  # noqa: E731
    hbm = f" of {r['hbm_gib']:.0f} GiB HBM" if r.get("hbm_gib") else ""
    lines = [f"PPO: policy {r['policy'] or 'model'} ({size(r['policy_params'])}), reward and value "
             f"{r['value'] or 'model'} ({size(r['value_params'])} each), reference = policy's size, on {where}: mesh "
             f"{mesh}, rules {r['rules']}, {r['rollouts']} rollouts x {r['context']} tokens, minibatch "
             f"{r['minibatch']} x {r['ppo_epochs']} epochs" + (f", PPO-ptx {r['ptx_batch']} rows a step"
                                                               if r["ptx_batch"] else "")
             + f", {'/'.join(r['dtype'])}, remat {'/'.join(r['remat'])}"]
    for name in ("update", "score"):
        if name not in r:
            continue
        m = r[name]
        if "total_gib" not in m:
            lines.append(f"{name}: DOES NOT FIT ({m['compile_s']:.1f} s). Compiler: {m.get('error', '')}")
        else:
            lines.append(f"{name}: {m['total_gib']:.2f} GiB per chip (arguments {m['argument_gib']:.2f}, outputs "
                         f"{m['output_gib']:.2f}, temporaries {m['temp_gib']:.2f}, donated {m['alias_gib']:.2f}); "
                         f"compiled in {m['compile_s']:.1f} s")
    res = r["resident_gib"]
    lines.append(f"resident per chip: policy + Adam {res['policy_state']:.2f}, value + Adam {res['value_state']:.2f}, "
                 f"reference {res['reference']:.2f}, reward model {res['reward']:.2f} = {res['total']:.2f} GiB")
    if "peak_gib" in r:
        what = ("the update, with the reward model resident" if r["peak_program"] == "update" else
                "the reward model's scoring, with policy, value and reference resident")
        lines.append(f"peak ({what}): {r['peak_gib']:.2f} GiB per chip{hbm} -> "
                     + ("fits" if r["fits"] else "unknown HBM size" if r["fits"] is None else "DOES NOT FIT"))
    elif r.get("fits") is False:
        lines.append("-> DOES NOT FIT")
    return "\n".join(lines)
