"""Best-of-n sampling against a reward model: the no-RL baseline of reward over-optimisation (Gao et al. 2022).

`python rlhf.py bon SFT_RUN --reward RM_RUN --n 64 --out bon.json` samples N completions of each held-out prompt of
the code task from the policy (the compiled KV-cache sampler, completions cut as the rank stage cuts them), scores
each with the reward model (the proxy) and with code_task.true_score (the labelers' noise-free mean), and reports,
for n = 1, 2, 4, ..., N, the expected proxy and true score of the completion the reward model ranks first among n:
the unbiased estimate from all N samples (Nakano et al. 2021, Gao et al. 2022): with the N completions sorted by
reward-model score, the i-th (1-based, ascending) is the best of a uniformly drawn n-subset with probability
C(i-1, n-1) / C(N, n). Its KL to the sampling policy is the analytic log n - (n-1)/n, so best-of-n sits on the same
sqrt(KL) axis as PPO's evaluations (ppo_stage). Standard errors are over prompts.
"""

from __future__ import annotations

import math
from pathlib import Path
import numpy as np

from gptjax.errors import ConfigError, DataError


def bon_weights(N: int, n: int) -> np.ndarray:
    """[N] probabilities that the i-th smallest of N scores is the largest of a uniform n-subset."""
    if not 1 <= n <= N:
        raise ValueError(f"n={n} must be in 1..{N}")
    i = np.arange(1, N + 1)
    w = np.array([math.comb(int(k) - 1, n - 1) for k in i], np.float64) / math.comb(N, n)
    return w


def best_of_n_scores(proxy_PN: np.ndarray, true_PN: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt [P]: the expected proxy and true score of the proxy's best of n, from N samples each (ties in the
    proxy broken by sample index)."""
    P, N = proxy_PN.shape
    order = np.argsort(proxy_PN, axis=1, kind="stable")
    w = bon_weights(N, n)
    proxy = (np.take_along_axis(proxy_PN, order, axis=1) * w).sum(axis=1)
    true = (np.take_along_axis(true_PN, order, axis=1) * w).sum(axis=1)
    return proxy, true


def kl_bon(n: int) -> float:
    """KL(best-of-n || policy) = log n - (n - 1) / n (nats)."""
    return math.log(n) - (n - 1) / n


def _se(x: np.ndarray) -> float | None:
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None


def best_of_n(policy: str, reward: str, *, n: int = 64, split: str = "val", prompts: int = 0, max_new_tokens: int = 128,
              temperature: float = 1.0, seed: int = 0, batch_size: int = 64, log=print) -> dict:
    """The best-of-n curve of a policy run against a reward-model run (module docstring). prompts: 0 for every
    prompt of the split that fits, else a seeded subset of that many."""
    from gptjax.rlhf import code_task
    from gptjax.rlhf import rank as rank_lib
    from gptjax.rlhf.reward import load_reward_model, tokenizer_fingerprint

    if n < 1 or n & (n - 1):
        raise ConfigError(f"--n {n}: give a power of two (the curve is reported at n = 1, 2, 4, ..., N)")
    if prompts < 0:
        raise ConfigError(f"--prompts {prompts}: give 0 (every prompt) or a positive number")
    run = rank_lib._load(policy)
    _, _, _, scorer = load_reward_model(reward, batch_size=batch_size, log=log)
    if tokenizer_fingerprint(run.tokenizer) != scorer.tokenizer_fingerprint:
        raise DataError(f"the reward model {reward} reads another tokenizer than the policy {policy}; give a reward "
                        f"model trained from this policy's lineage")
    tok, T = run.tokenizer, run.cfg.model.block_size
    room = min(T, scorer.max_len)
    found = code_task.prompts(split, data_cfg=run.cfg.data)
    ids = tok.encode_batch([e.prompt for e in found]) if found else []
    fit = [e for e, x in zip(found, ids) if len(x) + max_new_tokens + 1 <= room]
    if not fit:
        raise DataError(f"no {split} prompt of the code task leaves room for max_new_tokens={max_new_tokens} in "
                        f"{room} tokens; lower --max-new-tokens")
    if prompts and prompts < len(fit):
        keep = np.sort(np.random.default_rng(seed).choice(len(fit), size=prompts, replace=False))
        fit = [fit[i] for i in keep]
    log(f"best-of-{n}: {len(fit)} {split} prompts x {n} samples from {policy}, scored by {reward}")
    comps = rank_lib.sample_completions(run, fit, n, max_new_tokens=max_new_tokens, temperature=temperature,
                                        seed=seed, batch_size=max(batch_size, n), progress=True)
    flat = [(e, c) for e, cs in zip(fit, comps) for c in cs]
    proxy = np.asarray(scorer([e.prompt for e, _ in flat], [t for _, (t, _) in flat], [d for _, (_, d) in flat]),
                       np.float64).reshape(len(fit), n)
    true = np.array([code_task.true_score(e, t, d) for e, (t, d) in flat], np.float64).reshape(len(fit), n)
    curve = []
    k = 1
    while k <= n:
        p, t = best_of_n_scores(proxy, true, k)
        kl = kl_bon(k)
        curve.append({"n": k, "kl": kl, "sqrt_kl": math.sqrt(kl), "rm_score": float(p.mean()), "rm_score_se": _se(p),
                      "true_score": float(t.mean()), "true_score_se": _se(t)})
        k *= 2
    for c in curve:
        log(f"n={c['n']:3d}  sqrt(KL) {c['sqrt_kl']:.3f}  reward model {c['rm_score']:+.3f}  true score "
            f"{c['true_score']:.3f} +- {c['true_score_se'] or 0:.3f}")
    return {"policy": str(Path(policy)), "reward": str(Path(reward)), "split": split, "n_prompts": len(fit),
            "n": n, "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed, "curve": curve}

