"""Training throughput of a preset on the current backend: tokens/s, step time, compile time, MFU.

  python bench/train_throughput.py                          # tiny preset, random tokens
  python bench/train_throughput.py --config gpt3-small batch_size=8 model.dtype=bfloat16 model.remat=dots

Uses random tokens (no data preparation) and prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

if __name__ == "__main__":  # before jax is imported: huge pages for XLA's host memory (gptjax/hostmem.py)
    from gptjax.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()

import jax
import numpy as np

from gptjax import config as config_lib
from gptjax import flops
from gptjax.sharding import make_mesh
from gptjax.train.steps import make_train_steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="tiny")
    p.add_argument("--steps", type=int, default=10, help="timed steps after compilation")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--json", default=None)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = config_lib.resolve(args.config, args.overrides)
    mesh = make_mesh(cfg.mesh)
    trainer = make_train_steps(cfg, mesh)
    M, B, T, V = cfg.micro_batches, cfg.batch_size, cfg.model.block_size, cfg.model.vocab_size
    rng = np.random.default_rng(0)

    def batch():
        b = rng.integers(0, V, size=(M, B // M, T + 1), dtype=np.int32)
        return jax.make_array_from_process_local_data(trainer.batch_sharding, b)

    state = trainer.init(jax.random.key(0))
    t0 = time.perf_counter()
    compiled = trainer.step.lower(state, batch()).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    for _ in range(args.warmup):
        state, m = compiled(state, batch())
        jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
        b = batch()
        t = time.perf_counter()
        state, m = compiled(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tps = cfg.tokens_per_step / step_s
    peak = flops.device_peak_flops()
    util = flops.mfu(tps, cfg.model, mesh.devices.size, peak)
    counts = flops.param_counts(cfg.model)
    res = {"preset": cfg.preset, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
           "devices": mesh.devices.size, "params": counts["total"], "batch_size": B, "block_size": T,
           "dtype": cfg.model.dtype, "remat": cfg.model.remat, "compile_s": round(compile_s, 2),
           "step_s": round(step_s, 4), "tokens_per_s": round(tps, 1),
           "model_tflops_per_s": round(tps * flops.flops_per_token(cfg.model) / 1e12, 3),
           "mfu": None if util is None else round(util, 4),
           "attention": ",".join(cfg.model.attention_pattern), "attention_impl": cfg.model.attention_impl,
           # per device, from XLA's compiled memory analysis
           "memory_gib": None if mem is None else round((mem.argument_size_in_bytes + mem.output_size_in_bytes +
                                                         mem.temp_size_in_bytes - mem.alias_size_in_bytes) / 2**30, 3)}
    for k, v in res.items():
        print(f"{k:>20}: {v if v is not None else 'n/a'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
