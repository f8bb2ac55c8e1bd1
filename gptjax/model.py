"""The GPT family (GPT-1, GPT-2, GPT-3) as one decoder-only Transformer whose variants are config values.

Shape legend (names carry shapes: x_BTD, q_BTNH, logits_BTV):
  B batch   T sequence   D d_model   N heads   H head dim   F d_ff   V padded vocab   L layers
  K the 3 of (q, k, v)   P the attention-pattern period (layers per scanned superblock)

The NNX modules below only declare parameters: shape, init and logical axis names, created in one place.
The forward pass is a pure function of a plain dict of arrays (`forward(cfg, params, tokens)`), which is
what the train step differentiates, shards and checkpoints. The L blocks are stored stacked on a leading
`layers` axis and run with `lax.scan` over superblocks of `attention_pattern` (e.g. dense, banded), so
compile time does not grow with depth; `scan_layers=False` unrolls the same computation.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.attention import attention
from gptjax.config import ModelConfig
from gptjax.sharding import constrain

Params = dict[str, Any]


def _dtype(name: str):
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def _param(value: jax.Array, names: tuple) -> nnx.Param:
    # Logical names only; the mesh placement comes from a rule set in sharding.py.
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


# ----------------------------------------------------------------------------------------------
# Parameter declarations. Names follow GPT-2 (wte, wpe, h, c_attn, c_proj, c_fc, ln_1, ln_2, ln_f) so a
# Hugging Face checkpoint maps over by renames and reshapes.


class Embed(nnx.Module):
    def __init__(self, rows: int, dim: int, names: tuple, cfg: ModelConfig, rngs: nnx.Rngs):
        init = cfg.init_std * jax.random.normal(rngs.params(), (rows, dim), _dtype(cfg.param_dtype))
        self.embedding = _param(init, names)


class LayerNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, lead: tuple = (), lead_names: tuple = ()):
        dt = _dtype(cfg.param_dtype)
        self.scale = _param(jnp.ones(lead + (cfg.d_model,), dt), lead_names + ("embed",))
        self.bias = _param(jnp.zeros(lead + (cfg.d_model,), dt), lead_names + ("embed",))


class Dense(nnx.Module):
    """A stacked [L, in..., out...] kernel and [L, out...] bias."""

    def __init__(self, in_shape: tuple, in_names: tuple, out_shape: tuple, out_names: tuple, std: float,
                 cfg: ModelConfig, rngs: nnx.Rngs):
        L, dt = cfg.n_layer, _dtype(cfg.param_dtype)
        self.kernel = _param(std * jax.random.normal(rngs.params(), (L,) + in_shape + out_shape, dt),
                             ("layers",) + in_names + out_names)
        self.bias = _param(jnp.zeros((L,) + out_shape, dt), ("layers",) + out_names)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, N, H = cfg.d_model, cfg.n_head, cfg.head_dim
        std_out = cfg.init_std / math.sqrt(2 * cfg.n_layer) if cfg.scaled_resid_init else cfg.init_std
        self.c_attn = Dense((D,), ("embed",), (3, N, H), (None, "heads", "head_dim"), cfg.init_std, cfg, rngs)
        self.c_proj = Dense((N, H), ("heads", "head_dim"), (D,), ("embed",), std_out, cfg, rngs)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.ff_dim
        std_out = cfg.init_std / math.sqrt(2 * cfg.n_layer) if cfg.scaled_resid_init else cfg.init_std
        self.c_fc = Dense((D,), ("embed",), (F,), ("mlp",), cfg.init_std, cfg, rngs)
        self.c_proj = Dense((F,), ("mlp",), (D,), ("embed",), std_out, cfg, rngs)


class Blocks(nnx.Module):
    """All n_layer Transformer blocks, each parameter stacked on a leading `layers` axis."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        L = cfg.n_layer
        self.ln_1 = LayerNorm(cfg, (L,), ("layers",))
        self.attn = Attention(cfg, rngs)
        self.ln_2 = LayerNorm(cfg, (L,), ("layers",))
        self.mlp = MLP(cfg, rngs)


class GPT(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.wte = Embed(cfg.padded_vocab, cfg.d_model, ("vocab", "embed"), cfg, rngs)
        self.wpe = Embed(cfg.block_size, cfg.d_model, (None, "embed"), cfg, rngs)
        self.h = Blocks(cfg, rngs)
        self.ln_f = LayerNorm(cfg) if cfg.final_norm else None

    def __call__(self, tokens_BT: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        return forward(self.cfg, params_of(self), tokens_BT, dropout_key=dropout_key)


def params_of(model: GPT) -> Params:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def init_params(cfg: ModelConfig, key: jax.Array) -> Params:
    """Freshly initialised parameters as a plain dict (jit this with out_shardings to init sharded)."""
    return params_of(GPT(cfg, rngs=nnx.Rngs(params=key)))


def abstract_params(cfg: ModelConfig) -> Params:
    """Shapes and dtypes of every parameter, without allocating any memory."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def logical_axes(cfg: ModelConfig) -> Params:
    """The logical axis names of every parameter, in the same tree as the params."""
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    return nnx.to_pure_dict(state, extract_fn=lambda v: tuple(v.get_metadata()["out_sharding"]))


# ----------------------------------------------------------------------------------------------
# Forward pass


def layer_norm(x_BTD: jax.Array, p: Params, eps: float) -> jax.Array:
    x = x_BTD.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"].astype(jnp.float32) + p["bias"].astype(jnp.float32)
    return y.astype(x_BTD.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if rate == 0.0 or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def block(cfg: ModelConfig, p: Params, x_BTD: jax.Array, kind: str, key: jax.Array | None,
          attend=None) -> jax.Array | tuple[jax.Array, Any]:
    """One Transformer block (one layer's slice of the stacked parameters).

    `attend(q_BTNH, k_BTNH, v_BTNH) -> (o_BTNH, aux)` replaces the attention core (the KV cache in
    generate.py does); the block then returns (x_BTD, aux).
    """
    dt = x_BTD.dtype
    k_att, k_res1, k_res2 = jax.random.split(key, 3) if key is not None else (None, None, None)
    aux = []

    def attn_branch(h_BTD):
        a = p["attn"]
        qkv_BTKNH = jnp.einsum("BTD,DKNH->BTKNH", h_BTD, a["c_attn"]["kernel"].astype(dt)) + a["c_attn"]["bias"].astype(dt)
        q_BTNH, k_BTNH, v_BTNH = qkv_BTKNH[:, :, 0], qkv_BTKNH[:, :, 1], qkv_BTKNH[:, :, 2]
        if attend is None:
            o_BTNH = attention(q_BTNH, k_BTNH, v_BTNH, window=cfg.local_window if kind == "banded" else None,
                               impl=cfg.attention_impl, dropout_rate=cfg.attn_pdrop, dropout_key=k_att)
        else:
            o_BTNH, a_out = attend(q_BTNH, k_BTNH, v_BTNH)
            aux.append(a_out)
        out_BTD = jnp.einsum("BTNH,NHD->BTD", o_BTNH, a["c_proj"]["kernel"].astype(dt)) + a["c_proj"]["bias"].astype(dt)
        return dropout(out_BTD, cfg.resid_pdrop, k_res1)

    def mlp_branch(h_BTD):
        m = p["mlp"]
        B_, T_, D_ = h_BTD.shape
        u_MF = jnp.einsum("MD,DF->MF", h_BTD.reshape(B_ * T_, D_), m["c_fc"]["kernel"].astype(dt)) + m["c_fc"]["bias"].astype(dt)
        u_MF = jax.nn.gelu(u_MF, approximate=True)
        out_BTD = (jnp.einsum("MF,FD->MD", u_MF, m["c_proj"]["kernel"].astype(dt)) + m["c_proj"]["bias"].astype(dt)).reshape(B_, T_, D_)
        return dropout(out_BTD, cfg.resid_pdrop, k_res2)

    if cfg.norm == "pre":  # GPT-2/3
        x_BTD = x_BTD + attn_branch(layer_norm(x_BTD, p["ln_1"], cfg.ln_eps))
        x_BTD = x_BTD + mlp_branch(layer_norm(x_BTD, p["ln_2"], cfg.ln_eps))
    else:  # GPT-1: normalise after each residual sum
        x_BTD = layer_norm(x_BTD + attn_branch(x_BTD), p["ln_1"], cfg.ln_eps)
        x_BTD = layer_norm(x_BTD + mlp_branch(x_BTD), p["ln_2"], cfg.ln_eps)
    x_BTD = constrain(x_BTD, ("batch", "seq", "embed"))
    return x_BTD if attend is None else (x_BTD, aux[0])


def _remat(fn, policy: str):
    if policy == "none":
        return fn
    policies = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots,
                "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    return jax.checkpoint(fn, policy=policies[policy])


def run_blocks(cfg: ModelConfig, h: Params, x_BTD: jax.Array, keys_L: jax.Array | None) -> jax.Array:
    P = len(cfg.attention_pattern)
    G = cfg.n_layer // P

    def superblock(x_BTD, hp, keys_P):  # hp leaves: [P, ...]
        for i, kind in enumerate(cfg.attention_pattern):
            layer = jax.tree.map(lambda a: a[i], hp)
            x_BTD = block(cfg, layer, x_BTD, kind, None if keys_P is None else keys_P[i])
        return x_BTD

    superblock = _remat(superblock, cfg.remat)
    h_G = jax.tree.map(lambda a: a.reshape((G, P) + a.shape[1:]), h)
    keys_GP = None if keys_L is None else keys_L.reshape((G, P) + keys_L.shape[1:])
    if cfg.scan_layers:
        x_BTD, _ = jax.lax.scan(lambda x, xs: (superblock(x, *xs), None), x_BTD, (h_G, keys_GP))
    else:
        for g in range(G):
            x_BTD = superblock(x_BTD, jax.tree.map(lambda a: a[g], h_G), None if keys_GP is None else keys_GP[g])
    return x_BTD


def embed(cfg: ModelConfig, params: Params, tokens_BT: jax.Array, positions_BT: jax.Array | None = None,
          dropout_key: jax.Array | None = None) -> jax.Array:
    """Token plus learned position embeddings (positions 0..T-1 unless given), in the compute dtype."""
    wte_VD, wpe_PD = params["wte"]["embedding"], params["wpe"]["embedding"]
    pos_D = wpe_PD[: tokens_BT.shape[1]] if positions_BT is None else jnp.take(wpe_PD, positions_BT, axis=0)
    x_BTD = jnp.take(wte_VD, tokens_BT, axis=0) + pos_D
    x_BTD = dropout(x_BTD.astype(_dtype(cfg.dtype)), cfg.embd_pdrop, dropout_key)
    return constrain(x_BTD, ("batch", "seq", "embed"))


def final_norm(cfg: ModelConfig, params: Params, x_BTD: jax.Array) -> jax.Array:
    """ln_f where the model has one (GPT-2/3), else x unchanged (GPT-1): what the output layers read."""
    return layer_norm(x_BTD, params["ln_f"], cfg.ln_eps) if cfg.final_norm else x_BTD


def tied_logits(x_BTD: jax.Array, wte_VD: jax.Array) -> jax.Array:
    """The output layer, tied to the input embedding: float32 logits [B, T, V]."""
    logits_BTV = jnp.einsum("BTD,VD->BTV", x_BTD, wte_VD.astype(x_BTD.dtype), preferred_element_type=jnp.float32)
    return constrain(logits_BTV, ("batch", "seq", "vocab"))


def unembed(cfg: ModelConfig, params: Params, x_BTD: jax.Array) -> jax.Array:
    """Final norm and the output layer, tied to the input embedding: float32 logits [B, T, V]."""
    return tied_logits(final_norm(cfg, params, x_BTD), params["wte"]["embedding"])


def forward(cfg: ModelConfig, params: Params, tokens_BT: jax.Array, *,
            dropout_key: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] in float32 (V padded; see `vocab_mask`). Dropout is on iff a key is given."""
    return unembed(cfg, params, hidden(cfg, params, tokens_BT, dropout_key=dropout_key))


def hidden(cfg: ModelConfig, params: Params, tokens_BT: jax.Array, *,
           dropout_key: jax.Array | None = None) -> jax.Array:
    """The last block's output [B, T, D] (before ln_f): what `unembed` turns into logits."""
    T = tokens_BT.shape[1]
    if T > cfg.block_size:
        raise ValueError(f"sequence of {T} tokens exceeds the context of {cfg.block_size}")
    k_emb, k_layers = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    keys_L = None if k_layers is None else jax.random.split(k_layers, cfg.n_layer)
    x_BTD = embed(cfg, params, tokens_BT, dropout_key=k_emb)
    return run_blocks(cfg, params["h"], x_BTD, keys_L)


def vocab_mask(cfg: ModelConfig) -> jax.Array:
    """[V] additive mask: 0 for real tokens, -inf-like for the padding rows of the embedding."""
    return jnp.where(jnp.arange(cfg.padded_vocab) < cfg.vocab_size, 0.0, -1e9).astype(jnp.float32)
