"""KV-cache generation: the cached decoder gives exactly what recomputing the whole forward pass gives,
for dense and banded (rolling-cache) layers, batched prompts of different lengths, greedy and sampled."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import config, model
from gptjax import generate as gen

V = 300


def make(pattern="dense,banded", window=5, block=64, norm="pre", **kw):
    # A large init std makes a random model's greedy continuations varied rather than one repeated token.
    over = ["model.n_layer=2", "model.scan_layers=true", "model.d_model=64", "model.n_head=4", f"model.block_size={block}",
            f"model.vocab_size={V}", f"model.attention_pattern={pattern}", f"model.local_window={window}",
            "model.init_std=0.6", f"model.norm={norm}"]
    cfg = config.resolve("tiny", over).model
    cfg = dataclasses.replace(cfg, **kw)
    return cfg, jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(1))


def prompts_of(*lens, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(0, V, n)] for n in lens]


def assert_same_greedy(cfg, params, prompts, a, b, tol=1e-4):
    """Greedy continuations a and b are equal, except where a row's two continuations part at an exact tie:
    the two tokens chosen there are the model's top two, within `tol` nats of each other (float32 rounding in
    another summation order picks either; on a 2-core Intel Xeon with AVX-512, 2026-12-03, one row of the
    dense,banded case parts at a gap of 7.5e-6). Every other row must match exactly."""
    parted = 0
    for p, x, y in zip(prompts, a, b):
        if x == y:
            continue
        i = next(k for k in range(min(len(x), len(y))) if x[k] != y[k])
        logits = np.asarray(model.forward(cfg, params, jnp.asarray([p + y[:i]]))[0, -1] + model.vocab_mask(cfg))
        top = [int(t) for t in np.argsort(logits)[::-1][:2]]
        assert sorted(top) == sorted([x[i], y[i]]), (i, x[i], y[i], top, logits[top])
        assert abs(logits[top[0]] - logits[top[1]]) < tol, (i, logits[top])
        parted += 1
    assert parted <= 1, f"{parted} rows part: more than a tie"


@pytest.mark.parametrize("pattern,window,norm", [("dense", 256, "pre"), ("dense,banded", 5, "pre"),
                                                 ("banded", 3, "post")])
def test_greedy_with_cache_equals_full_recompute(pattern, window, norm):
    cfg, params = make(pattern, window, norm=norm)
    prompts = prompts_of(3, 11, 1, 20)
    cached = gen.generate(cfg, params, prompts, 30, batch_size=4)
    full = gen.generate_uncached(cfg, params, prompts, 30)
    assert_same_greedy(cfg, params, prompts, cached, full)
    assert all(len(c) == 30 for c in cached)
    assert len(set(sum(cached, []))) > 10, "degenerate continuations would make this test vacuous"
    if pattern == "dense,banded":  # batch composition does not change greedy results
        assert_same_greedy(cfg, params, prompts, gen.generate(cfg, params, prompts, 30, batch_size=1), cached)


def test_cached_logits_match_the_forward_pass_at_every_position():
    cfg, params = make("dense,banded", 4, block=32)
    prompts = prompts_of(2, 9)
    lens = np.array([2, 9], np.int32)
    tokens = np.zeros((2, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    cache, tok = gen._prefill(cfg, params, tokens, lens, 32, jax.random.key(0), jnp.float32(0), jnp.int32(0),
                              jnp.float32(1))
    seqs = [p + [int(t)] for p, t in zip(prompts, np.asarray(tok))]
    pos = lens.copy()
    step = jax.jit(gen.decode_step, static_argnums=0)
    fwd = jax.jit(model.forward, static_argnums=0)
    for _ in range(12):
        cache, logits = step(cfg, params, cache, jnp.asarray([s[-1] for s in seqs]), jnp.asarray(pos))
        window = np.zeros((2, 32), np.int32)
        for i, s in enumerate(seqs):
            window[i, :len(s)] = s
        ref = np.asarray(fwd(cfg, params, window))[np.arange(2), pos]
        np.testing.assert_allclose(np.asarray(logits), ref, atol=2e-4, rtol=1e-4)
        nxt = np.asarray(jnp.argmax(logits + model.vocab_mask(cfg), -1))
        seqs = [s + [int(t)] for s, t in zip(seqs, nxt)]
        pos += 1
    assert [len(s) for s in seqs] == [2 + 13, 9 + 13]


def test_banded_layers_keep_only_window_slots():
    cfg, _ = make("dense,banded", 5)
    shapes = [k.shape for k, _ in gen.init_cache(cfg, 3, 64)]
    assert shapes == [(1, 3, 4, 64, 16), (1, 3, 4, 5, 16)]
    # slot positions: newest key at 12 in 5 slots -> slots hold 10, 11, 12, 8, 9
    assert np.asarray(gen._slot_positions(jnp.asarray([12, 1]), 5)).tolist() == [[10, 11, 12, 8, 9],
                                                                                [0, 1, -3, -2, -1]]


def test_sampling_with_cache_matches_recompute_and_is_seeded():
    cfg, params = make("dense,banded", 5)
    prompts = prompts_of(4, 7, 13, 2, seed=1)
    kw = dict(temperature=1.0, top_k=50, top_p=0.9)
    a = gen.generate(cfg, params, prompts, 25, seed=3, batch_size=4, **kw)
    assert a == gen.generate_uncached(cfg, params, prompts, 25, seed=3, **kw)
    assert a == gen.generate(cfg, params, prompts, 25, seed=3, batch_size=4, **kw)
    assert a != gen.generate(cfg, params, prompts, 25, seed=4, batch_size=4, **kw)
    greedy = gen.generate(cfg, params, prompts, 25, batch_size=4)
    assert a != greedy
    # top-k = 1 and a tiny top-p both leave only the argmax
    assert gen.generate(cfg, params, prompts, 25, temperature=1.0, top_k=1, seed=9, batch_size=4) == greedy
    assert gen.generate(cfg, params, prompts, 25, temperature=1.0, top_p=1e-6, seed=9, batch_size=4) == greedy


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.asarray([[0.5, 0.05, 0.3, 0.15]]))
    kept = lambda k, p: (np.asarray(gen._filter_logits(logits, jnp.int32(k), jnp.float32(p)))[0] > -1e30).tolist()  # noqa: E731
    assert kept(0, 1.0) == [True, True, True, True]
    assert kept(2, 1.0) == [True, False, True, False]
    assert kept(0, 0.5) == [True, False, False, False]  # 0.5 alone reaches 0.5
    assert kept(0, 0.7) == [True, False, True, False]  # 0.5 + 0.3
    assert kept(0, 0.81) == [True, False, True, True]
    assert kept(3, 0.99) == [True, False, True, True]


def test_stops_at_end_of_text_and_at_stop_strings():
    cfg, params = make("dense,banded", 5)
    prompts = prompts_of(5, 8)
    free = gen.generate(cfg, params, prompts, 40, batch_size=2)
    eot = free[0][6]
    stopped = gen.generate(cfg, params, prompts, 40, batch_size=2, eot_id=eot)
    assert stopped[0] == free[0][:free[0].index(eot)]
    assert stopped[1] == (free[1][:free[1].index(eot)] if eot in free[1] else free[1])
    # stop strings: decode ids as space-separated numbers; stop once the 35th token's text appears
    decode = lambda ids: " ".join(map(str, ids)) + " "  # noqa: E731
    marker = f" {free[0][34]} "
    first = (" " + decode(free[0])).index(marker)
    got = gen.generate(cfg, params, prompts, 40, batch_size=2, stop=(marker.strip() + " ",), decode=decode)
    # kept through the token completing the stop string, nothing after it
    assert marker.strip() + " " in decode(got[0]) and marker.strip() + " " not in decode(got[0][:-1])
    assert got[0] == free[0][:len(got[0])] and len(got[0]) <= 35 and first >= 0
    assert gen.cut_at_stop("abc\n\ndef", ["\n\n", "zz"]) == "abc"


def test_generation_goes_past_the_context():
    cfg, params = make("dense,banded", 5, block=32)
    prompts = prompts_of(30, 3)
    got = gen.generate(cfg, params, prompts, 70, batch_size=2)
    assert [len(g) for g in got] == [70, 70]
    # each row is what it would be alone: a full row's rebuild does not cut the others' context
    assert got[1] == gen.generate(cfg, params, [prompts[1]], 70, batch_size=1)[0]
    # and identical to the full recompute until the row fills the context (3 + 29 = 32 tokens)
    assert got[1][:29] == gen.generate_uncached(cfg, params, [prompts[1]], 29)[0]
    assert got[0][:2] == gen.generate_uncached(cfg, params, [prompts[0]], 2)[0]


def test_bad_prompts_get_one_clear_error():
    cfg, params = make("dense", 256)
    with pytest.raises(ValueError, match="empty"):
        gen.generate(cfg, params, [[1], []], 3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        gen.generate(cfg, params, [[V + 5]], 3)
    with pytest.raises(ValueError, match="decode="):
        gen.generate(cfg, params, [[1]], 3, stop=("x",))
