"""The matrix multiplies of a training step's output layer and MLP, jitted JAX against PyTorch on the same CPU.

    python bench/matmul_compare.py            # GFLOP/s of each, median of 10 calls, torch on 2 threads
    python bench/matmul_compare.py --rounds 3 --calls 20

Forward (x w^T), input gradient (g w) and weight gradient (g^T x) of the [4096, 256] x [256, 8192] output layer
(batch 16 x 256 tokens, vocabulary 8192: bench/compare_torch.py's shape), one MLP matmul and its weight
gradient, attention's two batched matmuls ([B*N, T, H] = [64, 256, 64]: q k^T and p v), and two large
products that run near each library's peak on the CPU (the ceiling for the rest). Every case is
warmed up (three calls) before it is timed: the first call of a fresh process runs cold and once read as half
of PyTorch's speed (docs/results.md). Shows where gptjax's CPU step loses to PyTorch's (#15). Prints numbers;
asserts nothing.
"""

from __future__ import annotations

import os
import time

if __name__ == "__main__":  # before jax is imported: huge pages for XLA's host memory (gptjax/hostmem.py)
    from gptjax.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def median_s(f, *args, calls: int = 10) -> float:
    for _ in range(3):  # compile, then warm the caches and thread pools
        out = f(*args)
    if hasattr(out, "block_until_ready"):
        out.block_until_ready()
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        out = f(*args)
        if hasattr(out, "block_until_ready"):
            out.block_until_ready()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main() -> None:
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10, help="timed calls per case (the median is printed)")
    ap.add_argument("--rounds", type=int, default=1, help="measure every case this many times, in turns")
    args = ap.parse_args()
    torch.set_num_threads(2)
    m, k, n = 4096, 256, 8192
    x_, t_, h_ = 64, 256, 64
    # (name, a's shape, b's shape, the product, contracted length)
    cases = [("output layer forward x w^T", (m, k), (n, k), lambda a, b: a @ b.T, k),
             ("output layer input grad g w", (m, n), (n, k), lambda a, b: a @ b, n),
             ("output layer weight grad g^T x", (m, n), (m, k), lambda a, b: a.T @ b, m),
             ("MLP forward [4096,256]x[256,1024]", (m, k), (k, 1024), lambda a, b: a @ b, k),
             ("MLP weight grad x^T g", (m, k), (m, 1024), lambda a, b: a.T @ b, m),
             ("attention q k^T [64,256,64]", (x_, t_, h_), (x_, t_, h_), lambda a, b: a @ b.swapaxes(-1, -2), h_),
             ("attention p v [64,256,256]x[.,.,64]", (x_, t_, t_), (x_, t_, h_), lambda a, b: a @ b, t_),
             # near each library's peak on this CPU: the ceiling the step's matmuls are measured against
             ("large [2048,2048]x[2048,2048]", (2048, 2048), (2048, 2048), lambda a, b: a @ b, 2048),
             ("large [4096,1024]x[1024,4096]", (m, 1024), (1024, m), lambda a, b: a @ b, 1024)]
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal(sa, dtype=np.float32), rng.standard_normal(sb, dtype=np.float32)) for _, sa, sb, _, _ in cases]
    jitted = [jax.jit(f) for _, _, _, f, _ in cases]
    print(f"{'matmul':<38} {'jax GFLOP/s':>12} {'torch GFLOP/s':>14} {'jax/torch':>10}")
    for r in range(args.rounds):
        if args.rounds > 1:
            print(f"round {r + 1}")
        for (name, _, _, f, contract), (a, b), fj in zip(cases, data, jitted):
            flops = 2 * int(np.prod(f(a, b).shape)) * contract
            tj = median_s(fj, jnp.asarray(a), jnp.asarray(b), calls=args.calls)
            tt = median_s(f, torch.from_numpy(a), torch.from_numpy(b), calls=args.calls)
            print(f"{name:<38} {flops / tj / 1e9:>12.1f} {flops / tt / 1e9:>14.1f} {tt / tj:>10.2f}", flush=True)


if __name__ == "__main__":
    main()
