"""AdamW with linear warmup then cosine (or linear) decay, global-norm clipping, and decay on matrices only."""

from __future__ import annotations

import jax
import optax

from gptjax.config import OptimConfig

# Parameters that get weight decay: weight matrices and embeddings. Biases and LayerNorm gains don't.
# (Decided by name, not ndim: the stacked layer axis makes a LayerNorm gain two-dimensional.)
DECAYED = ("kernel", "embedding")


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.decay == "linear":  # GPT-1's fine-tuning schedule: linear warmup, then linear decay
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup),
                                     optax.linear_schedule(cfg.lr, cfg.lr * cfg.min_lr_ratio,
                                                           max(total_steps - warmup, 1))], [warmup])
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) in DECAYED, params)


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )
