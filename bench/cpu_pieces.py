"""The pieces of a training step, each as gptjax wrote it before 2026-12-04, as it writes it now, and in
PyTorch, on the same inputs: the profile behind docs/results.md's #15 section.

    python bench/cpu_pieces.py            # bench/compare_torch.py's shape: batch 16 x 256, d_model 256, 4 heads
    python bench/cpu_pieces.py --step     # the whole compiled step, now vs with one piece put back, in-process
    python bench/cpu_pieces.py --step --config tiny                  # the same on the main job's shape

Milliseconds per call (median of --calls), torch on 2 threads, float32. "before" is the masked-einsum reference
attention, the 3-D MLP einsums and autodiff of the output layer; "now" is attention.dense_attention, the MLP on
[B*T, D] and the weight gradient of train.steps.tied_output_nats. `--step` compiles the whole train step four
ways (as now; with the reference attention; with autodiff of the plain output layer and loss; with the fused
loss's gradient taking a [B, T, V] one-hot instead of the scatter at the targets) and times them in turns from
the same state, so the machine's drift hits all alike. Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types

if __name__ == "__main__":  # before jax is imported: huge pages for XLA's host memory (gptjax/hostmem.py)
    from gptjax.hostmem import reexec_with_huge_pages

    reexec_with_huge_pages()

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def median_ms(f, calls: int) -> float:
    jax.block_until_ready(f())  # compile / warm up
    ts = []
    for _ in range(calls):
        t = time.perf_counter()
        jax.block_until_ready(f())
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def step_ab(overrides: list[str], rounds: int) -> None:
    from gptjax import attention as att
    from gptjax import config as config_lib
    from gptjax.sharding import make_mesh
    from gptjax.train import steps

    cfg = config_lib.resolve(overrides[0], ["mesh.fsdp=1", "steps=100000", "optim.warmup_steps=0"] + overrides[1:])

    def plain_output(x, wte, mask_V, t):
        logits = jnp.einsum("BTD,VD->BTV", x, wte.astype(x.dtype), preferred_element_type=jnp.float32)
        if mask_V is not None:  # None when the vocabulary has no padding rows (steps.output_nats)
            logits = logits + mask_V
        return jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, t[..., None], -1)[..., 0]

    def onehot_minus(g_BTV, t_BT, d_BT):  # the fused loss's backward before 2026-12-06: a [B, T, V] one-hot
        return g_BTV - (jnp.arange(g_BTV.shape[-1]) == t_BT[..., None]) * d_BT[..., None]

    # each variant: the pieces put back, as (module, attribute) -> what to put there while it compiles
    variants = {"now": {},
                "reference attention": {(att, "dense_attention"): lambda q, k, v: att.reference_attention(q, k, v)},
                "autodiff output layer": {(steps, "tied_output_nats"): plain_output},
                "one-hot output gradient": {(steps, "_minus_at_targets"): onehot_minus}}
    real = {key: getattr(*key) for patch in variants.values() for key in patch}
    compiled, batch = {}, None
    try:
        for name, patch in variants.items():
            for (module, attr), value in real.items():
                setattr(module, attr, patch.get((module, attr), value))
            tr = steps.make_train_steps(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
            state = tr.init(jax.random.key(0))
            if batch is None:
                M, B, T = cfg.micro_batches, cfg.batch_size, cfg.model.block_size
                toks = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (M, B // M, T + 1), dtype=np.int32)
                batch = jax.device_put(toks, tr.batch_sharding)
            compiled[name] = tr.step.lower(state, batch).compile()
    finally:
        for (module, attr), value in real.items():
            setattr(module, attr, value)
    states = {n: tr.init(jax.random.key(0)) for n in compiled}
    times: dict = {n: [] for n in compiled}
    for _ in range(rounds):
        for n, c in compiled.items():
            t = time.perf_counter()
            for _ in range(3):
                states[n], m = c(states[n], batch)
            jax.block_until_ready(m)
            times[n].append((time.perf_counter() - t) / 3)
    base = float(np.median(times["now"]))
    print(f"{' '.join(overrides)}: train step, median of {rounds} rounds x 3 steps")
    for n, t in times.items():
        print(f"  {n:<24} {np.median(t) * 1e3:8.1f} ms   {np.median(t) / base:5.3f}x now")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--step", action="store_true", help="time the whole train step with each piece put back instead")
    p.add_argument("--rounds", type=int, default=8, help="rounds of --step")
    p.add_argument("--config", default=None, help="with --step: a preset (default: compare_torch's shape)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="with --step: config overrides")
    a = p.parse_args()
    if a.step:
        shape = ["tiny", "model.n_layer=4", "model.d_model=256", "model.n_head=4", "model.block_size=256",
                 "model.vocab_size=8192", "batch_size=16"]
        step_ab(([a.config] if a.config else shape) + a.overrides, a.rounds)
        return
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compare_torch

    from gptjax import attention as att
    from gptjax import config as config_lib
    from gptjax import model

    torch.set_num_threads(2)
    B, T, D, N, V = 16, 256, 256, 4, 8192
    H, M = D // N, B * T
    r = np.random.default_rng(0)
    rand = lambda *s: r.standard_normal(s, dtype=np.float32)  # noqa: E731
    ms = lambda f: median_ms(f, a.calls)  # noqa: E731
    rows = []

    def grad_of(f, weight):  # gradients w.r.t. every input of a scalar that weighs each output differently
        return jax.jit(jax.grad(lambda *xs: (f(*xs) * weight).sum(), argnums=(0, 1, 2)))

    # attention, one layer
    q, k, v = (jnp.asarray(rand(B, T, N, H)) for _ in range(3))
    w_out = jnp.asarray(rand(B, T, N, H))
    qt = torch.from_numpy(np.array(q)).transpose(1, 2).contiguous()
    ref = jax.jit(att.reference_attention)
    dense = jax.jit(att.dense_attention)
    rows.append(("dense causal attention, forward", ms(lambda: ref(q, k, v)), ms(lambda: dense(q, k, v)),
                 ms(lambda: F.scaled_dot_product_attention(qt, qt, qt, is_causal=True))))
    g_ref, g_dense = grad_of(att.reference_attention, w_out), grad_of(att.dense_attention, w_out)
    qg = qt.clone().requires_grad_()
    rows.append(("dense causal attention, fwd+bwd", ms(lambda: g_ref(q, k, v)), ms(lambda: g_dense(q, k, v)),
                 ms(lambda: F.scaled_dot_product_attention(qg, qg, qg, is_causal=True).sum().backward())))

    # MLP, one layer
    x, w1, w2 = jnp.asarray(rand(B, T, D)), jnp.asarray(rand(D, 4 * D) * 0.02), jnp.asarray(rand(4 * D, D) * 0.02)
    w_out = jnp.asarray(rand(B, T, D))
    gelu = lambda u: jax.nn.gelu(u, approximate=True)  # noqa: E731
    mlp3 = lambda x, a, b: jnp.einsum("BTF,FD->BTD", gelu(jnp.einsum("BTD,DF->BTF", x, a)), b)  # noqa: E731
    mlp2 = lambda x, a, b: (gelu(x.reshape(M, D) @ a) @ b).reshape(B, T, D)  # noqa: E731
    xt = torch.from_numpy(np.array(x)).requires_grad_()
    at = torch.from_numpy(np.asarray(w1).T.copy()).requires_grad_()
    bt = torch.from_numpy(np.asarray(w2).T.copy()).requires_grad_()
    g3, g2 = grad_of(mlp3, w_out), grad_of(mlp2, w_out)
    rows.append(("MLP, fwd+bwd", ms(lambda: g3(x, w1, w2)), ms(lambda: g2(x, w1, w2)),
                 ms(lambda: F.linear(F.gelu(F.linear(xt, at), approximate="tanh"), bt).sum().backward())))

    # output layer weight gradient [V, D] from g [M, V] and x [M, D]
    g, x2 = jnp.asarray(rand(M, V)), jnp.asarray(rand(M, D))
    before = jax.jit(lambda g, x: jnp.einsum("MV,MD->VD", g, x))
    now = jax.jit(lambda g, x: jax.lax.optimization_barrier(jnp.einsum("MD,MV->DV", x, g)).T)
    gt, x2t = torch.from_numpy(np.array(g)), torch.from_numpy(np.array(x2))
    rows.append(("output layer weight gradient g^T x", ms(lambda: before(g, x2)), ms(lambda: now(g, x2)),
                 ms(lambda: gt.T @ x2t)))

    # one whole block, as the model runs it now
    cfg = config_lib.resolve("tiny", ["model.n_layer=1", f"model.d_model={D}", f"model.n_head={N}",
                                      f"model.block_size={T}", f"model.vocab_size={V}"]).model
    layer = jax.tree.map(lambda t: t[0], model.init_params(cfg, jax.random.key(0))["h"])
    g_block = jax.jit(jax.grad(lambda lp, x: (model.block(cfg, lp, x, "dense", None) * w_out).sum(), argnums=(0, 1)))
    shape = types.SimpleNamespace(n_layer=1, d_model=D, n_head=N, block=T, vocab=V, batch=B)
    tblock = compare_torch.torch_model(shape, "cpu", torch.float32)[0].h[0]
    wt = torch.from_numpy(np.array(w_out))

    def torch_block():
        tblock.zero_grad(set_to_none=True)
        xt.grad = None
        (tblock(xt) * wt).sum().backward()

    rows.append(("one block (attention + MLP + norms), fwd+bwd", None, ms(lambda: g_block(layer, x)), ms(torch_block)))

    print(f"{'piece (ms per call)':<48} {'before':>8} {'now':>8} {'PyTorch':>8}")
    for name, b, n, t in rows:
        print(f"{name:<48} {'' if b is None else f'{b:.1f}':>8} {n:>8.1f} {t:>8.1f}")


if __name__ == "__main__":
    main()
