"""Ahead-of-time compilation of the full training step, for this machine's devices or for a TPU topology
we do not have (`python train.py --config gpt3-175b --compile-only --topology v5p:8x8x16 ...`).

Nothing is allocated: the state and the batch are abstract arrays carrying their shardings, and XLA
compiles the sharded step for the target chips. From the compiled program we report per-chip memory
(arguments, outputs, temporaries, against the chip's HBM), FLOPs per step from the compiler's cost
analysis, and the MFU ceiling they imply. A program that does not fit is a result ("does not fit", with
the numbers the compiler gives), not a crash.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from gptjax import flops as flops_lib
from gptjax import tpu_present
from gptjax.attention import resolve_impl
from gptjax.config import ConfigError, TrainConfig
from gptjax.sharding import make_mesh
from gptjax.train.steps import check_batch_fits_mesh, make_train_steps

GIB = 2**30
_OOM = re.compile(r"(RESOURCE_EXHAUSTED|[Oo]ut of memory|OOM)")


def topology_devices(topology: str) -> list:
    """The devices of a TPU topology such as 'v5e:16x16' or 'v5p:8x8x8', described by libtpu."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise ConfigError("compiling for a TPU topology needs libtpu on this machine: pip install -e '.[tpu]'") from None
    from jax.experimental import topologies

    # We only compile: another process holding libtpu's lock (a test runner, a training job) is no conflict.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if not tpu_present():
        # No TPU here: libtpu would look up this host's accelerator and worker names, find none and print a block of
        # E0000 lines that read as a failure. The compiled program depends only on the topology named below
        # (checked: the same report with and without these), so give it placeholders.
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")

    if not re.match(r"^[A-Za-z0-9_ ]+[:=_][0-9x]+$", topology):
        raise ConfigError(f"--topology '{topology}' is not a TPU topology; write it like v5e:2x2, v5e:16x16 or v5p:8x8x8")
    try:
        return list(topologies.get_topology_desc(topology, "tpu").devices)
    except Exception as e:
        raise ConfigError(f"libtpu does not know the topology '{topology}' ({str(e).splitlines()[0][:200]}); "
                          f"write it like v5e:2x2, v5e:16x16 or v5p:8x8x8") from None


def _kernel_attention_flops(cfg: TrainConfig) -> float:
    """Attention FLOPs per step that run inside Pallas kernels, which XLA's cost analysis cannot see."""
    m = cfg.model
    if m.attention_impl != "splash":
        return 0.0
    passes = 3 + (1 if m.remat != "none" else 0)  # forward, backward (2x), and a recomputed forward
    return passes * flops_lib.attention_flops_per_token(m) * cfg.tokens_per_step


def _compile(cfg: TrainConfig, mesh):
    trainer = make_train_steps(cfg, mesh)
    M, T = cfg.micro_batches, cfg.model.block_size
    batch = jax.ShapeDtypeStruct((M, cfg.batch_size // M, T + 1), jnp.int32, sharding=trainer.batch_sharding)
    return trainer.step.lower(trainer.abstract_state(), batch).compile()


def _xla_flops(cfg: TrainConfig, mesh, compiled) -> float | None:
    """FLOPs per step by XLA's cost analysis, which counts a loop body once however often it runs. Two loops
    need correcting: gradient accumulation over micro-batches, and the scan over layer superblocks."""
    n = mesh.devices.size
    M = cfg.micro_batches
    one = dataclasses.replace(cfg, batch_size=cfg.batch_size // M, micro_batches=1)  # one micro-batch
    flops = _flops(compiled, n) if M == 1 else _flops(_compile(one, mesh), n)
    P = len(cfg.model.attention_pattern)
    G = cfg.model.n_layer // P
    if flops and cfg.model.scan_layers and G > 1:
        # The same step with two superblocks unrolled costs (everything else) + 2 bodies: the difference is one.
        two = dataclasses.replace(one, model=dataclasses.replace(cfg.model, n_layer=2 * P, scan_layers=False))
        flops += (G - 1) * (_flops(_compile(two, mesh), n) - flops)
    # the optimizer update, counted M times here, is a negligible share of a step
    return None if flops is None else M * flops


def _flops(compiled, n_devices: int) -> float | None:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # per device
    return float(cost["flops"]) * n_devices if cost and cost.get("flops") else None


def compile_step(cfg: TrainConfig, devices: list | None = None, *, topology: str | None = None,
                 log=print) -> dict[str, Any]:
    """Compile cfg's training step for `devices` (default: this machine's) and report memory and FLOPs."""
    devices = list(devices if devices is not None else jax.devices())
    platform = devices[0].platform
    # "auto" picks the attention kernel of the target, not of the machine doing the compiling
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, attention_impl=resolve_impl(cfg.model.attention_impl, platform)))
    mesh = make_mesh(cfg.mesh, devices)
    check_batch_fits_mesh(cfg, mesh)
    T = cfg.model.block_size
    hbm = flops_lib.device_memory_gib(devices[0])
    peak = flops_lib.device_peak_flops(devices[0])
    model_flops = flops_lib.flops_per_token(cfg.model) * cfg.tokens_per_step
    report: dict[str, Any] = {
        "preset": cfg.preset, "topology": topology, "platform": platform,
        "device_kind": getattr(devices[0], "device_kind", ""), "devices": len(devices),
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "rules": cfg.mesh.rules,
        "params": flops_lib.param_counts(cfg.model)["total"], "batch_size": cfg.batch_size,
        "micro_batches": cfg.micro_batches, "block_size": T, "dtype": cfg.model.dtype, "remat": cfg.model.remat,
        "attention": ",".join(cfg.model.attention_pattern), "attention_impl": cfg.model.attention_impl,
        "hbm_gib": hbm, "model_flops_per_step": model_flops,
    }
    t0 = time.perf_counter()
    try:
        compiled = _compile(cfg, mesh)
    except Exception as e:
        msg = str(e)
        if not _OOM.search(msg):
            raise ConfigError(f"the training step did not compile for {topology or platform} (attention "
                              f"{cfg.model.attention_impl}, mesh {dict(mesh.shape)}): {type(e).__name__}: "
                              f"{msg.strip().splitlines()[0][:400] if msg.strip() else ''}") from e
        report.update(fits=False, compile_s=time.perf_counter() - t0, error=msg.strip().splitlines()[0][:300])
        # e.g. "Used 29.5G of 15.75G hbm" or "memory required for HLO temporaries (27.48G) exceeds available
        # HBM (15.75G)": the first size is what the step needs
        size = re.search(r"(?:[Uu]sed |\()([0-9.]+)([KMGT])i?B?\)? (?:of|exceeds)", msg)
        if size:
            report["total_gib"] = float(size.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[size.group(2)] / GIB
        return report
    report["compile_s"] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    parts = {"argument_gib": mem.argument_size_in_bytes, "output_gib": mem.output_size_in_bytes,
             "temp_gib": mem.temp_size_in_bytes, "alias_gib": mem.alias_size_in_bytes}
    report.update({k: v / GIB for k, v in parts.items()})
    # donated state is both argument and output: count it once
    report["total_gib"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                           - mem.alias_size_in_bytes) / GIB
    report["fits"] = None if hbm is None else report["total_gib"] <= hbm
    xla_flops = _xla_flops(cfg, mesh, compiled)
    report["compile_s"] = time.perf_counter() - t0
    report["xla_flops_per_step"] = xla_flops
    report["kernel_flops_per_step"] = _kernel_attention_flops(cfg)
    if xla_flops:
        executed = xla_flops + report["kernel_flops_per_step"]
        report["mfu_ceiling"] = min(1.0, model_flops / executed)
        if peak:
            report["min_step_s"] = executed / (peak * len(devices))
    return report


def describe(r: dict) -> str:
    """The report as a few lines for a person."""
    where = r["topology"] or f"{r['devices']} x {r['device_kind'] or r['platform']}"
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items())
    size = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e9 else f"{r['params'] / 1e6:.1f}M"
    lines = [f"{r['preset']} ({size} parameters) on {where}: mesh {mesh}, rules {r['rules']}, "
             f"batch {r['batch_size']} x {r['block_size']} ({r['micro_batches']} micro-batches), {r['dtype']}, "
             f"remat {r['remat']}, attention {r['attention']} via {r['attention_impl']}; compiled in "
             f"{r['compile_s']:.1f} s"]
    hbm = f" of {r['hbm_gib']:.0f} GiB HBM" if r.get("hbm_gib") else ""
    if r.get("fits") is False:
        total = f"{r['total_gib']:.1f} GiB per chip needed{hbm}" if r.get("total_gib") else "over the chip's HBM"
        lines.append(f"DOES NOT FIT: {total}. Compiler: {r.get('error', '')}")
        return "\n".join(lines)
    lines.append(f"memory per chip: {r['total_gib']:.2f} GiB{hbm} (arguments {r['argument_gib']:.2f}, outputs "
                 f"{r['output_gib']:.2f}, temporaries {r['temp_gib']:.2f}, donated {r['alias_gib']:.2f}) -> "
                 + ("fits" if r["fits"] else "unknown HBM size" if r["fits"] is None else "DOES NOT FIT"))
    if r.get("xla_flops_per_step"):
        kernel = f" + {r['kernel_flops_per_step']:.3e} in attention kernels" if r["kernel_flops_per_step"] else ""
        lines.append(f"FLOPs per step: {r['xla_flops_per_step']:.3e} compiled{kernel}; model FLOPs "
                     f"{r['model_flops_per_step']:.3e}; MFU ceiling {r['mfu_ceiling']:.1%}"
                     + (f"; at peak a step takes >= {r['min_step_s'] * 1e3:.1f} ms" if r.get("min_step_s") else ""))
    return "\n".join(lines)
