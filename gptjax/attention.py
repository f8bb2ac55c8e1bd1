"""Causal self-attention: dense, and locally banded (each query sees the last `window` keys).

Shape legend as in model.py: B batch, T query positions, S key positions, N heads, H head dim.
`reference` is the plain einsum + mask path (supports attention dropout); `jax` calls
jax.nn.dot_product_attention, which picks a fused kernel where the backend has one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(T: int, S: int, window: int | None = None) -> jax.Array:
    """[T, S] bool: query t may see key s iff s <= t (and t - s < window for a band)."""
    t = jnp.arange(T)[:, None] + (S - T)  # queries are the last T of S positions
    s = jnp.arange(S)[None, :]
    ok = s <= t
    if window is not None:
        ok = ok & (t - s < window)
    return ok


def attention(q_BTNH, k_BSNH, v_BSNH, *, window: int | None = None, impl: str = "reference",
              dropout_rate: float = 0.0, dropout_key: jax.Array | None = None) -> jax.Array:
    T, S, H = q_BTNH.shape[1], k_BSNH.shape[1], q_BTNH.shape[-1]
    use_dropout = dropout_rate > 0.0 and dropout_key is not None
    if impl == "jax" and not use_dropout and T == S:  # its causal mask aligns queries to the first keys
        local = (window - 1, 0) if window is not None else None
        return jax.nn.dot_product_attention(q_BTNH, k_BSNH, v_BSNH, is_causal=True, local_window_size=local)
    logits_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH, preferred_element_type=jnp.float32)
    logits_BNTS = logits_BNTS / jnp.sqrt(jnp.float32(H))
    logits_BNTS = jnp.where(causal_mask(T, S, window), logits_BNTS, jnp.finfo(jnp.float32).min)
    probs_BNTS = jax.nn.softmax(logits_BNTS, axis=-1)
    if use_dropout:
        keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, probs_BNTS.shape)
        probs_BNTS = jnp.where(keep, probs_BNTS / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS.astype(v_BSNH.dtype), v_BSNH)
