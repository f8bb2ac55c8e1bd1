"""Where the compiled training step spends its time: a jax.profiler trace of a few steps, each XLA op's time
matched to its HLO (the matmul's shapes and contracting dims, or the element-wise ops a fusion holds).

  python bench/step_profile.py                                    # the shape of bench/compare_torch.py
  python bench/step_profile.py --config tiny                      # the main job
  python bench/step_profile.py --by-kind --top 20                 # summed by kind: e.g. every [4096,256] matmul
  python bench/step_profile.py model.n_layer=1 --json prof.json   # any config override

Times are each op's wall time in the trace, averaged over --steps steps. XLA's CPU runtime runs independent ops
on two threads at once, so the column can sum to a little more than the step. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

# the benchmark shape of bench/compare_torch.py (4 layers, d_model 256, 4 heads, context 256, vocab 8192, batch 16)
BENCH_SHAPE = ["model.n_layer=4", "model.d_model=256", "model.n_head=4", "model.block_size=256",
               "model.vocab_size=8192", "batch_size=16"]


def hlo_ops(hlo_text: str) -> dict[str, str]:
    """instruction name -> a short description: 'dot f32[M,N] (lhs contracting, rhs contracting)' for a matmul
    or a fusion around one, else the fusion's output shape and the element-wise ops inside it."""
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.S)}
    out = {}
    for m in re.finditer(r"\n\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (\w+)\(([^\n]*)", hlo_text):
        name, shape, op, rest = m.groups()
        shape = shape.split("{")[0]
        body = ""
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        if called:
            body = bodies.get(called.group(1), "")
        dots = re.findall(r"= (\S+) dot\([^\n]*?((?:lhs_batch_dims=\{[\d,]*\}, )?lhs_contracting_dims=\{[\d,]*\}"
                          r"(?:, rhs_batch_dims=\{[\d,]*\})?, rhs_contracting_dims=\{[\d,]*\})", body or m.group(0))
        if dots:
            dshape, dims = dots[-1]
            dims = dims.replace("_contracting_dims=", "_c=").replace("_batch_dims=", "_b=")
            out[name] = f"dot {dshape.split('{')[0]} ({dims})"
        elif body:
            ops = sorted(set(re.findall(r" (\w+)\(", body)) - {"parameter", "constant", "bitcast", "broadcast"})
            out[name] = f"{shape} {' '.join(ops)}"
        else:
            out[name] = f"{op} {shape}"
    return out


def profile(overrides: list[str], steps: int) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np

    from gptjax import config as config_lib
    from gptjax.sharding import make_mesh
    from gptjax.train.steps import make_train_steps

    cfg = config_lib.resolve(overrides[0], ["mesh.fsdp=1", "steps=100000", "optim.warmup_steps=0"] + overrides[1:])
    trainer = make_train_steps(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state = trainer.init(jax.random.key(0))
    M, B, T, V = cfg.micro_batches, cfg.batch_size, cfg.model.block_size, cfg.model.vocab_size
    batch = jax.device_put(np.random.default_rng(0).integers(0, V, size=(M, B // M, T + 1), dtype=np.int32),
                           trainer.batch_sharding)
    ops = hlo_ops(trainer.step.lower(state, batch).compile().as_text())
    for _ in range(2):  # compile and warm up outside the trace
        state, m = trainer.step(state, batch)
        jax.block_until_ready(m)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                state, m = trainer.step(state, batch)
                jax.block_until_ready(m)
        step_s = (time.perf_counter() - t0) / steps
        events = json.load(gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]))["traceEvents"]
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in ops:
            per_op[e["name"]] += e["dur"] / 1e3 / steps  # microseconds -> ms per step
    rows = [{"op": n, "ms": round(t, 2), "what": ops[n]} for n, t in per_op.most_common()]
    return {"config": overrides, "tokens_per_step": B * T, "step_ms_traced": round(step_s * 1e3, 1),
            "ops_ms_sum": round(sum(per_op.values()), 1), "ops": rows}


def by_kind(rows: list[dict]) -> list[dict]:
    kinds, count = collections.Counter(), collections.Counter()
    for r in rows:
        kinds[r["what"]] += r["ms"]
        count[r["what"]] += 1
    return [{"op": f"x{count[k]}", "ms": round(t, 2), "what": k} for k, t in kinds.most_common()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="preset (default: tiny with the compare_torch shape)")
    p.add_argument("--steps", type=int, default=3, help="traced steps")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--by-kind", action="store_true", help="sum ops with the same description")
    p.add_argument("--json", help="write every op here")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    a = p.parse_args()
    overrides = [a.config] + a.overrides if a.config else ["tiny"] + BENCH_SHAPE + a.overrides
    res = profile(overrides, a.steps)
    rows = by_kind(res["ops"]) if a.by_kind else res["ops"]
    print(f"{' '.join(overrides)}: traced step {res['step_ms_traced']} ms, ops sum {res['ops_ms_sum']} ms")
    print(f"{'ms/step':>8}  {'op':<28} what")
    for r in rows[:a.top]:
        print(f"{r['ms']:>8.2f}  {r['op']:<28} {r['what']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    from gptjax.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()  # before jax is imported: huge pages for XLA's host memory (gptjax/hostmem.py)
    main()
