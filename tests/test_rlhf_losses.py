"""InstructGPT's pure losses against hand computations (plain Python loops over the definitions)."""

from __future__ import annotations

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.rlhf import losses

RNG = np.random.default_rng(0)


def test_masked_lm_loss_counts_only_response_tokens():
    nats = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], np.float32)
    resp = np.array([[0, 0, 1, 1], [0, 1, 1, 0]], np.float32)
    assert math.isclose(float(losses.masked_lm_loss(nats, resp)), (3 + 4 + 6 + 7) / 4, rel_tol=1e-6)


def test_ranking_loss_is_the_mean_over_each_prompts_pairs_with_ties_dropped():
    K = 5
    r = RNG.normal(size=(3, K)).astype(np.float32)
    ranks = np.array([[0, 1, 2, 3, 4], [0, 0, 1, 2, 9], [2, 1, 0, 0, 0]])
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)  # K = 5, 4, 3
    per_prompt = []
    for p in range(3):
        terms = [-math.log(1 / (1 + math.exp(-(r[p, i] - r[p, j]))))
                 for i, j in itertools.permutations(range(K), 2)
                 if valid[p, i] and valid[p, j] and ranks[p, i] < ranks[p, j]]
        per_prompt.append(sum(terms) / len(terms))
    # prompt 0: C(5,2) = 10 pairs; prompt 1: C(4,2) - 1 tie = 5; prompt 2: 3 completions, one tie -> 2 pairs
    assert math.isclose(float(losses.ranking_loss(jnp.asarray(r), jnp.asarray(ranks), jnp.asarray(valid))),
                        sum(per_prompt) / 3, rel_tol=1e-5)


def test_ranking_loss_ignores_a_prompt_whose_completions_all_tie():
    r = jnp.asarray([[1.0, 0.0], [3.0, -3.0]])
    ranks = jnp.asarray([[0, 0], [0, 1]])
    got = float(losses.ranking_loss(r, ranks, jnp.ones((2, 2), bool)))
    assert math.isclose(got, -math.log(1 / (1 + math.exp(-6.0))), rel_tol=1e-5)


def test_kl_rewards_penalise_divergence_and_add_the_score_at_the_end_token():
    logp = np.log(np.array([[0.5, 0.2, 0.1, 0.9]], np.float32))
    ref = np.log(np.array([[0.25, 0.2, 0.2, 0.9]], np.float32))
    mask = np.array([[1, 1, 1, 0]], np.float32)
    got = np.asarray(losses.kl_rewards(logp, ref, jnp.asarray([2.0]), jnp.asarray([2]), mask, beta=0.02))
    want = [-0.02 * math.log(2), 0.0, -0.02 * math.log(0.5) + 2.0, 0.0]
    np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-7)


def test_gae_matches_the_recursion_and_padding_is_inert():
    B, T, gamma, lam = 2, 6, 1.0, 0.95
    r = RNG.normal(size=(B, T)).astype(np.float32)
    v = RNG.normal(size=(B, T)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], np.float32)
    adv, ret = (np.asarray(x) for x in losses.gae(r, v, mask, gamma, lam))
    for b in range(B):
        n = int(mask[b].sum())
        a, want = 0.0, np.zeros(T)
        for t in reversed(range(n)):
            next_v = v[b, t + 1] if t + 1 < n else 0.0
            a = r[b, t] + gamma * next_v - v[b, t] + gamma * lam * a
            want[t] = a
        np.testing.assert_allclose(adv[b], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ret[b, :n], want[:n] + v[b, :n], rtol=1e-5, atol=1e-6)
    assert (adv[1, 4:] == 0).all() and (ret[1, 4:] == 0).all()
    # what lies in the padding does not change a thing
    r2, v2 = r.copy(), v.copy()
    r2[1, 4:], v2[1, 4:] = 100.0, -100.0
    np.testing.assert_array_equal(np.asarray(losses.gae(r2, v2, mask, gamma, lam)[0]), adv)


def test_whiten_has_zero_mean_unit_variance_over_the_mask():
    x = RNG.normal(3.0, 5.0, size=(3, 7)).astype(np.float32)
    mask = (RNG.random((3, 7)) > 0.3).astype(np.float32)
    w = np.asarray(losses.whiten(x, mask))
    sel = w[mask > 0]
    assert abs(sel.mean()) < 1e-5 and abs(sel.std() - 1) < 1e-3
    assert (w[mask == 0] == 0).all()


def test_ppo_policy_loss_clips_the_ratio_on_the_side_that_helps():
    old = np.zeros((1, 4), np.float32)
    logp = np.log(np.array([[1.5, 0.5, 1.5, 0.5]], np.float32))  # ratios 1.5, 0.5, 1.5, 0.5
    adv = np.array([[1.0, 1.0, -1.0, -1.0]], np.float32)
    got = float(losses.ppo_policy_loss(logp, old, adv, np.ones((1, 4)), clip=0.2))
    # min(r A, clip(r) A): 1.2 (clipped), 0.5 (unclipped: worse), -1.5 (unclipped: worse), -0.8 (clipped)
    assert math.isclose(got, -(1.2 + 0.5 - 1.5 - 0.8) / 4, rel_tol=1e-5)


def test_ppo_value_loss_takes_the_worse_of_clipped_and_unclipped():
    old = np.zeros((1, 2), np.float32)
    v = np.array([[1.0, -0.1]], np.float32)
    ret = np.array([[1.0, 0.5]], np.float32)
    got = float(losses.ppo_value_loss(v, old, ret, np.ones((1, 2)), clip=0.2))
    # position 0: unclipped error 0, clipped (0.2) error 0.64 -> 0.64; position 1: both inside the clip -> 0.36
    assert math.isclose(got, 0.5 * (0.64 + 0.36) / 2, rel_tol=1e-5)


def test_dpo_loss_is_the_papers_loss_for_a_pair_and_log_2_at_the_reference():
    beta = 0.3
    lp = jnp.array([[-3.0, -5.5]])  # completion 0 ranked above completion 1
    ref = jnp.array([[-4.0, -5.0]])
    ranks, valid = jnp.array([[0, 1]]), jnp.ones((1, 2))
    loss, r = losses.dpo_loss(lp, ref, ranks, valid, beta)
    margin = beta * ((-3.0 - -4.0) - (-5.5 - -5.0))
    assert float(loss) == pytest.approx(math.log1p(math.exp(-margin)), rel=1e-6)  # -log sigmoid(margin)
    np.testing.assert_allclose(np.asarray(r), beta * (np.asarray(lp) - np.asarray(ref)), rtol=1e-6)
    same, _ = losses.dpo_loss(ref, ref, ranks, valid, beta)  # the policy is the reference: every reward is 0
    assert float(same) == pytest.approx(math.log(2.0), rel=1e-6)


def test_dpo_loss_over_k_completions_is_the_ranking_loss_of_the_implicit_reward_in_any_order():
    rng = np.random.default_rng(3)
    lp, ref = rng.normal(size=(2, 5)) - 4, rng.normal(size=(2, 5)) - 4
    ranks = np.array([[0, 2, 1, 3, 3], [1, 0, 0, 2, 0]])
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], np.float32)
    loss, _ = losses.dpo_loss(jnp.asarray(lp), jnp.asarray(ref), jnp.asarray(ranks), jnp.asarray(valid), 0.1)
    want = losses.ranking_loss(jnp.asarray(0.1 * (lp - ref)), jnp.asarray(ranks), jnp.asarray(valid))
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    perm = np.array([3, 0, 4, 1, 2])
    perm_valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], np.float32)  # row 1's padding slot stays last
    perm1 = np.array([2, 0, 3, 1, 4])
    shuffled = [(lp[0, perm], ref[0, perm], ranks[0, perm]), (lp[1, perm1], ref[1, perm1], ranks[1, perm1])]
    got, _ = losses.dpo_loss(jnp.asarray(np.stack([s[0] for s in shuffled])),
                             jnp.asarray(np.stack([s[1] for s in shuffled])),
                             jnp.asarray(np.stack([s[2] for s in shuffled])), jnp.asarray(perm_valid), 0.1)
    assert float(got) == pytest.approx(float(loss), rel=1e-6)
