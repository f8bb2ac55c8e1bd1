"""Sampling: temperature and top-k, seeded.

This first version recomputes the forward pass over a fixed [1, block_size] window for every new token
(one compiled shape, no recompiles). A KV cache with prefill + decode steps replaces it later.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import ModelConfig
from gptjax.model import Params, forward, vocab_mask


@functools.partial(jax.jit, static_argnums=(0, 5))
def _next_token(cfg: ModelConfig, params: Params, window_1T, last, key, top_k: int, temperature):
    logits_V = forward(cfg, params, window_1T)[0, last] + vocab_mask(cfg)
    if top_k > 0:
        kth = jax.lax.top_k(logits_V, min(top_k, logits_V.shape[-1]))[0][-1]
        logits_V = jnp.where(logits_V < kth, -1e9, logits_V)
    greedy = jnp.argmax(logits_V)
    sampled = jax.random.categorical(key, logits_V / jnp.maximum(temperature, 1e-6))
    return jnp.where(temperature > 0, sampled, greedy)


def sample(cfg: ModelConfig, params: Params, prompt_ids: list[int], max_new_tokens: int, *,
           temperature: float = 0.8, top_k: int = 40, seed: int = 0, stop_id: int | None = None) -> list[int]:
    """Returns the new tokens only. temperature=0 is greedy."""
    T = cfg.block_size
    ids = list(prompt_ids) or ([stop_id] if stop_id is not None else [0])
    key = jax.random.key(seed)
    new: list[int] = []
    for i in range(max_new_tokens):
        window = ids[-T:]
        buf = np.zeros((1, T), np.int32)
        buf[0, :len(window)] = window
        tok = int(_next_token(cfg, params, buf, len(window) - 1, jax.random.fold_in(key, i), top_k,
                              jnp.float32(temperature)))
        if stop_id is not None and tok == stop_id:
            break
        ids.append(tok)
        new.append(tok)
    return new
