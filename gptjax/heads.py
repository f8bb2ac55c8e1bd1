"""What sits on the final hidden state. The language-modelling head is tied to the input embedding and lives
in model.py (`unembed`); this file holds the ones fine-tuning adds.

GPT-1's task head (Radford et al. 2018, eq. 3): P(y | x) = softmax(h_l^m W_y), a linear map of the final
state at the extract token. For similarity the two orders' final states are summed first; for multiple choice
each choice gives one logit (one output) and the softmax runs over the choices; STS-B-style regression is one
output scored with squared error. Parameters declare logical axes like everything else: the kernel's input
dimension is `embed` (split over fsdp like the rest of the model), its few outputs `classes` (replicated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gptjax.config import ModelConfig
from gptjax.model import Params, embed, final_norm, run_blocks


def init_task_head(cfg: ModelConfig, num_outputs: int, key: jax.Array) -> Params:
    return {"kernel": cfg.init_std * jax.random.normal(key, (cfg.d_model, num_outputs), jnp.float32),
            "bias": jnp.zeros((num_outputs,), jnp.float32)}


def task_head_axes() -> Params:
    return {"kernel": ("embed", "classes"), "bias": ("classes",)}


def hidden_states(cfg: ModelConfig, params: Params, tokens_BT: jax.Array, *, dropout_key=None,
                  offset_BTD: jax.Array | None = None) -> jax.Array:
    """The final hidden states h_l [B, T, D] that the output layers read (after ln_f where the model has one).
    `offset_BTD` is added to the input embeddings (tests differentiate through it)."""
    k_emb, k_layers = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    keys_L = None if k_layers is None else jax.random.split(k_layers, cfg.n_layer)
    x_BTD = embed(cfg, params, tokens_BT, dropout_key=k_emb)
    if offset_BTD is not None:
        x_BTD = x_BTD + offset_BTD.astype(x_BTD.dtype)
    return final_norm(cfg, params, run_blocks(cfg, params["h"], x_BTD, keys_L))


def task_logits(head: Params, h_BD: jax.Array) -> jax.Array:
    """[B, C] float32 outputs of the task head on extract-token states."""
    return h_BD.astype(jnp.float32) @ head["kernel"] + head["bias"]
