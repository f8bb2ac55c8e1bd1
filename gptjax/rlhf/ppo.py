"""InstructGPT's third stage, PPO against the reward model (Ouyang et al. 2022, section 3.5 and appendix C.4): the
pure, jit-able core and one PPO iteration over a batch of rollouts, in memory.

The core (pure functions of arrays and parameters; nothing here samples, reads files or knows about meshes):

  token_logps      log pi(y_t | y_<t) [B, T] of the tokens in a batch, at the sampling temperature (logits / T)
  token_values     the value model's V(y_<t) [B, T]: the reward run's model and scalar head read at every position
  end_positions    the last response position of each sequence (where the reward model's score goes)
  advantages       per-token rewards (losses.kl_rewards, + no_end_penalty), GAE, whitened advantages, returns
  ppo_loss         clipped policy loss + vf_coef * clipped value loss - ptx_coef * mean pretraining log-likelihood
  ppo_update       `ppo_epochs` epochs of minibatch AdamW updates of policy and value on one batch of rollouts
  prepare_batch    rollout log-probs, reference log-probs, values, advantages and rollout metrics of a batch

and, around them: `rollout` (one completion per prompt with the compiled KV-cache sampler, a pure function of
(seed, iteration)), `make_iteration` (prepare_batch + ppo_update, jitted, under a mesh) and `place` (parameters
sharded by their logical axes, rollouts by batch), `hyper` (a PPOConfig's numbers).

Alignment. Position t of a [B, T] batch holds token y_t; logp[:, t] is log pi(y_t | y_<t), read from the logits at
position t - 1, and values[:, t] is V(y_<t), read from the value model's hidden state at t - 1 (the state in which
y_t is chosen). Position 0 has neither (0). `response_BT` is 1 at the sampled tokens (the response, with its EOT
when it ended) and 0 on the prompt and the padding; every per-token quantity counts only there.

Rewards. r_t = -beta * (log pi_old(y_t) - log pi_SFT(y_t)) on every response token, plus the reward model's score
at the last response token; a completion that never ended (hit max_new_tokens) has `no_end_penalty` subtracted
from its score. GAE (gamma, lambda) with V = 0 after the last token; advantages whitened over the whole rollout
batch (its response tokens) before the minibatches are cut.

Deviations from the paper, and why:
- The no-end penalty is not in InstructGPT; it is the usual guard (from later open PPO-for-LM work) against a policy
  that learns to run to max_new_tokens where the reward model cannot see an end. no_end_penalty=0 turns it off.
- Losses are means over response tokens (per-token normalisation, losses.ppo_policy_loss / ppo_value_loss), and the
  pretraining term is the mean per-token log-likelihood of a pretraining batch times ptx_coef. The paper's
  PPO-ptx objective adds gamma * E_pretrain[log pi(x)] with gamma = 27.8, per *sequence* and summed against a
  per-sequence RL objective; with per-token means on both sides the comparable coefficient is much smaller (of
  order 27.8 scaled by the ratio of RL tokens per sequence to pretraining tokens per sequence), so ptx_coef is its
  own setting, 0 by default (PPO, not PPO-ptx).
- The value model is initialised from the reward model (as in the paper), but policy and value are updated by
  separate AdamW optimisers on one summed loss (their parameters are disjoint, so this equals two losses).
- Advantage whitening, value-loss clipping, gradient clipping (global norm 1) and AdamW's betas (0.9, 0.95) are
  standard PPO / this repository's practice; the paper does not spell them out.
- Rollouts are one completion per prompt (k=1), from code_task's prompts (not customer prompts), scored by a reward
  model trained on programmatic labelers' rankings. A completion ends where the rank stage ended the completions
  the reward model learnt from: at the token that starts a line in column 0 (the function closed; rank.STOP) or at
  EOT. That token is the last of the response (its log-prob is the sampler's, like every other), and the reward
  model reads the completion as the rank stage wrote it (the function part, + EOT), so PPO optimises the score of
  exactly the kind of text the reward model was trained to rank.
- Log-probs of the policy and of the reference are both at the sampling temperature (logits / T): the KL penalty is
  between the tempered distributions (T=1, the default, is the paper's case).
- PPO-ptx's pretraining batches: ppo_update takes one per minibatch step (the stage draws them from the policy's
  pretraining corpus as a pure function of (seed, iteration)), or one for every step of an update.
- The value model is the reward run's size (the paper used a 6B value model for every policy): small models.

The stage around this core (run directory, loop, resume, evaluation, CLI) is ppo_stage.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax.config import ModelConfig
from gptjax.heads import hidden_states
from gptjax.model import forward, vocab_mask
from gptjax.rlhf import losses

Params = Any


@dataclass(frozen=True)
class PPOHyper:
    """The numbers the pure core needs (PPOConfig carries them for the stage)."""

    temperature: float = 1.0
    beta: float = 0.02
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    vf_clip: float = 0.2
    vf_coef: float = 0.1
    ptx_coef: float = 0.0
    no_end_penalty: float = 1.0


def hyper(cfg) -> PPOHyper:
    """The pure core's numbers from a PPOConfig (gptjax/rlhf/config.py)."""
    return PPOHyper(temperature=cfg.temperature, beta=cfg.beta, gamma=cfg.gamma, lam=cfg.lam, clip=cfg.clip,
                    vf_clip=cfg.vf_clip, vf_coef=cfg.vf_coef, ptx_coef=cfg.ptx_coef, no_end_penalty=cfg.no_end_penalty)


# ----------------------------------------------------------------------------------------------
# Log-probabilities and values


def _shift(x_BT: jax.Array) -> jax.Array:
    """x[:, t-1] at position t, 0 at position 0: a prediction made at t-1 lands on the token it predicts."""
    return jnp.concatenate([jnp.zeros_like(x_BT[:, :1]), x_BT[:, :-1]], axis=1)


def token_logps(mcfg: ModelConfig, params: Params, tokens_BT: jax.Array, temperature: float = 1.0,
                dropout_key=None) -> jax.Array:
    """log pi(y_t | y_<t) [B, T] float32 under softmax(logits / temperature) (the sampler's distribution); 0 at t=0."""
    logits_BTV = forward(mcfg, params, tokens_BT, dropout_key=dropout_key) / temperature + vocab_mask(mcfg)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    nxt = jnp.take_along_axis(logp_BTV[:, :-1], tokens_BT[:, 1:, None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.concatenate([jnp.zeros_like(nxt[:, :1]), nxt], axis=1)


def token_values(mcfg: ModelConfig, vparams: Params, tokens_BT: jax.Array, dropout_key=None) -> jax.Array:
    """V(y_<t) [B, T] float32: the value model (a reward run's parameters: the model and its scalar "head") read at
    position t - 1; 0 at t=0."""
    h_BTD = hidden_states(mcfg, vparams, tokens_BT, dropout_key=dropout_key).astype(jnp.float32)
    v_BT = h_BTD @ vparams["head"]["w"] + vparams["head"]["b"]
    return _shift(v_BT)


def end_positions(response_BT: jax.Array) -> jax.Array:
    """[B] int32: the last position where response_BT is 1 (0 for an empty response)."""
    T = response_BT.shape[1]
    idx = jnp.where(response_BT.astype(bool), jnp.arange(T)[None, :], 0)
    return idx.max(axis=1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Rewards and advantages


def advantages(hp: PPOHyper, logp_BT, ref_logp_BT, values_BT, score_B, ended_B, response_BT):
    """(rewards, whitened advantages, returns), each [B, T], of one batch of rollouts."""
    m = response_BT.astype(jnp.float32)
    score = score_B.astype(jnp.float32) - hp.no_end_penalty * (1.0 - ended_B.astype(jnp.float32))
    r_BT = losses.kl_rewards(logp_BT, ref_logp_BT, score, end_positions(response_BT), m, hp.beta) * m
    adv_BT, ret_BT = losses.gae(r_BT, values_BT * m, m, hp.gamma, hp.lam)
    return r_BT, losses.whiten(adv_BT, m), ret_BT


def kl_per_sequence(logp_BT, ref_logp_BT, response_BT) -> jax.Array:
    """[B] sum over the response of log pi - log pi_SFT (the sampled-token estimate of KL(pi || pi_SFT))."""
    return ((logp_BT - ref_logp_BT) * response_BT.astype(jnp.float32)).sum(axis=1)


# ----------------------------------------------------------------------------------------------
# The loss


def ptx_loglik(mcfg: ModelConfig, params: Params, ptx_tokens_BT: jax.Array, ptx_mask_BT: jax.Array | None = None):
    """Mean per-token log-likelihood (temperature 1) of a pretraining batch; mask: the positions that count."""
    lp = token_logps(mcfg, params, ptx_tokens_BT, 1.0)
    m = jnp.ones_like(lp).at[:, 0].set(0.0) if ptx_mask_BT is None else ptx_mask_BT.astype(jnp.float32)
    return (lp * m).sum() / jnp.maximum(m.sum(), 1.0)


def ppo_loss(mcfg: ModelConfig, hp: PPOHyper, params: Params, vparams: Params, batch: dict,
             ptx_batch: dict | None = None, mcfg_value: ModelConfig | None = None) -> tuple[jax.Array, dict]:
    """(loss, metrics). batch: tokens [B, T], response [B, T], old_logp, old_values, adv, returns [B, T].
    ptx_batch: {"tokens": [B', T'], optional "mask"} (None: plain PPO; ptx_coef = 0 also gives plain PPO).
    mcfg_value: the value model's config (None: the policy's)."""
    m = batch["response"].astype(jnp.float32)
    logp = token_logps(mcfg, params, batch["tokens"], hp.temperature)
    v = token_values(mcfg_value or mcfg, vparams, batch["tokens"])
    pg = losses.ppo_policy_loss(logp, batch["old_logp"], batch["adv"], m, hp.clip)
    vf = losses.ppo_value_loss(v, batch["old_values"], batch["returns"], m, hp.vf_clip)
    loss = pg + hp.vf_coef * vf
    clipped = (jnp.abs(jnp.exp(logp - batch["old_logp"]) - 1.0) > hp.clip).astype(jnp.float32)
    metrics = {"pg_loss": pg, "vf_loss": vf, "clipfrac": (clipped * m).sum() / jnp.maximum(m.sum(), 1.0)}
    if ptx_batch is not None and hp.ptx_coef != 0.0:
        ll = ptx_loglik(mcfg, params, ptx_batch["tokens"], ptx_batch.get("mask"))
        loss = loss - hp.ptx_coef * ll
        metrics["ptx_loglik"] = ll
    metrics["loss"] = loss
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# One PPO update on a batch of rollouts


def make_optimizer(lr: float, weight_decay: float = 0.0, max_grad_norm: float = 1.0):
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), optax.adamw(lr, b1=0.9, b2=0.95,
                                                                             weight_decay=weight_decay))


def prepare_batch(mcfg_policy: ModelConfig, mcfg_value: ModelConfig, hp: PPOHyper, params, ref_params, vparams,
                  tokens_BT, response_BT, score_B, ended_B) -> tuple[dict, dict]:
    """Everything PPO needs from a batch of rollouts: the rollout policy's and the reference's log-probs, the
    values, rewards, advantages and returns; and metrics (mean score, KL per sequence, ended rate)."""
    old_logp = token_logps(mcfg_policy, params, tokens_BT, hp.temperature)
    ref_logp = token_logps(mcfg_policy, ref_params, tokens_BT, hp.temperature)
    old_values = token_values(mcfg_value, vparams, tokens_BT)
    rew, adv, ret = advantages(hp, old_logp, ref_logp, old_values, score_B, ended_B, response_BT)
    batch = {"tokens": tokens_BT, "response": response_BT, "old_logp": old_logp, "old_values": old_values,
             "adv": adv, "returns": ret}
    metrics = {"score": score_B.astype(jnp.float32).mean(),
               "kl": kl_per_sequence(old_logp, ref_logp, response_BT).mean(),
               "ended": ended_B.astype(jnp.float32).mean(), "reward_total": rew.sum(axis=1).mean()}
    return batch, metrics


def ppo_update(mcfg_policy: ModelConfig, hp: PPOHyper, opt_p, opt_v, params, vparams, opt_state_p, opt_state_v,
               batch: dict, key: jax.Array, ppo_epochs: int, minibatch: int, ptx_batch: dict | None = None,
               mcfg_value: ModelConfig | None = None):
    """`ppo_epochs` epochs over the batch in minibatches of `minibatch` sequences (a fresh permutation per epoch
    from `key`), each an AdamW step of policy and value. ptx_batch: one pretraining batch {"tokens": [B', T']}
    for every step, or one per step {"tokens": [ppo_epochs * B / minibatch, B', T']} (a leading axis of that
    length). mcfg_value: the value model's config (None: the policy's). Returns (params, vparams, opt states,
    mean metrics, incl. the policy's and the value model's gradient norms)."""
    B = batch["tokens"].shape[0]
    if B % minibatch:
        raise ValueError(f"the rollout batch ({B}) is not a multiple of the minibatch ({minibatch})")
    n_mb = B // minibatch
    n_steps = ppo_epochs * n_mb
    per_step = ptx_batch is not None and ptx_batch["tokens"].ndim == 3
    if per_step and ptx_batch["tokens"].shape[0] != n_steps:
        raise ValueError(f"{ptx_batch['tokens'].shape[0]} pretraining batches for {n_steps} update steps")

    def step(carry, xs):
        p, vp, sp, sv = carry
        idx, ptx = xs
        mb = jax.tree.map(lambda x: x[idx], batch)
        (_, met), (gp, gv) = jax.value_and_grad(
            lambda a, b: ppo_loss(mcfg_policy, hp, a, b, mb, ptx, mcfg_value), argnums=(0, 1), has_aux=True)(p, vp)
        up, sp = opt_p.update(gp, sp, p)
        uv, sv = opt_v.update(gv, sv, vp)
        met = {**met, "grad_norm": optax.tree.norm(gp), "value_grad_norm": optax.tree.norm(gv)}
        return (optax.apply_updates(p, up), optax.apply_updates(vp, uv), sp, sv), met

    perms = jnp.stack([jax.random.permutation(k, B) for k in jax.random.split(key, ppo_epochs)])
    idx = perms.reshape(n_steps, minibatch)
    if per_step:
        (params, vparams, opt_state_p, opt_state_v), mets = jax.lax.scan(
            step, (params, vparams, opt_state_p, opt_state_v), (idx, ptx_batch))
    else:
        (params, vparams, opt_state_p, opt_state_v), mets = jax.lax.scan(
            lambda c, i: step(c, (i, ptx_batch)), (params, vparams, opt_state_p, opt_state_v), idx)
    return params, vparams, opt_state_p, opt_state_v, jax.tree.map(jnp.mean, mets)


# ----------------------------------------------------------------------------------------------
# Rollouts and one PPO iteration in memory (ppo_stage.py runs them in the shared loop)


def rollout_seed(seed: int, iteration: int) -> int:
    """The sampler's seed for an iteration: a pure function of (seed, iteration)."""
    return int(np.random.SeedSequence([seed, 0x5050, iteration]).generate_state(1)[0] >> 1)


def rollout(mcfg: ModelConfig, params: Params, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
            temperature: float, seed: int, iteration: int, eot_id: int, pad_id: int, T: int,
            batch_size: int = 64, stop: Sequence[str] = (), decode: Callable | None = None) -> dict:
    """One completion per prompt from the policy's current params with the compiled KV-cache sampler. A completion
    ends when it samples EOT (which is then the last token of its response) or, with `stop` strings (and the
    tokenizer's `decode`), at the token that completes one: that token is the last of its response, so the
    response is exactly the sampled tokens and their log-probs are the sampler's. Returns numpy arrays: tokens
    [B, T] (padded with pad_id), response [B, T], ended [B], closed [B] (ended by a stop string); and lists: seqs
    (the unpadded prompt + response ids) and new (each response's sampled ids, without EOT)."""
    from gptjax.generate import generate

    new = generate(mcfg, params, [list(p) for p in prompt_ids], max_new_tokens, temperature=temperature,
                   seed=rollout_seed(seed, iteration), eot_id=eot_id, stop=tuple(stop), decode=decode,
                   batch_size=batch_size)
    B = len(prompt_ids)
    tokens = np.full((B, T), pad_id, np.int32)
    response = np.zeros((B, T), np.float32)
    ended = np.zeros((B,), np.float32)
    closed = np.zeros((B,), np.float32)
    seqs = []
    for b, (p, n) in enumerate(zip(prompt_ids, new)):
        text = decode(n) if stop else ""
        stopped = bool(stop) and any(s and s in text for s in stop)
        eot = not stopped and len(n) < max_new_tokens
        resp = list(n) + ([eot_id] if eot else [])
        if len(list(p)) + len(resp) > T:
            raise ValueError(f"prompt {b}: {len(p)} prompt + {len(resp)} response tokens exceed T={T}")
        seq = list(p) + resp
        tokens[b, :len(seq)] = seq
        response[b, len(p):len(seq)] = 1.0
        ended[b], closed[b] = float(stopped or eot), float(stopped)
        seqs.append(seq)
    return {"tokens": tokens, "response": response, "ended": ended, "closed": closed, "seqs": seqs,
            "new": [list(n) for n in new]}


def make_iteration(mcfg: ModelConfig, hp: PPOHyper, opt_p, opt_v, *, ppo_epochs: int, minibatch: int,
                   mesh=None, rules: str = "fsdp", mcfg_value: ModelConfig | None = None) -> Callable:
    """A jitted fn(params, ref_params, vparams, opt_state_p, opt_state_v, tokens, response, score, ended, key) ->
    (params, vparams, opt states, metrics): prepare_batch, then ppo_update. With a mesh, the model code's
    activation constraints apply (use_mesh) and the caller places the inputs (`place`)."""
    from gptjax.sharding import use_mesh

    mv = mcfg_value or mcfg

    def it(params, ref_params, vparams, sp, sv, tokens, response, score, ended, key):
        batch, m0 = prepare_batch(mcfg, mv, hp, params, ref_params, vparams, tokens, response, score, ended)
        params, vparams, sp, sv, m1 = ppo_update(mcfg, hp, opt_p, opt_v, params, vparams, sp, sv, batch, key,
                                                 ppo_epochs, minibatch, mcfg_value=mv)
        return params, vparams, sp, sv, {**m0, **m1}

    jitted = jax.jit(it)
    if mesh is None:
        return jitted

    def run(*args):
        with use_mesh(mesh, rules):
            return jitted(*args)

    return run


def place(mcfg: ModelConfig, mesh, rules: str, params, ref_params, vparams, tokens, response, score, ended,
          mcfg_value: ModelConfig | None = None):
    """Params sharded by the model's logical axes (the value model's head by reward.head_axes), the rollout batch
    by its batch axis."""
    from gptjax.model import logical_axes
    from gptjax.rlhf.reward import head_axes
    from gptjax.sharding import batch_sharding, tree_shardings

    ps = tree_shardings(logical_axes(mcfg), params, mesh, rules)
    vs = tree_shardings({**logical_axes(mcfg_value or mcfg), "head": head_axes()}, vparams, mesh, rules)
    put = lambda x, n: jax.device_put(jnp.asarray(x), batch_sharding(mesh, rules, n))
    return (jax.device_put(params, ps), jax.device_put(ref_params, ps), jax.device_put(vparams, vs),
            put(tokens, 2), put(response, 2), put(score, 1), put(ended, 1))
