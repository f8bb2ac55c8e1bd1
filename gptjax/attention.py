"""Causal self-attention: dense, and locally banded (each query sees the last `window` keys).

Shape legend as in model.py: B batch, T query positions, S key positions, N heads, H head dim,
plus C the block length and G the number of blocks of the blockwise banded path.

The band: query i attends to key j iff i - w < j <= i, exactly w keys including itself (the Sparse
Transformer's "local" mode). Libraries spell this differently; each path below converts once:
jax.nn and splash take the number of keys to the *left* of the diagonal, (w - 1, 0).

Implementations (`ModelConfig.attention_impl`), per layer kind:

  impl        dense layers                         banded layers
  reference   einsum + mask (the test oracle)      einsum + band mask: O(T^2)
  blockwise   einsum + mask; from FLASH_MIN_T on,      blockwise: O(T * w) time and memory
              flash_attention (O(T) memory)
  jax         jax.nn.dot_product_attention         same, with local_window_size: XLA picks the kernel
  cudnn       cuDNN fused (jax.nn, bf16)            cuDNN with a local window
  splash      TPU splash attention, causal mask    splash attention, local mask
  auto        cpu: blockwise, gpu: cudnn, tpu: splash

A fused path that cannot run (no cuDNN, float32 inputs, no TPU, a shape the kernel rejects, attention
dropout) falls back to `blockwise`, and says so once in the log.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

AUTO = {"cpu": "blockwise", "gpu": "cudnn", "cuda": "cudnn", "rocm": "blockwise", "tpu": "splash"}
MIN_BLOCK = 64  # banded blocks are at least this long: a tiny window still gets efficient einsums

log = logging.getLogger("gptjax.attention")
_said: set[str] = set()


def _say_once(msg: str) -> None:
    if msg not in _said:
        _said.add(msg)
        log.warning(msg)


def resolve_impl(impl: str, platform: str | None = None) -> str:
    """The concrete implementation `impl` means on `platform` (default: JAX's default backend)."""
    if impl != "auto":
        return impl
    return AUTO.get(platform or jax.default_backend(), "blockwise")


def causal_mask(T: int, S: int, window: int | None = None) -> jax.Array:
    """[T, S] bool: query t may see key s iff s <= t (and t - s < window for a band)."""
    t = jnp.arange(T)[:, None] + (S - T)  # queries are the last T of S positions
    s = jnp.arange(S)[None, :]
    ok = s <= t
    if window is not None:
        ok = ok & (t - s < window)
    return ok


def _softmax_dropout(logits, rate: float, key):
    probs = jax.nn.softmax(logits, axis=-1)
    if rate > 0.0 and key is not None:
        keep = jax.random.bernoulli(key, 1.0 - rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - rate), 0.0)
    return probs


def reference_attention(q_BTNH, k_BSNH, v_BSNH, *, window: int | None = None, dropout_rate: float = 0.0,
                        dropout_key: jax.Array | None = None) -> jax.Array:
    """Plain masked attention: every path must equal this one."""
    T, S, H = q_BTNH.shape[1], k_BSNH.shape[1], q_BTNH.shape[-1]
    logits_BNTS = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH, preferred_element_type=jnp.float32)
    logits_BNTS = logits_BNTS / jnp.sqrt(jnp.float32(H))
    logits_BNTS = jnp.where(causal_mask(T, S, window), logits_BNTS, jnp.finfo(jnp.float32).min)
    probs_BNTS = _softmax_dropout(logits_BNTS, dropout_rate, dropout_key)
    return jnp.einsum("BNTS,BSNH->BTNH", probs_BNTS.astype(v_BSNH.dtype), v_BSNH)


def banded_attention(q_BTNH, k_BTNH, v_BTNH, *, window: int, block: int | None = None,
                     dropout_rate: float = 0.0, dropout_key: jax.Array | None = None) -> jax.Array:
    """Banded causal self-attention in O(T * window) time and memory.

    The sequence is cut into G blocks of C >= window positions. A query in block g can only see keys in
    blocks g - 1 and g (it sees at most `window` <= C keys back), so each block of queries attends to
    those 2C keys under the exact band mask. The sequence is padded to a multiple of C; padded keys lie
    after every real query, so the causal mask already hides them.
    """
    B, T, N, H = q_BTNH.shape
    C = block or max(window, MIN_BLOCK)
    if window < 1 or C < window:
        raise ValueError(f"need 1 <= window <= block, got window={window}, block={C}")
    if k_BTNH.shape[1] != T or C >= T:  # one block holds everything: plain masked attention is as cheap
        return reference_attention(q_BTNH, k_BTNH, v_BTNH, window=window, dropout_rate=dropout_rate,
                                   dropout_key=dropout_key)
    G = -(-T // C)
    pad = G * C - T

    def blocks(x_BTNH):
        x_BTNH = jnp.pad(x_BTNH, ((0, 0), (0, pad), (0, 0), (0, 0)))
        return x_BTNH.reshape(B, G, C, N, H)

    q_BGCNH, k_BGCNH, v_BGCNH = blocks(q_BTNH), blocks(k_BTNH), blocks(v_BTNH)

    def with_previous(x_BGCNH):  # [B, G, 2C, N, H]: block g - 1 (zeros before the first), then block g
        prev = jnp.pad(x_BGCNH, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :-1]
        return jnp.concatenate([prev, x_BGCNH], axis=2)

    k_BGSNH, v_BGSNH = with_previous(k_BGCNH), with_previous(v_BGCNH)  # S = 2C keys per block
    # query c of block g is at g*C + c; key s of its window is at (g-1)*C + s, so t - s_abs = C + c - s
    c = np.arange(C)[:, None]
    s = np.arange(2 * C)[None, :]
    band_CS = (s <= C + c) & (C + c - s < window)
    first_CS = band_CS & (s >= C)  # block 0 has no previous block
    mask_GCS = jnp.asarray(np.concatenate([first_CS[None], np.broadcast_to(band_CS, (G - 1, C, 2 * C))]))

    logits = jnp.einsum("BGCNH,BGSNH->BGNCS", q_BGCNH, k_BGSNH, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(jnp.float32(H))
    logits = jnp.where(mask_GCS[None, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = _softmax_dropout(logits, dropout_rate, dropout_key)
    out_BGCNH = jnp.einsum("BGNCS,BGSNH->BGCNH", probs.astype(v_BTNH.dtype), v_BGSNH)
    return out_BGCNH.reshape(B, G * C, N, H)[:, :T]


FLASH_MIN_T = 512  # dense layers at least this long use flash_attention on the blockwise path
FLASH_BLOCK = 128  # queries per block of flash_attention


def _blocks(x_BTNH, C: int):
    """[G, B, C, N, H]: the sequence cut into G blocks of C positions (zero-padded at the end), blocks first."""
    B, T, N, H = x_BTNH.shape
    G = -(-T // C)
    x = jnp.pad(x_BTNH, ((0, 0), (0, G * C - T), (0, 0), (0, 0)))
    return x.reshape(B, G, C, N, H).transpose(1, 0, 2, 3, 4)


def _unblocks(x_GBCNH, T: int):
    G, B, C, N, H = x_GBCNH.shape
    return x_GBCNH.transpose(1, 0, 2, 3, 4).reshape(B, G * C, N, H)[:, :T]


def _block_scores(q_BCNH, k_BSNH, g, C: int):
    """Scaled causal logits [B, N, C, S] of query block g against every key (masked: -inf where s > t)."""
    H, S = q_BCNH.shape[-1], k_BSNH.shape[1]
    s_BNCS = jnp.einsum("BCNH,BSNH->BNCS", q_BCNH, k_BSNH, preferred_element_type=jnp.float32)
    s_BNCS = s_BNCS / jnp.sqrt(jnp.float32(H))
    ok_CS = jnp.arange(S)[None, :] <= g * C + jnp.arange(C)[:, None]
    return jnp.where(ok_CS, s_BNCS, jnp.finfo(jnp.float32).min), ok_CS


def flash_keep(key, g, shape, rate: float):
    """The dropout keep-mask of query block g, scaled by 1/(1-rate): drawn from (key, g), so the backward pass
    draws the very same mask again instead of saving it."""
    keep = jax.random.bernoulli(jax.random.fold_in(key, g), 1.0 - rate, shape)
    return keep.astype(jnp.float32) / (1.0 - rate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def flash_attention(q_BTNH, k_BTNH, v_BTNH, block: int = FLASH_BLOCK, dropout_rate: float = 0.0,
                    dropout_key=None) -> jax.Array:
    """Dense causal self-attention that never holds (or saves for the backward pass) the [B, N, T, T] scores:
    queries go through in blocks of `block` against all keys; the forward pass keeps only the output and each
    query's log-sum-exp, and the backward pass recomputes each block's probabilities from them (the memory
    scheme of FlashAttention, Dao et al. 2022, as plain JAX: a scan over query blocks, so XLA fuses each block's
    einsums). Equal to reference_attention to float rounding (tests/test_attention.py). Attention dropout
    drops probabilities with a mask drawn per query block (`flash_keep`), not reference_attention's one
    [B, N, T, S] draw: the same distribution, other random bits."""
    return _flash_forward(q_BTNH, k_BTNH, v_BTNH, block, dropout_rate, dropout_key)[0]


def _flash_forward(q_BTNH, k_BTNH, v_BTNH, block, rate=0.0, key=None):
    T = q_BTNH.shape[1]
    C = min(block, T)
    G = -(-T // C)

    def one(_, xs):
        q_BCNH, g = xs
        s_BNCS, _ = _block_scores(q_BCNH, k_BTNH, g, C)
        m_BNC1 = s_BNCS.max(axis=-1, keepdims=True)
        p_BNCS = jnp.exp(s_BNCS - m_BNC1)
        l_BNC1 = p_BNCS.sum(axis=-1, keepdims=True)
        p_BNCS = p_BNCS / l_BNC1
        if rate > 0.0:
            p_BNCS = p_BNCS * flash_keep(key, g, p_BNCS.shape, rate)
        o_BCNH = jnp.einsum("BNCS,BSNH->BCNH", p_BNCS.astype(v_BTNH.dtype), v_BTNH)
        return None, (o_BCNH, (m_BNC1 + jnp.log(l_BNC1))[..., 0])

    _, (o_GBCNH, lse_GBNC) = jax.lax.scan(one, None, (_blocks(q_BTNH, C), jnp.arange(G)))
    return _unblocks(o_GBCNH, T), lse_GBNC


def _flash_fwd(q_BTNH, k_BTNH, v_BTNH, block, rate, key):
    o_BTNH, lse_GBNC = _flash_forward(q_BTNH, k_BTNH, v_BTNH, block, rate, key)
    return o_BTNH, (q_BTNH, k_BTNH, v_BTNH, o_BTNH, lse_GBNC, key)


def _flash_bwd(block, rate, res, do_BTNH):
    # with dropout, O = (M * P) V for the scaled keep-mask M: dP = M * (dO V^T), and the softmax backward's
    # rowsum(P * dP) is still rowsum(dO * O)
    q_BTNH, k_BTNH, v_BTNH, o_BTNH, lse_GBNC, key = res
    T, H = q_BTNH.shape[1], q_BTNH.shape[-1]
    C = min(block, T)
    G = -(-T // C)
    scale = 1.0 / jnp.sqrt(jnp.float32(H))
    delta_BTN = (do_BTNH.astype(jnp.float32) * o_BTNH.astype(jnp.float32)).sum(-1)  # rowsum(dO * O)
    delta_GBCN = _blocks(delta_BTN[..., None], C)[..., 0]
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)

    def one(carry, xs):
        dk_BSNH, dv_BSNH = carry
        q_BCNH, do_BCNH, lse_BNC, delta_BCN, g = xs
        s_BNCS, ok_CS = _block_scores(q_BCNH, k_BTNH, g, C)
        p_BNCS = jnp.where(ok_CS, jnp.exp(s_BNCS - lse_BNC[..., None]), 0.0)
        keep_BNCS = flash_keep(key, g, p_BNCS.shape, rate) if rate > 0.0 else None
        pd_BNCS = p_BNCS * keep_BNCS if rate > 0.0 else p_BNCS
        dv_BSNH = dv_BSNH + f32("BNCS,BCNH->BSNH", pd_BNCS, do_BCNH)
        dp_BNCS = f32("BCNH,BSNH->BNCS", do_BCNH, v_BTNH)
        if rate > 0.0:
            dp_BNCS = dp_BNCS * keep_BNCS
        ds_BNCS = p_BNCS * (dp_BNCS - delta_BCN.transpose(0, 2, 1)[..., None]) * scale
        dq_BCNH = f32("BNCS,BSNH->BCNH", ds_BNCS, k_BTNH)
        dk_BSNH = dk_BSNH + f32("BNCS,BCNH->BSNH", ds_BNCS, q_BCNH)
        return (dk_BSNH, dv_BSNH), dq_BCNH

    zeros = jnp.zeros(k_BTNH.shape, jnp.float32)
    (dk, dv), dq_GBCNH = jax.lax.scan(one, (zeros, zeros), (_blocks(q_BTNH, C), _blocks(do_BTNH, C), lse_GBNC,
                                                            delta_GBCN, jnp.arange(G)))
    dq = _unblocks(dq_GBCNH, T)
    return dq.astype(q_BTNH.dtype), dk.astype(k_BTNH.dtype), dv.astype(v_BTNH.dtype), None


flash_attention.defvjp(_flash_fwd, _flash_bwd)


DENSE_BLOCK = 128  # query block of dense_attention: block g attends only keys 0 .. (g + 1) * block - 1


def _dense_parts(T: int, C: int):
    """The query blocks of dense_attention: (start, stop) of each, the last one possibly short."""
    return [(a, min(a + C, T)) for a in range(0, T, C)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dense_attention(q_BTNH, k_BTNH, v_BTNH, block: int = DENSE_BLOCK) -> jax.Array:
    """Dense causal self-attention for short contexts, fast on the CPU: equal to reference_attention to float
    rounding (tests/test_attention.py), with three differences in how it computes. (1) It works in [B, N, T, H]
    layout, so every matmul is a plain batched matmul over (B, N) (XLA's CPU backend runs the [B, T, N, H]
    einsums of the reference several times slower). (2) Query block g of `block` positions multiplies only keys
    0 .. (g + 1) * block - 1: the blocks wholly above the diagonal are never computed, a quarter of the work at
    two blocks. (3) A hand-written backward pass reuses the saved probabilities (what autodiff of the reference
    saves too, so no more memory), in the same layout."""
    return _dense_fwd(q_BTNH, k_BTNH, v_BTNH, block)[0]


def _dense_fwd(q_BTNH, k_BTNH, v_BTNH, block):
    T, H = q_BTNH.shape[1], q_BTNH.shape[-1]
    scale = 1.0 / math.sqrt(H)
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q_BTNH, k_BTNH, v_BTNH))  # [B, N, T, H]
    probs, outs = [], []
    for a, b in _dense_parts(T, block):
        s_BNCS = jnp.einsum("BNCH,BNSH->BNCS", q[:, :, a:b], k[:, :, :b], preferred_element_type=jnp.float32) * scale
        ok_CS = np.arange(b)[None, :] <= np.arange(a, b)[:, None]
        p_BNCS = jax.nn.softmax(jnp.where(ok_CS, s_BNCS, jnp.finfo(jnp.float32).min), axis=-1)
        probs.append(p_BNCS)
        outs.append(jnp.einsum("BNCS,BNSH->BNCH", p_BNCS.astype(v.dtype), v[:, :, :b]))
    o_BNTH = jnp.concatenate(outs, axis=2)
    return jnp.swapaxes(o_BNTH, 1, 2), (q, k, v, o_BNTH, probs)


def _dense_bwd(block, res, do_BTNH):
    q, k, v, o, probs = res
    T, H = q.shape[2], q.shape[-1]
    scale = 1.0 / math.sqrt(H)
    do = jnp.swapaxes(do_BTNH, 1, 2).astype(jnp.float32)  # [B, N, T, H]
    delta_BNT1 = (do * o.astype(jnp.float32)).sum(-1, keepdims=True)  # rowsum(dO * O)
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, T - x.shape[2]), (0, 0)))  # noqa: E731
    for (a, b), p_BNCS in zip(_dense_parts(T, block), probs):
        do_C = do[:, :, a:b]
        dv = dv + pad(f32("BNCS,BNCH->BNSH", p_BNCS, do_C))
        dp_BNCS = f32("BNCH,BNSH->BNCS", do_C, v[:, :, :b])
        ds_BNCS = p_BNCS * (dp_BNCS - delta_BNT1[:, :, a:b]) * scale
        dq.append(f32("BNCS,BNSH->BNCH", ds_BNCS, k[:, :, :b]))
        dk = dk + pad(f32("BNCS,BNCH->BNSH", ds_BNCS, q[:, :, a:b]))
    dq = jnp.concatenate(dq, axis=2)
    back = lambda x, like: jnp.swapaxes(x, 1, 2).astype(like.dtype)  # noqa: E731
    return back(dq, q), back(dk, k), back(dv, v)


dense_attention.defvjp(_dense_fwd, _dense_bwd)


def _jax_nn(q, k, v, window, implementation):
    local = (window - 1, 0) if window is not None else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                        implementation=implementation)


# ----------------------------------------------------------------------------------------------
# TPU: splash attention (Pallas)


@functools.lru_cache(maxsize=None)
def _splash_kernel(N: int, T: int, window: int | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if window is None:
        head_mask = sa.CausalMask((T, T))
    else:  # keys j with i - (w - 1) <= j <= i: the band of w keys
        head_mask = sa.LocalMask((T, T), window_size=(window - 1, 0), offset=0)
    b = next(b for b in (512, 256, 128) if T % b == 0)  # the largest tile that divides T (T % 128 == 0)
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return sa.make_splash_mha(sa.MultiHeadMask([head_mask] * N), block_sizes=sizes, head_shards=1,
                              q_seq_shards=1, interpret=interpret)


def splash_attention(q_BTNH, k_BTNH, v_BTNH, *, window: int | None = None, interpret: bool = False) -> jax.Array:
    """Splash attention over [B, T, N, H]; under a mesh, batch and heads are split with shard_map.
    `interpret=True` runs the Pallas kernel in the interpreter (any backend; for tests)."""
    from gptjax import sharding

    B, T, N, H = q_BTNH.shape
    if k_BTNH.shape[1] != T or T % 128:
        raise ValueError(f"splash attention needs self-attention over a multiple of 128 positions, got T={T}")
    scale = 1.0 / math.sqrt(H)  # splash does not scale the logits itself

    def local(q, k, v):  # [b, T, n, H] per shard
        kernel = _splash_kernel(q.shape[2], T, window, interpret)
        to_bnth = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        out = jax.vmap(kernel)(to_bnth(q * jnp.asarray(scale, q.dtype)), to_bnth(k), to_bnth(v))
        return jnp.swapaxes(out, 1, 2).astype(q.dtype)

    active = sharding.active_mesh()
    if active is None:
        return local(q_BTNH, k_BTNH, v_BTNH)
    mesh, rules = active
    spec = sharding.logical_to_spec(("batch", "seq", "heads", "head_dim"), rules, mesh, q_BTNH.shape)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        q_BTNH, k_BTNH, v_BTNH)


# ----------------------------------------------------------------------------------------------
# Dispatch


def attention(q_BTNH, k_BSNH, v_BSNH, *, window: int | None = None, impl: str = "auto",
              dropout_rate: float = 0.0, dropout_key: jax.Array | None = None) -> jax.Array:
    """Causal attention (banded when `window` is set) by implementation `impl` (see the module doc)."""
    impl = resolve_impl(impl)
    T, S = q_BTNH.shape[1], k_BSNH.shape[1]
    use_dropout = dropout_rate > 0.0 and dropout_key is not None
    kind = "dense" if window is None else "banded"
    if impl in ("jax", "cudnn", "splash"):
        why = None
        if use_dropout:
            why = "attention dropout is on"
        elif T != S:
            why = f"queries ({T}) and keys ({S}) differ in length"
        else:
            try:
                if impl == "splash":
                    return splash_attention(q_BTNH, k_BSNH, v_BSNH, window=window)
                return _jax_nn(q_BTNH, k_BSNH, v_BSNH, window, None if impl == "jax" else impl)
            except Exception as e:  # unavailable backend or unsupported shape / dtype: the pure-JAX path
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        _say_once(f"attention: '{impl}' is unavailable for {kind} layers ({why}); using the pure-JAX "
                  f"blockwise path instead")
        impl = "blockwise"
    if impl == "blockwise" and window is not None and T == S:
        return banded_attention(q_BTNH, k_BSNH, v_BSNH, window=window, dropout_rate=dropout_rate,
                                dropout_key=dropout_key)
    if impl == "blockwise" and window is None and T == S and T >= FLASH_MIN_T:
        if use_dropout:
            return flash_attention(q_BTNH, k_BSNH, v_BSNH, FLASH_BLOCK, dropout_rate, dropout_key)
        return flash_attention(q_BTNH, k_BSNH, v_BSNH)
    if impl == "blockwise" and window is None and T == S and not use_dropout:
        return dense_attention(q_BTNH, k_BSNH, v_BSNH)
    return reference_attention(q_BTNH, k_BSNH, v_BSNH, window=window, dropout_rate=dropout_rate,
                               dropout_key=dropout_key)
