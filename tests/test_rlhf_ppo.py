"""PPO's pure core (gptjax/rlhf/ppo.py) on a tiny model: log-probs at the temperature, rewards, advantages against
numpy, the policy gradient at ratio 1, ptx_coef = 0, and one minibatch update."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import ModelConfig
from gptjax.model import forward, init_params
from gptjax.rlhf import losses, ppo
from gptjax.rlhf.reward import init_head

B, T = 4, 10
MCFG = ModelConfig(name="t", vocab_size=50, vocab_multiple=64, block_size=16, n_layer=2, n_head=2, d_model=32)
HP = ppo.PPOHyper(temperature=0.7, beta=0.05, vf_coef=0.3, ptx_coef=0.5, no_end_penalty=1.5)


@pytest.fixture(scope="module")
def setup():
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    params = init_params(MCFG, k[0])
    ref = init_params(MCFG, k[1])
    vparams = dict(init_params(MCFG, k[2]))
    vparams["head"] = init_head(MCFG, k[3])
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, MCFG.vocab_size, size=(B, T)), jnp.int32)
    resp = np.zeros((B, T), np.float32)
    for b, (s, e) in enumerate([(3, 10), (4, 7), (2, 9), (5, 6)]):  # prompt [0, s), response [s, e), padding after
        resp[b, s:e] = 1.0
    return params, ref, vparams, tokens, jnp.asarray(resp)


def test_token_logps_are_the_log_softmax_at_the_temperature(setup):
    params, _, _, tokens, _ = setup
    got = np.asarray(ppo.token_logps(MCFG, params, tokens, 0.7))
    logits = np.asarray(forward(MCFG, params, tokens), np.float64)[..., :MCFG.vocab_size] / 0.7
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    tok = np.asarray(tokens)
    want = np.zeros((B, T))
    for b in range(B):
        for t in range(1, T):
            want[b, t] = logits[b, t - 1, tok[b, t]] - lse[b, t - 1]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_end_positions_is_the_last_response_token(setup):
    *_, resp = setup
    assert np.asarray(ppo.end_positions(resp)).tolist() == [9, 6, 8, 5]


def test_advantages_match_a_numpy_reference(setup):
    *_, resp = setup
    rng = np.random.default_rng(1)
    logp, ref, v = (rng.normal(size=(B, T)) for _ in range(3))
    score, ended = rng.normal(size=B), np.array([1, 0, 1, 0], np.float32)
    r, adv, ret = (np.asarray(x) for x in ppo.advantages(HP, *(jnp.asarray(a, jnp.float32) for a in
                                                               (logp, ref, v, score, ended, resp))))
    m = np.asarray(resp)
    want_r = -HP.beta * (logp - ref) * m
    raw = np.zeros((B, T))
    for b in range(B):
        idx = np.nonzero(m[b])[0]
        want_r[b, idx[-1]] += score[b] - HP.no_end_penalty * (1 - ended[b])
        nv, na = 0.0, 0.0
        for t in idx[::-1]:
            delta = want_r[b, t] + HP.gamma * nv - v[b, t]
            na = delta + HP.gamma * HP.lam * na
            raw[b, t], nv = na, v[b, t]
    np.testing.assert_allclose(r, want_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, (raw + v) * m, rtol=1e-5, atol=1e-5)
    sel = m > 0
    want_adv = np.where(sel, (raw - raw[sel].mean()) / np.sqrt(raw[sel].var() + 1e-8), 0.0)
    np.testing.assert_allclose(adv, want_adv, rtol=1e-4, atol=1e-5)


def test_beta_zero_makes_rewards_independent_of_the_reference(setup):
    *_, resp = setup
    rng = np.random.default_rng(2)
    logp, ref1, ref2, v = (jnp.asarray(rng.normal(size=(B, T)), jnp.float32) for _ in range(4))
    score, ended = jnp.asarray(rng.normal(size=B), jnp.float32), jnp.ones(B)
    hp0 = dataclasses.replace(HP, beta=0.0)
    a = ppo.advantages(hp0, logp, ref1, v, score, ended, resp)
    b = ppo.advantages(hp0, logp, ref2, v, score, ended, resp)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    c = ppo.advantages(HP, logp, ref1, v, score, ended, resp)[0]
    assert not np.allclose(np.asarray(c), np.asarray(a[0]))  # and with beta > 0 it does depend on it


def test_ppo_policy_gradient_at_ratio_one_is_the_plain_policy_gradient(setup):
    params, _, _, tokens, resp = setup
    mcfg = MCFG
    adv = jnp.asarray(np.random.default_rng(3).normal(size=(B, T)), jnp.float32)
    old = jax.lax.stop_gradient(ppo.token_logps(mcfg, params, tokens, HP.temperature))

    def ppo_pg(p):
        return losses.ppo_policy_loss(ppo.token_logps(mcfg, p, tokens, HP.temperature), old, adv, resp, HP.clip)

    def plain_pg(p):
        lp = ppo.token_logps(mcfg, p, tokens, HP.temperature)
        return -(adv * lp * resp).sum() / resp.sum()

    g1, g2 = jax.grad(ppo_pg)(params), jax.grad(plain_pg)(params)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g1)) > 1e-4  # not trivially zero


@pytest.fixture(scope="module")
def rollout_batch(setup):
    """prepare_batch of the setup's rollouts (it does not depend on ptx_coef)."""
    params, ref, vparams, tokens, resp = setup
    score = jnp.asarray([0.5, -1.0, 2.0, 0.1], jnp.float32)
    ended = jnp.asarray([1, 0, 1, 1], jnp.float32)
    return ppo.prepare_batch(MCFG, MCFG, HP, params, ref, vparams, tokens, resp, score, ended)


def test_ptx_coef_zero_is_plain_ppo_exactly(setup, rollout_batch):
    params, _, vparams, _, _ = setup
    batch, _ = rollout_batch
    ptx = {"tokens": jnp.asarray(np.random.default_rng(4).integers(0, MCFG.vocab_size, (3, 12)), jnp.int32)}
    hp0 = dataclasses.replace(HP, ptx_coef=0.0)
    f = jax.jit(jax.value_and_grad(lambda a, b, x: ppo.ppo_loss(MCFG, hp0, a, b, batch, x)[0], argnums=(0, 1)))
    l0, g0 = f(params, vparams, ptx)
    l1, g1 = f(params, vparams, None)
    assert float(l0) == float(l1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # and ptx_coef > 0 subtracts ptx_coef times the pretraining log-likelihood
    l2 = jax.jit(lambda a, b, x: ppo.ppo_loss(MCFG, HP, a, b, batch, x)[0])(params, vparams, ptx)
    ll = float(ppo.ptx_loglik(MCFG, params, ptx["tokens"]))
    np.testing.assert_allclose(float(l2), float(l1) - HP.ptx_coef * ll, rtol=1e-5)


def test_value_loss_gradient_reaches_only_the_value_model(setup, rollout_batch):
    params, _, vparams, _, _ = setup
    batch, _ = rollout_batch
    hp = dataclasses.replace(HP, ptx_coef=0.0)
    gp, gv = jax.grad(lambda a, b: ppo.ppo_loss(MCFG, hp, a, b, batch)[0], argnums=(0, 1))(params, vparams)
    gp_pg = jax.grad(lambda a: losses.ppo_policy_loss(ppo.token_logps(MCFG, a, batch["tokens"], hp.temperature),
                                                      batch["old_logp"], batch["adv"], batch["response"],
                                                      hp.clip))(params)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gp_pg)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(gv["head"]["w"]).max()) > 0


def test_ppo_update_runs_epochs_of_minibatches_and_moves_both_models(setup, rollout_batch):
    params, _, vparams, _, _ = setup
    hp = dataclasses.replace(HP, ptx_coef=0.0)
    batch, met = rollout_batch
    assert set(met) == {"score", "kl", "ended", "reward_total"}
    np.testing.assert_allclose(float(met["ended"]), 0.75)
    opt = ppo.make_optimizer(1e-3)
    sp, sv = opt.init(params), opt.init(vparams)
    fn = jax.jit(lambda *a: ppo.ppo_update(MCFG, hp, opt, opt, *a, ppo_epochs=2, minibatch=2))
    p1, v1, sp1, _, m = fn(params, vparams, sp, sv, batch, jax.random.PRNGKey(0))
    assert int(sp1[1][0].count) == 4  # 2 epochs x 2 minibatches
    assert np.isfinite(float(m["loss"]))
    # the first minibatch step is at ratio 1: nothing clipped on average over the update is < 1
    assert 0.0 <= float(m["clipfrac"]) < 1.0
    moved = lambda a, b: max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert moved(p1, params) > 0 and moved(v1, vparams) > 0
    # deterministic in the key
    p2, *_ = fn(params, vparams, sp, sv, batch, jax.random.PRNGKey(0))
    assert moved(p1, p2) == 0.0
    with pytest.raises(ValueError, match="multiple of the minibatch"):
        ppo.ppo_update(MCFG, hp, opt, opt, params, vparams, sp, sv, batch, jax.random.PRNGKey(0), 1, 3)


def test_rollout_is_a_pure_function_of_seed_and_iteration(setup):
    params = setup[0]
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    kw = {"max_new_tokens": 5, "temperature": 1.0, "seed": 7, "eot_id": 0, "pad_id": 0, "T": 12, "batch_size": 4}
    a = ppo.rollout(MCFG, params, prompts, iteration=0, **kw)
    b = ppo.rollout(MCFG, params, prompts, iteration=0, **kw)
    c = ppo.rollout(MCFG, params, prompts, iteration=1, **kw)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], c["tokens"])
    for i, p in enumerate(prompts):
        n = int(a["response"][i].sum())
        assert a["tokens"][i, :len(p)].tolist() == p and a["response"][i, :len(p)].sum() == 0
        assert a["seqs"][i] == a["tokens"][i, :len(p) + n].tolist()
        assert (n <= 5) if a["ended"][i] == 0 else (a["seqs"][i][-1] == 0 and n <= 6)
        assert a["ended"][i] == 1 or n == 5


def test_one_iteration_on_8_devices_equals_1_device():
    from gptjax.config import MeshConfig
    from gptjax.sharding import make_mesh

    assert len(jax.devices()) >= 8
    Bm = 8
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    params, ref = init_params(MCFG, k[0]), init_params(MCFG, k[1])
    vparams = {**init_params(MCFG, k[2]), "head": init_head(MCFG, k[3])}
    rng = np.random.default_rng(5)
    tokens = rng.integers(0, MCFG.vocab_size, size=(Bm, T)).astype(np.int32)
    resp = np.zeros((Bm, T), np.float32)
    for b in range(Bm):
        resp[b, 2 + b % 3: T - b % 2] = 1.0
    score = rng.normal(size=Bm).astype(np.float32)
    ended = (np.arange(Bm) % 3 != 0).astype(np.float32)
    opt = ppo.make_optimizer(1e-3)
    hp = dataclasses.replace(HP, ptx_coef=0.0)
    outs = []
    for n, data, fsdp in ((1, 1, 1), (8, 2, 4)):  # 8: the batch over data x fsdp, the parameters over fsdp
        mesh = make_mesh(MeshConfig(data=data, fsdp=fsdp), jax.devices()[:n])
        args = ppo.place(MCFG, mesh, "fsdp", params, ref, vparams, tokens, resp, score, ended)
        p, r, v = args[:3]
        if n == 8:
            assert len(args[3].sharding.device_set) == 8
            assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(p))
        it = ppo.make_iteration(MCFG, hp, opt, opt, ppo_epochs=2, minibatch=4, mesh=mesh)
        outs.append(jax.device_get(it(p, r, v, opt.init(p), opt.init(v), *args[3:], jax.random.PRNGKey(2))))
    (p1, v1, _, _, m1), (p8, v8, _, _, m8) = outs
    # 4 Adam steps at lr 1e-3 move an element by up to 4e-3; one whose gradient is ~0 can land ~1e-5 apart
    # under another summation order (seen between AVX2 and AVX-512 CPUs); a sharding bug moves them by ~lr
    for a, b in zip(jax.tree.leaves((p1, v1)), jax.tree.leaves((p8, v8))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-4)
    for key in m1:
        np.testing.assert_allclose(float(m1[key]), float(m8[key]), rtol=1e-5, atol=1e-6, err_msg=key)
    assert jax.tree.leaves(p1)[0].shape == jax.tree.leaves(params)[0].shape


def test_ppo_config_defaults_overrides_and_validation():
    from gptjax.errors import ConfigError
    from gptjax.rlhf.config import PPOConfig, resolve_ppo

    cfg = resolve_ppo(["init_from=runs/sft", "reward=runs/reward", "beta=0.05", "minibatch=8"])
    assert (cfg.beta, cfg.gamma, cfg.lam, cfg.clip, cfg.k, cfg.ptx_coef, cfg.run_dir) == \
        (0.05, 1.0, 0.95, 0.2, 1, 0.0, "runs/ppo")
    hp = ppo.hyper(cfg)
    assert (hp.beta, hp.temperature, hp.no_end_penalty) == (0.05, 1.0, PPOConfig().no_end_penalty)
    base = ["init_from=runs/sft", "reward=runs/reward"]
    for bad, msg in [([], "SFT run"), (base[:1], "reward-model run"), (base + ["k=2"], "k must be 1"),
                     (base + ["minibatch=5"], "must divide"), (base + ["temperature=0"], "temperature"),
                     (base + ["run_dir=runs/reward"], "reward run itself")]:
        with pytest.raises(ConfigError, match=msg):
            resolve_ppo(bad)
