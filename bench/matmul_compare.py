"""The matrix multiplies of a training step's output layer and MLP, jitted JAX against PyTorch on the same CPU.

    python bench/matmul_compare.py            # GFLOP/s of each, median of 10 calls, torch on 2 threads

Forward (x w^T), input gradient (g w) and weight gradient (g^T x) of the [4096, 256] x [256, 8192] output layer
(batch 16 x 256 tokens, vocabulary 8192: bench/compare_torch.py's shape), and one MLP matmul. Shows where
gptjax's CPU step loses to PyTorch's (docs/results.md, #15). Prints numbers; asserts nothing.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def median_s(f, *args, calls: int = 10) -> float:
    f(*args)  # compile / warm up
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        out = f(*args)
        if hasattr(out, "block_until_ready"):
            out.block_until_ready()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main() -> None:
    import torch

    torch.set_num_threads(2)
    m, k, n = 4096, 256, 8192
    cases = [("output layer forward x w^T", (m, k), (n, k), lambda a, b: a @ b.T),
             ("output layer input grad g w", (m, n), (n, k), lambda a, b: a @ b),
             ("output layer weight grad g^T x", (m, n), (m, k), lambda a, b: a.T @ b),
             ("MLP forward [4096,256]x[256,1024]", (m, k), (k, 1024), lambda a, b: a @ b)]
    print(f"{'matmul':<36} {'jax GFLOP/s':>12} {'torch GFLOP/s':>14} {'jax/torch':>10}")
    for name, sa, sb, f in cases:
        a = np.random.default_rng(0).standard_normal(sa, dtype=np.float32)
        b = np.random.default_rng(1).standard_normal(sb, dtype=np.float32)
        rows, cols = f(a, b).shape
        contract = a.shape[0] if name.endswith("g^T x") else a.shape[1]
        flops = 2 * rows * cols * contract
        tj = median_s(jax.jit(f), jnp.asarray(a), jnp.asarray(b))
        tt = median_s(f, torch.from_numpy(a), torch.from_numpy(b))
        print(f"{name:<36} {flops / tj / 1e9:>12.1f} {flops / tt / 1e9:>14.1f} {tt / tj:>10.2f}")

if __name__ == "__main__":
    main()
