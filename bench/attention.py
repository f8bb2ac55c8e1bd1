"""Dense vs banded attention as the sequence grows: forward + backward time and compiled peak memory.

  python bench/attention.py                                   # CPU: float32, T = 1k ... 16k, w = 256
  python bench/attention.py --impls reference,blockwise --lengths 1024,2048
  python bench/attention.py --dtype bfloat16 --impls cudnn,blockwise --lengths 1024,2048,4096,8192,16384,32768  # GPU

Each row times jit(grad(sum(attention * r))) over [B, T, N, H] queries, keys and values: the median of
`--repeats` runs after one warm-up. "dense" is causal attention over the whole context; "banded" is the
GPT-3 local band of w keys. Memory is XLA's compiled peak estimate (arguments + outputs + temporaries),
so it is reported even where the program is not run (`--max-gib`). Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from gptjax import attention as att


def program(impl: str, window: int | None):
    def loss(q, k, v, r):
        return (att.attention(q, k, v, window=window, impl=impl).astype(jnp.float32) * r).sum()

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def peak_bytes(compiled) -> int | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    # (peak_memory_in_bytes, where present, leaves out temporaries on the CPU backend)
    return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--impls", default="auto", help="comma-separated attention_impl values (see attention.py)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-gib", type=float, default=14.0, help="compile but do not run programs needing more")
    p.add_argument("--json", default=None, help="append one JSON line per row to this file")
    args = p.parse_args()
    dt = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    B, N, H, w = args.batch, args.heads, args.head_dim, args.window
    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), B={B} N={N} H={H} {args.dtype}, "
          f"w={w}")
    print(f"{'impl':>10} {'layer':>7} {'T':>6} {'fwd+bwd s':>10} {'peak GiB':>9} {'compile s':>9}")
    rows = []
    for impl in args.impls.split(","):
        resolved = att.resolve_impl(impl)
        for kind in ("dense", "banded"):
            for T in map(int, args.lengths.split(",")):
                keys = jax.random.split(jax.random.key(T), 4)
                q, k, v = (jax.random.normal(x, (B, T, N, H), dt) for x in keys[:3])
                r = jax.random.normal(keys[3], (B, T, N, H), jnp.float32)
                t0 = time.perf_counter()
                compiled = program(impl, w if kind == "banded" else None).lower(q, k, v, r).compile()
                compile_s = time.perf_counter() - t0
                peak = peak_bytes(compiled)
                gib = None if peak is None else peak / 2**30
                secs = None
                if gib is None or gib <= args.max_gib:
                    jax.block_until_ready(compiled(q, k, v, r))  # warm-up
                    times = []
                    for _ in range(args.repeats):
                        t = time.perf_counter()
                        jax.block_until_ready(compiled(q, k, v, r))
                        times.append(time.perf_counter() - t)
                    secs = statistics.median(times)
                row = {"impl": impl, "resolved": resolved, "layer": kind, "T": T, "window": w, "B": B, "N": N,
                       "H": H, "dtype": args.dtype, "fwd_bwd_s": secs, "peak_gib": gib, "compile_s": compile_s,
                       "backend": jax.default_backend(), "device": jax.devices()[0].device_kind}
                rows.append(row)
                shown = "not run" if secs is None else f"{secs:.4f}"
                print(f"{resolved:>10} {kind:>7} {T:>6} {shown:>10} {gib if gib is None else round(gib, 3)!s:>9} "
                      f"{compile_s:>9.2f}", flush=True)
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(row) + "\n")
    by = {(r["resolved"], r["layer"], r["T"]): r for r in rows}
    for impl in dict.fromkeys(r["resolved"] for r in rows):
        for T in map(int, args.lengths.split(",")):
            d, b = by.get((impl, "dense", T)), by.get((impl, "banded", T))
            if d and b and d["fwd_bwd_s"] and b["fwd_bwd_s"]:
                print(f"{impl} T={T}: banded is {d['fwd_bwd_s'] / b['fwd_bwd_s']:.1f}x faster than dense, "
                      f"{d['peak_gib'] / b['peak_gib']:.1f}x less memory")


if __name__ == "__main__":
    main()
