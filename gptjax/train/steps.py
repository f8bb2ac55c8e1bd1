"""The language-modelling train state, loss, train step and eval step: pure and jit-able, no I/O.

The state is a plain pytree {"step", "params", "opt_state"}. It is created straight into its shards
(`create_state` jits the initialiser with out_shardings) and the step is jitted once with the state
donated. Dropout keys and batches depend on the step number alone, so a resumed run is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax import sharding
from gptjax.config import TrainConfig
from gptjax.errors import ConfigError
from gptjax.model import (Params, abstract_params, final_norm, hidden, init_params, logical_axes, tied_logits,
                          vocab_mask)
from gptjax.optim import make_optimizer, schedule

State = dict[str, Any]


def token_nats(cfg, params: Params, tokens_BT1: jax.Array, dropout_key=None) -> jax.Array:
    """Per-token negative log-likelihood [B, T] in float32 of tokens[:, 1:] given the prefix."""
    x_BTD = hidden(cfg, params, tokens_BT1[:, :-1], dropout_key=dropout_key)
    return output_nats(cfg, params, x_BTD, tokens_BT1[:, 1:])


def output_nats(cfg, params: Params, x_BTD: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """-log p(target) [B, T] from the last hidden states. The float32 logits [B, T, V] are the largest tensor of
    a step; with model.loss_chunk = C (dividing T) the output layer and log-softmax run C positions at a time
    under jax.checkpoint, so they never exist whole, in the forward pass or (recomputed chunk by chunk) in the
    backward pass. Same numbers either way."""
    mask_V = vocab_mask(cfg) if cfg.padded_vocab > cfg.vocab_size else None  # no padding rows: nothing to mask

    def nats(x_BCD, t_BC):
        return tied_output_nats(final_norm(cfg, params, x_BCD), params["wte"]["embedding"], mask_V, t_BC)

    B, T, D = x_BTD.shape
    C = cfg.loss_chunk
    if not C or C >= T or T % C:
        return nats(x_BTD, targets_BT)
    n = T // C
    x_nBCD = x_BTD.reshape(B, n, C, D).swapaxes(0, 1)
    t_nBC = targets_BT.reshape(B, n, C).swapaxes(0, 1)
    nats_nBC = jax.lax.map(jax.checkpoint(lambda xt: nats(*xt)), (x_nBCD, t_nBC))
    return nats_nBC.swapaxes(0, 1).reshape(B, T)


@jax.custom_vjp
def tied_output_nats(x_BTD: jax.Array, wte_VD: jax.Array, mask_V: jax.Array | None,
                     targets_BT: jax.Array) -> jax.Array:
    """-log softmax(x wte^T + mask)[target] [B, T]: the tied output layer and the cross-entropy as one function
    with its own backward pass, the same numbers as `unembed` + log-softmax (tests/test_model.py). The backward
    pass forms d logits = softmax - onehot as one sweep over the [B, T, V] logits and a scatter at the targets
    (autodiff's takes several sweeps) and the weight gradient as x^T g, transposing the [D, V] result rather than
    the [B*T, V] gradient (XLA's CPU backend otherwise copies the whole gradient into a transposed layout first).
    Padded vocabulary rows (mask -1e9) get probability 0, so no gradient; mask None: no padded rows."""
    return _tied_output_fwd(x_BTD, wte_VD, mask_V, targets_BT)[0]


def _tied_output_fwd(x_BTD, wte_VD, mask_V, targets_BT):
    # The residual is the matmul's own output, unmasked: the mask is added inside each sweep that reads it (the
    # log-sum-exp and the backward pass's softmax) rather than in a sweep of its own over the [B, T, V] logits
    # that wrote them all again (92 ms of an 1,140 ms step in bench/step_profile.py on a 2-core Intel CPU).
    raw_BTV = tied_logits(x_BTD, wte_VD)
    logits_BTV = raw_BTV if mask_V is None else raw_BTV + mask_V
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    nats_BT = logz_BT - jnp.take_along_axis(raw_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return nats_BT, (x_BTD, wte_VD, mask_V, targets_BT, raw_BTV, logz_BT)


def _tied_output_bwd(res, dnats_BT):
    x_BTD, wte_VD, mask_V, targets_BT, raw_BTV, logz_BT = res
    B, T, D = x_BTD.shape
    logits_BTV = raw_BTV if mask_V is None else raw_BTV + mask_V
    g_BTV = jnp.exp(logits_BTV - logz_BT[..., None]) * dnats_BT[..., None]  # softmax * dnats ...
    g_BTV = _minus_at_targets(g_BTV, targets_BT, dnats_BT)  # ... - onehot * dnats: one write per position
    g_BTV = sharding.constrain(g_BTV.astype(x_BTD.dtype), ("batch", "seq", "vocab"))
    dx_BTD = jnp.einsum("BTV,VD->BTD", g_BTV, wte_VD.astype(x_BTD.dtype), preferred_element_type=jnp.float32)
    dw_DV = jnp.einsum("MD,MV->DV", x_BTD.reshape(B * T, D), g_BTV.reshape(B * T, -1),
                       preferred_element_type=jnp.float32)
    dw_VD = jax.lax.optimization_barrier(dw_DV).T  # the barrier keeps XLA from folding the transpose into the dot
    int_zero = np.zeros(targets_BT.shape, jax.dtypes.float0)
    return (dx_BTD.astype(x_BTD.dtype), dw_VD.astype(wte_VD.dtype), None if mask_V is None else jnp.zeros_like(mask_V),
            int_zero)


def _minus_at_targets(g_BTV: jax.Array, targets_BT: jax.Array, d_BT: jax.Array) -> jax.Array:
    """g[b, t, targets[b, t]] -= d[b, t], in float32, before any cast (so p * d - d keeps its precision when p is
    near 1). A scatter with B and T as batching dimensions (what the transpose of take_along_axis is, so sharding
    passes B and T straight through) rather than subtracting a [B, T, V] one-hot inside the softmax sweep: XLA's
    CPU backend runs the iota-compare fusion over the whole [4096, 8192] gradient in 43 ms against 20 ms
    for the plain sweep and the scatter (docs/results.md, 2026-12-06)."""
    dnums = jax.lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(2,),
                                            scatter_dims_to_operand_dims=(2,), operand_batching_dims=(0, 1),
                                            scatter_indices_batching_dims=(0, 1))
    return jax.lax.scatter_add(g_BTV, targets_BT[..., None], -d_BT.astype(g_BTV.dtype), dnums,
                               indices_are_sorted=False, unique_indices=True,
                               mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)


tied_output_nats.defvjp(_tied_output_fwd, _tied_output_bwd)


def loss_fn(cfg, params: Params, tokens_BT1: jax.Array, dropout_key=None) -> jax.Array:
    return token_nats(cfg, params, tokens_BT1, dropout_key).mean()


def _dropout_on(cfg) -> bool:
    m = cfg.model
    return max(m.embd_pdrop, m.attn_pdrop, m.resid_pdrop) > 0.0


@dataclass
class TrainSteps:
    """Everything jit-compiled for one config on one mesh."""

    cfg: TrainConfig
    mesh: Mesh
    tx: optax.GradientTransformation
    lr_schedule: Callable
    state_shardings: Any
    batch_sharding: NamedSharding
    init: Callable  # key -> state, placed in its shards
    start_from: Callable  # params -> state at step 0 with a fresh optimizer (init_from), placed in its shards
    step: Callable  # (state, batch) -> (state, metrics), state donated
    eval_step: Callable  # (params, tokens, weights) -> (sum of nats, number of tokens)
    eval_batch_sharding: NamedSharding
    all_finite: Callable  # params -> bool

    def abstract_state(self):
        """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
        shapes = jax.eval_shape(self.init, jax.random.key(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.state_shardings)


def check_batch_fits_mesh(cfg: TrainConfig, mesh: Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.batch_size // cfg.micro_batches
    if micro % shards:
        raise ConfigError(f"the micro-batch of {micro} sequences (batch_size / micro_batches) must be divisible by "
                          f"the {shards} data x fsdp devices; change batch_size or the mesh")


def make_train_steps(cfg: TrainConfig, mesh: Mesh) -> TrainSteps:
    m, rules = cfg.model, cfg.mesh.rules
    tx = make_optimizer(cfg.optim, cfg.steps)
    lr_schedule = schedule(cfg.optim, cfg.steps)
    replicated = NamedSharding(mesh, P())

    param_shapes = abstract_params(m)
    param_shardings = sharding.tree_shardings(logical_axes(m), param_shapes, mesh, rules)
    opt_shapes = jax.eval_shape(tx.init, param_shapes)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, param_shardings,
                                          transform_non_params=lambda _: replicated)
    state_shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}

    def init_fn(key):
        params = init_params(m, key)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    init = jax.jit(init_fn, out_shardings=state_shardings)
    start_from = jax.jit(lambda params: {"step": jnp.zeros((), jnp.int32), "params": params,
                                         "opt_state": tx.init(params)},
                         in_shardings=(param_shardings,), out_shardings=state_shardings)

    batch_shard = sharding.batch_sharding(mesh, rules, ndim=3, leading=1)  # [micro_batches, B/M, T+1]
    base_key = jax.random.key(cfg.seed)
    dropout = _dropout_on(cfg)

    def train_step(state, batch_MBT1):
        params = state["params"]
        key = jax.random.fold_in(base_key, state["step"])

        def accumulate(carry, xs):
            grads_acc, loss_acc = carry
            tokens_BT1, i = xs
            k = jax.random.fold_in(key, i) if dropout else None
            loss, grads = jax.value_and_grad(lambda p: loss_fn(m, p, tokens_BT1, k))(params)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            return (grads_acc, loss_acc + loss), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        n = batch_MBT1.shape[0]
        (grads, loss), _ = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)),
                                        (batch_MBT1, jnp.arange(n)))
        grads = jax.tree.map(lambda g, p: (g / n).astype(p.dtype), grads, params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        metrics = {"loss": loss / n, "grad_norm": grad_norm, "lr": lr_schedule(state["step"])}
        return new_state, metrics

    def step_fn(state, batch):
        with sharding.use_mesh(mesh, rules):
            return train_step(state, batch)

    step = jax.jit(step_fn, in_shardings=(state_shardings, batch_shard),
                   out_shardings=(state_shardings, replicated), donate_argnums=0)

    def eval_fn(params, tokens_BT1, weights_BT):
        with sharding.use_mesh(mesh, rules):
            nats_BT = token_nats(m, params, tokens_BT1)
        return (nats_BT * weights_BT).sum(), weights_BT.sum()

    eval_batch_shard = sharding.batch_sharding(mesh, rules, ndim=2)
    evaluate = jax.jit(eval_fn, in_shardings=(param_shardings, eval_batch_shard, eval_batch_shard),
                       out_shardings=(replicated, replicated))

    all_finite = jax.jit(lambda p: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(p)])),
                         out_shardings=replicated)
    return TrainSteps(cfg, mesh, tx, lr_schedule, state_shardings, batch_shard, init, start_from, step, evaluate, eval_batch_shard,
                   all_finite)
