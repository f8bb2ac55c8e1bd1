"""Dense and banded attention: every implementation equals the masked reference (forward and gradients),
the band is exactly w keys wide in every library's convention, gradients outside the band are exactly
zero, fused backends fall back (saying so once) where they cannot run, and the GPT-3 presets alternate."""

from __future__ import annotations

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import read_losses, run_script

from gptjax import attention as att
from gptjax import config, sharding
from gptjax.config import MeshConfig


def qkv(B, T, N, H, seed=0, dtype=jnp.float32):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(x, (B, T, N, H), dtype) for x in (kq, kk, kv))


def loss_and_grads(fn, q, k, v):
    """A scalar that weighs every output differently, and its gradients w.r.t. q, k and v."""
    w = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)
    f = lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * w).sum()  # noqa: E731
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)


def blockwise(window, block=None):
    return lambda q, k, v: att.banded_attention(q, k, v, window=window, block=block)


def reference(window):
    return lambda q, k, v: att.reference_attention(q, k, v, window=window)


def splash_interpreted(window):
    return lambda q, k, v: att.splash_attention(q, k, v, window=window, interpret=True)


def jax_nn(window):
    return lambda q, k, v: att.attention(q, k, v, window=window, impl="jax")


# (B, T, N, H, window, block): T not a multiple of the block, window >= T, window = 1, a block wider than
# the window, several batch and head sizes.
BANDED_CASES = [
    (2, 100, 3, 8, 7, None),
    (1, 300, 2, 16, 64, None),
    (2, 257, 2, 8, 1, None),
    (1, 50, 1, 8, 200, None),  # window wider than the sequence: plain causal
    (3, 130, 4, 8, 5, 16),  # block 16 > window 5, T = 8 blocks + 2
    (1, 192, 2, 32, 64, 64),  # T an exact multiple of the block
]


@pytest.mark.parametrize("B, T, N, H, w, block", BANDED_CASES)
def test_blockwise_banded_equals_the_reference(B, T, N, H, w, block):
    q, k, v = qkv(B, T, N, H)
    out = jax.jit(blockwise(w, block))(q, k, v)
    np.testing.assert_allclose(out, reference(w)(q, k, v), atol=2e-6, rtol=1e-5)
    loss, grads = loss_and_grads(blockwise(w, block), q, k, v)
    loss0, grads0 = loss_and_grads(reference(w), q, k, v)
    np.testing.assert_allclose(loss, loss0, rtol=1e-5)
    for g, g0, name in zip(grads, grads0, "qkv"):
        np.testing.assert_allclose(g, g0, atol=1e-5, rtol=1e-4, err_msg=f"d/d{name}")


@pytest.mark.parametrize("w", [None, 1, 5, 40])
def test_jax_nn_band_convention_equals_the_reference(w):
    q, k, v = qkv(2, 70, 2, 8, seed=1)
    loss, grads = loss_and_grads(jax_nn(w), q, k, v)
    loss0, grads0 = loss_and_grads(reference(w), q, k, v)
    np.testing.assert_allclose(loss, loss0, rtol=1e-5)
    for g, g0 in zip(grads, grads0):
        np.testing.assert_allclose(g, g0, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("T, w", [(256, None), (384, 1), (384, 100), (384, None)])
def test_splash_kernel_and_local_mask_convention_equal_the_reference(T, w):
    # The real Pallas TPU kernel, run by the Pallas interpreter on the CPU; T = 384 is three 128-wide tiles, so
    # the band crosses tiles and whole tiles outside it are skipped.
    q, k, v = qkv(2, T, 2, 64, seed=2)
    loss, grads = loss_and_grads(splash_interpreted(w), q, k, v)
    loss0, grads0 = loss_and_grads(reference(w), q, k, v)
    np.testing.assert_allclose(loss, loss0, rtol=1e-5)
    for g, g0 in zip(grads, grads0):
        np.testing.assert_allclose(g, g0, atol=5e-5, rtol=1e-4)


def test_splash_under_a_mesh_splits_batch_and_heads():
    mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=4, rules="fsdp_tp"))
    q, k, v = qkv(2, 128, 4, 64, seed=3)

    def sharded(q, k, v):
        with sharding.use_mesh(mesh, "fsdp_tp"):
            return att.splash_attention(q, k, v, window=50, interpret=True)

    out = jax.jit(sharded)(q, k, v)
    np.testing.assert_allclose(out, reference(50)(q, k, v), atol=2e-6, rtol=1e-5)


def test_blockwise_under_a_mesh_equals_one_device():
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2, rules="fsdp_tp"))
    q, k, v = qkv(4, 150, 2, 8, seed=4)

    def sharded(q, k, v):
        with sharding.use_mesh(mesh, "fsdp_tp"):
            return att.attention(q, k, v, window=9, impl="blockwise")

    np.testing.assert_allclose(jax.jit(sharded)(q, k, v), reference(9)(q, k, v), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("fn", ["blockwise", "jax_nn"])
def test_bfloat16_stays_close_to_float32(fn):
    make = {"blockwise": lambda w: blockwise(w, 16), "jax_nn": jax_nn}[fn]
    q, k, v = qkv(2, 90, 2, 16, seed=5)
    want = reference(6)(q, k, v)
    got = make(6)(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=5e-2, rtol=5e-2)
    _, g16 = loss_and_grads(make(6), *(x.astype(jnp.bfloat16) for x in (q, k, v)))
    _, g32 = loss_and_grads(reference(6), q, k, v)
    for a, b in zip(g16, g32):
        a, b = np.asarray(a, np.float32).ravel(), np.asarray(b).ravel()
        assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99


@pytest.mark.parametrize("make", [lambda w: blockwise(w, 16), reference, jax_nn], ids=["blockwise", "reference", "jax"])
def test_outputs_depend_on_exactly_the_band(make):
    """d out[t] / d (k, v)[s] is exactly zero outside t - w < s <= t and nonzero inside."""
    T, w = 70, 6
    q, k, v = qkv(1, T, 2, 8, seed=6)
    fn = make(w)

    def out_sum_per_query(k, v):  # [T]: each query's output, summed over heads and features
        return fn(q, k, v)[0].sum((-1, -2))

    jk, jv = jax.jit(jax.jacrev(out_sum_per_query, argnums=(0, 1)))(k, v)
    influence = np.abs(np.asarray(jk)).sum((1, 3, 4)) + np.abs(np.asarray(jv)).sum((1, 3, 4))  # [T, S]
    t, s = np.indices((T, T))
    band = (s <= t) & (t - s < w)
    assert (influence[~band] == 0.0).all(), "a key outside the band (or in the future) leaks into an output"
    assert (influence[band] > 0.0).all()


def test_a_fused_backend_that_cannot_run_falls_back_and_says_so_once(caplog):
    q, k, v = qkv(1, 80, 2, 8, seed=7)
    att._said.clear()
    with caplog.at_level(logging.WARNING, logger="gptjax.attention"):
        outs = [att.attention(q, k, v, window=5, impl="cudnn") for _ in range(3)]  # no GPU here
    said = [r.getMessage() for r in caplog.records if "cudnn" in r.getMessage()]
    assert len(said) == 1 and "blockwise" in said[0], said
    for o in outs:
        np.testing.assert_allclose(o, reference(5)(q, k, v), atol=2e-6, rtol=1e-5)
    # splash off a TPU, and a shape it cannot tile (T not a multiple of 128), fall back the same way
    np.testing.assert_allclose(att.attention(q, k, v, window=None, impl="splash"), reference(None)(q, k, v),
                               atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="multiple of 128"):
        att.splash_attention(q, k, v, window=5, interpret=True)


def test_auto_picks_the_backend_of_the_platform():
    assert att.resolve_impl("auto", "cpu") == "blockwise"
    assert att.resolve_impl("auto", "gpu") == "cudnn"
    assert att.resolve_impl("auto", "tpu") == "splash"
    assert att.resolve_impl("reference", "tpu") == "reference"
    assert att.resolve_impl("auto") == "blockwise"  # this test machine
    assert config.ModelConfig().attention_impl == "auto"


def assert_dense_causal_equals_the_reference(fn, q, k, v):
    """fn(q, k, v) equals dense causal reference attention: the output, a weighted loss and its gradients."""
    np.testing.assert_allclose(jax.jit(fn)(q, k, v), reference(None)(q, k, v), atol=2e-6, rtol=1e-5)
    loss, grads = loss_and_grads(fn, q, k, v)
    loss0, grads0 = loss_and_grads(reference(None), q, k, v)
    np.testing.assert_allclose(loss, loss0, rtol=1e-5)
    for g, g0, name in zip(grads, grads0, "qkv"):
        np.testing.assert_allclose(g, g0, atol=1e-5, rtol=1e-4, err_msg=f"d/d{name}")


@pytest.mark.parametrize("B, T, N, H, block", [(2, 100, 3, 8, 16), (1, 64, 2, 16, 64), (1, 7, 1, 8, 128),
                                                (2, 129, 2, 8, 32)])
def test_flash_attention_equals_the_reference_with_its_gradients(B, T, N, H, block):
    assert_dense_causal_equals_the_reference(lambda q, k, v: att.flash_attention(q, k, v, block),
                                             *qkv(B, T, N, H, seed=T))


@pytest.mark.parametrize("B, T, N, H, block", [(2, 256, 2, 16, 128), (1, 100, 3, 8, 32), (2, 7, 1, 8, 128),
                                                (1, 129, 2, 8, 64), (3, 64, 4, 8, 64)])
def test_dense_attention_equals_the_reference_with_its_gradients(B, T, N, H, block):
    """dense_attention (the CPU path for short dense layers: [B, N, T, H] layout, query blocks that skip the
    keys above the diagonal, its own backward pass) equals the reference, with T not a multiple of the block,
    shorter than one block, and one block exactly."""
    assert_dense_causal_equals_the_reference(lambda q, k, v: att.dense_attention(q, k, v, block),
                                             *qkv(B, T, N, H, seed=T + block))


def test_short_dense_layers_take_dense_attention_and_skip_the_masked_blocks(monkeypatch):
    """The blockwise path sends dense self-attention shorter than FLASH_MIN_T to dense_attention (not with
    attention dropout, not with a KV cache's longer keys), and its compiled FLOPs are below the reference's
    by the key blocks above the diagonal."""
    calls = []
    real = att.dense_attention
    monkeypatch.setattr(att, "dense_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = qkv(1, 96, 2, 8)
    att.attention(q, k, v, impl="blockwise")
    assert len(calls) == 1
    att.attention(q, k, v, impl="blockwise", dropout_rate=0.1, dropout_key=jax.random.key(0))
    att.attention(q[:, -1:], k, v, impl="blockwise")  # one query against 96 cached keys
    att.attention(q, k, v, impl="reference")
    assert len(calls) == 1

    def flops(fn):
        x = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.float32)
        return jax.jit(fn).lower(x, x, x).compile().cost_analysis()["flops"]

    ratio = flops(lambda q, k, v: real(q, k, v, 128)) / flops(reference(None))
    assert 0.55 < ratio < 0.75, ratio  # 4 query blocks see 1, 2, 3, 4 key blocks: 10 of 16


def test_flash_attention_dropout_is_its_blocks_masks_in_both_passes():
    """With dropout, the forward and backward passes use the same per-block masks: flash equals masked
    attention built from exactly those masks, and the masks drop about `rate` of the probabilities."""
    B, T, N, H, C, rate = 2, 40, 2, 8, 16, 0.3
    q, k, v = qkv(B, T, N, H, seed=1)
    key = jax.random.key(5)
    masks = jnp.concatenate([att.flash_keep(key, g, (B, N, C, T), rate) for g in range(-(-T // C))], axis=2)[:, :, :T]

    def masked(q, k, v):
        s = jnp.einsum("BTNH,BSNH->BNTS", q, k) / jnp.sqrt(jnp.float32(H))
        p = jax.nn.softmax(jnp.where(att.causal_mask(T, T), s, jnp.finfo(jnp.float32).min), axis=-1)
        return jnp.einsum("BNTS,BSNH->BTNH", p * masks, v)

    flash = lambda q, k, v: att.flash_attention(q, k, v, C, rate, key)  # noqa: E731
    loss, grads = loss_and_grads(flash, q, k, v)
    loss0, grads0 = loss_and_grads(masked, q, k, v)
    np.testing.assert_allclose(loss, loss0, rtol=1e-5)
    for g, g0, name in zip(grads, grads0, "qkv"):
        np.testing.assert_allclose(g, g0, atol=1e-5, rtol=1e-4, err_msg=f"d/d{name}")
    assert abs(float((masks == 0).mean()) - rate) < 0.03


def test_long_dense_layers_take_flash_attention_and_its_memory_stays_linear(monkeypatch):
    """The blockwise path hands dense layers of FLASH_MIN_T or more positions to flash_attention: the same
    result as the reference, and a compiled backward whose memory grows about linearly with T."""
    q, k, v = qkv(1, 96, 2, 8)
    calls = []
    real = att.flash_attention
    monkeypatch.setattr(att, "flash_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setattr(att, "FLASH_MIN_T", 64)
    out = att.attention(q, k, v, impl="blockwise")
    assert calls and np.allclose(out, reference(None)(q, k, v), atol=2e-6)

    def peak(fn, T):
        x = jax.ShapeDtypeStruct((1, T, 2, 16), jnp.float32)
        grad = jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2)))
        m = grad.lower(x, x, x).compile().memory_analysis()
        return m.temp_size_in_bytes

    flash = [peak(lambda q, k, v: real(q, k, v, 128), T) for T in (1024, 2048)]
    dense = [peak(reference(None), T) for T in (1024, 2048)]
    assert flash[1] / flash[0] < 2.2, flash  # linear in T (plus the blocks' C x T scores)
    assert dense[1] > 8 * flash[1], (flash, dense)


def test_blockwise_cost_grows_linearly_with_length():
    """The compiled banded path's FLOPs double when T doubles; dense attention's quadruple."""
    def attn_flops(fn, T):
        q = jax.ShapeDtypeStruct((1, T, 2, 16), jnp.float32)
        return jax.jit(fn).lower(q, q, q).compile().cost_analysis()["flops"]

    band = [attn_flops(blockwise(32), T) for T in (1024, 2048, 4096)]
    dense = [attn_flops(reference(None), T) for T in (1024, 2048, 4096)]
    assert 1.8 < band[1] / band[0] < 2.2 and 1.8 < band[2] / band[1] < 2.2, band
    assert dense[2] / dense[1] > 3.5, dense
    assert dense[2] > 20 * band[2]


# ----------------------------------------------------------------------------------------------
# Presets and a GPT-3-pattern model end to end


@pytest.mark.parametrize("preset", config.list_presets())
def test_gpt3_presets_alternate_dense_and_banded(preset):
    m = config.load_preset(preset).model
    if preset.startswith("gpt3-"):
        assert m.attention_pattern == ("dense", "banded") and m.local_window == 256
        assert m.n_layer % 2 == 0
    else:
        assert m.attention_pattern == ("dense",)


def test_local_window_must_be_positive():
    with pytest.raises(config.ConfigError, match="local_window"):
        config.resolve("tiny", ["model.local_window=0"])


def test_gpt3_pattern_model_trains_and_its_checkpoint_evaluates(tmp_path, tiny_overrides, prepared):
    run_dir = tmp_path / "gpt3ish"
    common = tiny_overrides + ["model.n_layer=2", "model.attention_pattern=dense,banded", "model.local_window=4",
                               "model.block_size=80", "model.scan_layers=true", "optim.lr=3e-3", "checkpoint.every=20"]
    proc = run_script("train.py", "--config", "tiny", *common, f"run_dir={run_dir}", "steps=20", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [v for _, v in sorted(read_losses(run_dir).items())]
    assert np.mean(losses[-4:]) < losses[0] - 0.5, losses
    summary = json.loads((run_dir / "summary.json").read_text())
    ev = run_script("eval.py", run_dir, "--json", tmp_path / "ev.json")
    assert ev.returncode == 0, ev.stderr[-3000:]
    got = json.loads((tmp_path / "ev.json").read_text())
    assert got["step"] == 20 and abs(got["loss"] - summary["val_loss"]) < 1e-4

