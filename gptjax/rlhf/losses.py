"""InstructGPT's losses as pure functions (Ouyang et al. 2022), apart from the loops that will call them.

Shapes: B sequences, T positions, P prompts, K completions per prompt. Masks are float or bool arrays, 1 where a
position (or completion) counts. Nothing here samples, reads files or knows about meshes.

  masked_lm_loss     SFT: next-token loss on the response tokens only
  ranking_loss       reward model: -1/C(K,2) sum log sigmoid(r_w - r_l) over a prompt's pairs, ties dropped
  dpo_loss           DPO: the ranking loss of the implicit reward beta * (log pi(y|x) - log pi_ref(y|x))
  kl_rewards         PPO's per-token reward: -beta * (log pi - log pi_SFT), the reward-model score at the end token
  gae                generalised advantage estimation (gamma = 1, lambda = 0.95 in the paper)
  whiten             advantages normalised per batch over the positions that count
  ppo_policy_loss    the clipped surrogate objective
  ppo_value_loss     the clipped value objective
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked_mean(x, mask):
    mask = mask.astype(x.dtype)
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def masked_lm_loss(nats_BT: jax.Array, response_BT: jax.Array) -> jax.Array:
    """Mean negative log-likelihood over response tokens (the prompt is masked out of the loss)."""
    return _masked_mean(nats_BT, response_BT)


def ranking_loss(rewards_PK: jax.Array, ranks_PK: jax.Array, valid_PK: jax.Array) -> jax.Array:
    """The reward model's loss for K-way rankings, each prompt one batch element (every completion scored once).

    ranks_PK: 0 is the best completion; equal ranks are ties, whose pairs are dropped. valid_PK: completions that
    exist (K varies per prompt, padded to the largest). Each prompt's loss is the mean over its ordered pairs,
    then the mean over prompts that have at least one pair."""
    r_w, r_l = rewards_PK[:, :, None], rewards_PK[:, None, :]
    better = ranks_PK[:, :, None] < ranks_PK[:, None, :]  # completion i is ranked above j
    pair = better & valid_PK[:, :, None].astype(bool) & valid_PK[:, None, :].astype(bool)
    pair_f = pair.astype(rewards_PK.dtype)
    per_pair = -jax.nn.log_sigmoid(r_w - r_l)
    n_pairs = pair_f.sum((1, 2))
    per_prompt = (per_pair * pair_f).sum((1, 2)) / jnp.maximum(n_pairs, 1.0)
    has = (n_pairs > 0).astype(rewards_PK.dtype)
    return (per_prompt * has).sum() / jnp.maximum(has.sum(), 1.0)


def dpo_loss(logp_PK: jax.Array, ref_logp_PK: jax.Array, ranks_PK: jax.Array, valid_PK: jax.Array,
             beta: float) -> tuple[jax.Array, jax.Array]:
    """(DPO's loss, the implicit rewards [P, K]) for K-way rankings (Rafailov et al. 2023, with every ranked pair of a
    prompt as one batch element, as the reward model's loss has them). logp_PK: log pi(y_k | x) summed over each
    completion's tokens under the policy; ref_logp_PK: the same under the frozen reference. With K = 2 this is
    -log sigmoid(beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)))), the paper's loss."""
    r_PK = beta * (logp_PK - ref_logp_PK)
    return ranking_loss(r_PK, ranks_PK, valid_PK), r_PK


def kl_rewards(logp_BT: jax.Array, ref_logp_BT: jax.Array, score_B: jax.Array, end_B: jax.Array,
               mask_BT: jax.Array, beta: float) -> jax.Array:
    """Per-token rewards: -beta * (log pi(y_t) - log pi_SFT(y_t)) at every response position, plus the reward
    model's score at position end_B (the end token, or the last sampled token of a completion that never ended,
    whose score the caller has already penalised)."""
    r_BT = -beta * (logp_BT - ref_logp_BT) * mask_BT.astype(logp_BT.dtype)
    at_end = jax.nn.one_hot(end_B, logp_BT.shape[1], dtype=logp_BT.dtype)
    return r_BT + at_end * score_B[:, None]


def gae(rewards_BT: jax.Array, values_BT: jax.Array, mask_BT: jax.Array, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[jax.Array, jax.Array]:
    """(advantages, returns) [B, T]. Positions outside the mask neither receive nor pass on credit; the value
    after the last counted position is 0 (the episode ends there)."""
    m = mask_BT.astype(rewards_BT.dtype)

    def back(carry, xs):
        next_value, next_adv = carry
        r, v, mt = xs
        delta = r + gamma * next_value - v
        adv = (delta + gamma * lam * next_adv) * mt
        # outside the mask: pass the later position's value and advantage through unchanged (padding is inert)
        return (jnp.where(mt > 0, v, next_value), jnp.where(mt > 0, adv, next_adv)), adv

    B = rewards_BT.shape[0]
    zeros = jnp.zeros((B,), rewards_BT.dtype)
    _, adv_TB = jax.lax.scan(back, (zeros, zeros), (rewards_BT.T, values_BT.T, m.T), reverse=True)
    adv_BT = adv_TB.T
    return adv_BT, (adv_BT + values_BT) * m


def whiten(x_BT: jax.Array, mask_BT: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x - mean) / std over the masked positions of the batch; zero outside the mask."""
    m = mask_BT.astype(x_BT.dtype)
    mean = _masked_mean(x_BT, m)
    var = _masked_mean((x_BT - mean) ** 2, m)
    return (x_BT - mean) * jax.lax.rsqrt(var + eps) * m


def ppo_policy_loss(logp_BT, old_logp_BT, adv_BT, mask_BT, clip: float = 0.2) -> jax.Array:
    """-mean min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) over the response positions."""
    ratio = jnp.exp(logp_BT - old_logp_BT)
    surrogate = jnp.minimum(ratio * adv_BT, jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * adv_BT)
    return -_masked_mean(surrogate, mask_BT)


def ppo_value_loss(values_BT, old_values_BT, returns_BT, mask_BT, clip: float = 0.2) -> jax.Array:
    """0.5 * mean max((v - R)^2, (v_clipped - R)^2), v_clipped within `clip` of the rollout's value."""
    clipped = old_values_BT + jnp.clip(values_BT - old_values_BT, -clip, clip)
    return 0.5 * _masked_mean(jnp.maximum((values_BT - returns_BT) ** 2, (clipped - returns_BT) ** 2), mask_BT)
