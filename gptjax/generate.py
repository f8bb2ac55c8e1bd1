"""Sampling with a KV cache: batched prompts of different lengths, greedy / temperature / top-k / top-p,
end-of-text and stop strings, seeded.

Shape legend as in model.py, plus W cache slots of one layer kind, C decode steps per compiled chunk,
G scanned superblocks (n_layer / P).

How it runs:
  prefill   one forward pass over the right-padded prompts [B, Tp] that writes every layer's keys and
            values into the cache and samples each row's first new token from its last prompt position;
  decode    a compiled loop of C steps (`lax.fori_loop`): feed each row's newest token at its own position,
            append its key/value, sample the next. Python looks between chunks for stop strings and stops
            when every row is done.
Dense layers cache W = S slots (S >= the longest prompt plus the new tokens, bucketed to a power of two).
Banded layers keep a rolling cache of their last W = window keys: slot = position mod W, so a key falls
out exactly when it leaves the band. Each slot's position is recomputed from the query position, which
masks slots not yet written without any bookkeeping.

Past the model's context (learned positions stop at block_size) the cache is rebuilt, a full row keeping
its last half context, and decoding goes on. `generate_uncached`, which recomputes the whole forward pass for
every token, is the oracle the tests compare against and the baseline in bench/generate.py.
"""

from __future__ import annotations

import argparse
import functools
import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.attention import attention
from gptjax.config import ModelConfig
from gptjax.errors import GenerationError
from gptjax.model import Params, block, embed, forward, unembed, vocab_mask

CHUNK = 32  # decode steps per compiled call; Python checks stop strings between calls
MIN_BUCKET = 16


def _bucket(n: int, cap: int) -> int:
    """The next power of two >= n (at least MIN_BUCKET), at most cap: few shapes, few compiles."""
    return min(cap, max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))


def cache_slots(cfg: ModelConfig, S: int) -> tuple[int, ...]:
    """Slots per pattern position: S for dense layers, min(window, S) for banded ones."""
    return tuple(min(cfg.local_window, S) if kind == "banded" else S for kind in cfg.attention_pattern)


def init_cache(cfg: ModelConfig, B: int, S: int) -> tuple:
    """One (k, v) pair per pattern position, each [G, B, N, W, H] in the compute dtype (heads before slots,
    so a decode step's attention is a batched matrix-vector product without transposing the cache)."""
    G, N, H = cfg.n_layer // len(cfg.attention_pattern), cfg.n_head, cfg.head_dim
    dt = jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32
    return tuple((jnp.zeros((G, B, N, W, H), dt), jnp.zeros((G, B, N, W, H), dt)) for W in cache_slots(cfg, S))


def _slot_positions(pos_B: jax.Array, W: int) -> jax.Array:
    """[B, W]: the position whose key slot s holds when the newest key is at pos (negative: never written)."""
    s_W = jnp.arange(W)
    return pos_B[:, None] - jnp.mod(pos_B[:, None] - s_W[None, :], W)


def _scan_layers(cfg: ModelConfig, params: Params, x_BTD: jax.Array, cache: tuple, make_attend) -> tuple:
    """Run the blocks as a scan over superblocks, threading each layer's cache through `attend`."""
    P = len(cfg.attention_pattern)
    G = cfg.n_layer // P
    h_G = jax.tree.map(lambda a: a.reshape((G, P) + a.shape[1:]), params["h"])

    def superblock(x_BTD, xs):
        hp, cache_P = xs
        new = []
        for i, kind in enumerate(cfg.attention_pattern):
            layer = jax.tree.map(lambda a: a[i], hp)
            x_BTD, kv = block(cfg, layer, x_BTD, kind, None, attend=make_attend(kind, *cache_P[i]))
            new.append(kv)
        return x_BTD, tuple(new)

    return jax.lax.scan(superblock, x_BTD, (h_G, cache))


def _filter_logits(logits_BV: jax.Array, top_k, top_p) -> jax.Array:
    """Keep the top_k most likely tokens (0: all), then the smallest set whose probability reaches top_p."""
    neg = jnp.finfo(jnp.float32).min
    V = logits_BV.shape[-1]
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth_B1 = jnp.take_along_axis(sorted_BV, jnp.broadcast_to(k - 1, (logits_BV.shape[0], 1)), axis=-1)
    sorted_BV = jnp.where(jnp.arange(V)[None] < k, sorted_BV, neg)
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the tokens ranked above each one
    keep_BV = ((before_BV < top_p) | (top_p >= 1.0)) & (jnp.arange(V)[None] < k)
    keep_BV = keep_BV.at[:, 0].set(True)
    cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
    cutoff_B1 = jnp.maximum(cutoff_B1, kth_B1)
    return jnp.where(logits_BV >= cutoff_B1, logits_BV, neg)


def sample_logits(cfg: ModelConfig, logits_BV: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """[B] next tokens: greedy when temperature == 0, else sampled from the filtered, tempered distribution."""
    logits_BV = logits_BV + vocab_mask(cfg)

    # Branches, not a select of all three: sorting the vocabulary for top-k/top-p every step is as costly as
    # the decode step itself on a CPU, and greedy decoding needs none of it.
    def sampled(logits_BV):
        return jax.random.categorical(key, logits_BV / jnp.maximum(temperature, 1e-6), axis=-1).astype(jnp.int32)

    def hot(_):
        filtering = (top_k > 0) | (top_p < 1.0)
        return jax.lax.cond(filtering, lambda: sampled(_filter_logits(logits_BV, top_k, top_p)),
                            lambda: sampled(logits_BV))

    return jax.lax.cond(temperature > 0, hot, lambda _: jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), None)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill(cfg: ModelConfig, params: Params, tokens_BT: jax.Array, lens_B: jax.Array, S: int, key, temperature,
             top_k, top_p):
    """Fill a fresh cache of S positions from right-padded prompts; sample each row's first new token."""
    B = tokens_BT.shape[0]
    cache = init_cache(cfg, B, S)
    last_B = lens_B - 1

    def make_attend(kind, k_cache, v_cache):
        W = k_cache.shape[2]
        window = cfg.local_window if kind == "banded" else None

        def attend(q_BTNH, k_BTNH, v_BTNH):
            o_BTNH = attention(q_BTNH, k_BTNH, v_BTNH, window=window, impl=cfg.attention_impl)
            # slot s <- the key at the last position <= len-1 congruent to s mod W (padding is never read)
            src_BW = jnp.maximum(_slot_positions(last_B, W), 0)

            def gather(a_BTNH, dtype):
                a_BWNH = jnp.take_along_axis(a_BTNH, src_BW[:, :, None, None], axis=1)
                return a_BWNH.transpose(0, 2, 1, 3).astype(dtype)
            return o_BTNH, (gather(k_BTNH, k_cache.dtype), gather(v_BTNH, v_cache.dtype))
        return attend

    x_BTD = embed(cfg, params, tokens_BT)
    x_BTD, cache = _scan_layers(cfg, params, x_BTD, cache, make_attend)
    x_B1D = jnp.take_along_axis(x_BTD, last_B[:, None, None], axis=1)
    logits_BV = unembed(cfg, params, x_B1D)[:, 0]
    return cache, sample_logits(cfg, logits_BV, key, temperature, top_k, top_p)


def decode_step(cfg: ModelConfig, params: Params, cache: tuple, tok_B: jax.Array, pos_B: jax.Array):
    """Feed one token per row at its own position; returns the new cache and float32 logits [B, V].

    The whole cache rides in the layer scan's carry and each layer writes its one new slot per row in place
    (a scatter), so a step moves O(B * N * H) cache entries, not the whole cache."""
    P = len(cfg.attention_pattern)
    G = cfg.n_layer // P
    h_G = jax.tree.map(lambda a: a.reshape((G, P) + a.shape[1:]), params["h"])
    rows_B = jnp.arange(tok_B.shape[0])

    def superblock(carry, xs):
        x_B1D, cache = carry
        hp, g = xs
        cache = list(cache)
        for i, kind in enumerate(cfg.attention_pattern):
            k_cache, v_cache = cache[i]
            W = k_cache.shape[3]
            slot_B = jnp.mod(pos_B, W)

            def attend(q_B1NH, k_B1NH, v_B1NH, k_cache=k_cache, v_cache=v_cache, W=W, slot_B=slot_B):
                k_cache = k_cache.at[g, rows_B, :, slot_B].set(k_B1NH[:, 0].astype(k_cache.dtype))
                v_cache = v_cache.at[g, rows_B, :, slot_B].set(v_B1NH[:, 0].astype(v_cache.dtype))
                k_BNWH, v_BNWH = k_cache[g], v_cache[g]
                # In a band of width w, the W = w slots hold exactly the keys it may see, once written.
                valid_BW = _slot_positions(pos_B, W) >= 0
                H = q_B1NH.shape[-1]
                logits_BNW = jnp.einsum("BNH,BNWH->BNW", q_B1NH[:, 0], k_BNWH,
                                        preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(H))
                logits_BNW = jnp.where(valid_BW[:, None, :], logits_BNW, jnp.finfo(jnp.float32).min)
                probs_BNW = jax.nn.softmax(logits_BNW, axis=-1)
                o_BNH = jnp.einsum("BNW,BNWH->BNH", probs_BNW.astype(v_BNWH.dtype), v_BNWH)
                return o_BNH[:, None], (k_cache, v_cache)

            layer = jax.tree.map(lambda a: a[i], hp)
            x_B1D, cache[i] = block(cfg, layer, x_B1D, kind, None, attend=attend)
        return (x_B1D, tuple(cache)), None

    # a finished row may sit one past the context; its output is ignored, but keep the lookup in range
    x_B1D = embed(cfg, params, tok_B[:, None], jnp.minimum(pos_B, cfg.block_size - 1)[:, None])
    (x_B1D, cache), _ = jax.lax.scan(superblock, (x_B1D, cache), (h_G, jnp.arange(G)))
    return cache, unembed(cfg, params, x_B1D)[:, 0]


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode(cfg: ModelConfig, params: Params, cache: tuple, tok_B, pos_B, count_B, done_B, n_steps, limit, eot,
            key, event0, temperature, top_k, top_p):
    """Up to CHUNK decode steps (n_steps of them). Writes -1 where a row produced nothing."""
    B = tok_B.shape[0]

    def step(i, carry):
        cache, tok_B, pos_B, count_B, done_B, out_BC = carry
        cache, logits_BV = decode_step(cfg, params, cache, tok_B, pos_B)
        new_B = sample_logits(cfg, logits_BV, jax.random.fold_in(key, event0 + i), temperature, top_k, top_p)
        done_now_B = done_B | (new_B == eot)
        out_BC = out_BC.at[:, i].set(jnp.where(done_now_B, -1, new_B))
        count_B = count_B + (~done_now_B).astype(jnp.int32)
        # a finished row stays where it is: its later (ignored) writes never move past the context
        pos_B = jnp.where(done_B, pos_B, pos_B + 1)
        tok_B = jnp.where(done_now_B, tok_B, new_B)
        return cache, tok_B, pos_B, count_B, done_now_B | (count_B >= limit), out_BC

    out_BC = jnp.full((B, CHUNK), -1, jnp.int32)
    cache, tok_B, pos_B, count_B, done_B, out_BC = jax.lax.fori_loop(
        0, n_steps, step, (cache, tok_B, pos_B, count_B, done_B, out_BC))
    return cache, tok_B, pos_B, count_B, done_B, out_BC


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Settings that would sample silently wrong (a negative temperature flips the distribution)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise GenerationError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k < 0:
        raise GenerationError(f"top_k must be >= 0 (0: off), got {top_k}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1] (1: off), got {top_p}")


def _check_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]]) -> None:
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise GenerationError(f"prompt {i} is empty; start it with the end-of-text token to generate from nothing")
        bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} holds token id {bad[0]} outside the vocabulary of {cfg.vocab_size}; "
                             f"encode it with the run's own tokenizer")


def _has_stop(text: str, stop: Sequence[str]) -> bool:
    return any(s and s in text for s in stop)


def _through_stop(ids: list[int], stop: Sequence[str], decode: Callable) -> list[int]:
    """The shortest prefix of `ids` whose text contains a stop string (ids itself when none does)."""
    if not _has_stop(decode(ids), stop):
        return ids
    lo, hi = 1, len(ids)  # decode(ids[:hi]) has a stop; find the least such hi
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _has_stop(decode(ids[:mid]), stop) else (mid + 1, hi)
    return ids[:hi]


def generate(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eot_id: int | None = None, stop: Sequence[str] = (), decode: Callable | None = None,
             batch_size: int = 8) -> list[list[int]]:
    """New tokens for each prompt, with a KV cache.

    Args:
      prompts: token ids, one list per prompt (any lengths; longer than the context: the last part is used).
      max_new_tokens: at most this many new tokens per prompt.
      temperature: 0 is greedy; top_k (0: off) and top_p (1.0: off) filter before sampling.
      seed: the same seed, prompts and batch_size give the same tokens.
      eot_id: a row stops when it samples this token (which is not returned).
      stop: a row stops once decode(its new tokens) contains one of these strings; the tokens are kept through
        the one that completes it, so cut the text yourself (`cut_at_stop`).
      batch_size: prompts decoded together; a partial last batch is padded to keep one compiled shape.
    """
    check_sampling(temperature, top_k, top_p)
    prompts = [list(map(int, p)) for p in prompts]
    _check_prompts(cfg, prompts)
    if stop and decode is None:
        raise ValueError("stop strings need decode= (the tokenizer's decode) to be recognised")
    out: list[list[int]] = []
    for b0 in range(0, len(prompts), batch_size):
        batch = prompts[b0:b0 + batch_size]
        out += _generate_batch(cfg, params, batch + [[0]] * (batch_size - len(batch)), max_new_tokens,
                               temperature, top_k, top_p, jax.random.fold_in(jax.random.key(seed), b0),
                               eot_id, tuple(stop), decode)[:len(batch)]
    return out


def _generate_batch(cfg, params, prompts, max_new, temperature, top_k, top_p, key, eot_id, stop, decode):
    B, T = len(prompts), cfg.block_size
    new: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(B, bool)
    if max_new <= 0:
        return new
    sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    eot = jnp.int32(-1 if eot_id is None else eot_id)
    event = 0
    while True:
        # (Re)build the cache. A row that has filled the context keeps its last half; the others keep
        # everything, so a row's tokens do not depend on the other rows in its batch.
        ctx = [(p + n)[-T:] for p, n in zip(prompts, new)]
        if event > 0:
            ctx = [c[-max(T // 2, 1):] if len(c) >= T else c for c in ctx]
        lens = np.array([len(c) for c in ctx], np.int32)
        Tp = _bucket(int(lens.max()), T)
        S = _bucket(int(lens.max()) + max_new - min(len(n) for n in new), T)
        tokens = np.zeros((B, Tp), np.int32)
        for i, c in enumerate(ctx):
            tokens[i, :len(c)] = c
        cache, tok = _prefill(cfg, params, tokens, lens, S, jax.random.fold_in(key, event), *sampling)
        event += 1
        tok_np = np.asarray(tok)
        for i in np.flatnonzero(~done):
            if tok_np[i] == eot_id:
                done[i] = True
            else:
                new[i].append(int(tok_np[i]))
                done[i] = len(new[i]) >= max_new or bool(stop and _has_stop(decode(new[i]), stop))
        pos = lens.copy()  # where each row's newest token goes
        tok_B = jnp.asarray(tok)
        count = np.array([len(n) for n in new], np.int32)
        while not done.all():
            room = int(min(S, T) - pos[~done].max())
            if room <= 0:
                break  # some row has filled the context (or this cache): rebuild from the recent tokens
            n_steps = min(CHUNK, room)
            cache, tok_B, pos_j, count_j, done_j, out = _decode(
                cfg, params, cache, tok_B, jnp.asarray(pos), jnp.asarray(count), jnp.asarray(done),
                jnp.int32(n_steps), jnp.int32(max_new), eot, key, jnp.int32(event), *sampling)
            event += n_steps
            out, pos, count, done_new = np.asarray(out), np.array(pos_j), np.array(count_j), np.array(done_j)
            for i in np.flatnonzero(~done):
                new[i] += [int(t) for t in out[i, :n_steps] if t >= 0]
                if stop and _has_stop(decode(new[i]), stop):
                    new[i] = _through_stop(new[i], stop, decode)
                    done_new[i] = True
            done = done_new
        if done.all():
            return new


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest stop string in it."""
    cut = min((text.index(s) for s in stop if s and s in text), default=len(text))
    return text[:cut]


@functools.partial(jax.jit, static_argnums=(0,))
def _next_uncached(cfg: ModelConfig, params: Params, window_BT, last_B, key, temperature, top_k, top_p):
    logits_BTV = forward(cfg, params, window_BT)
    logits_BV = jnp.take_along_axis(logits_BTV, last_B[:, None, None], axis=1)[:, 0]
    return sample_logits(cfg, logits_BV, key, temperature, top_k, top_p)


def generate_uncached(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                      eot_id: int | None = None) -> list[list[int]]:
    """The same sampling without a cache: the full forward pass over a fixed [B, block_size] window per token
    (a window sliding one token at a time past the context). The oracle for tests; slow by design."""
    check_sampling(temperature, top_k, top_p)
    prompts = [list(map(int, p)) for p in prompts]
    _check_prompts(cfg, prompts)
    B, T = len(prompts), cfg.block_size
    key = jax.random.fold_in(jax.random.key(seed), 0)
    sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
    new: list[list[int]] = [[] for _ in prompts]
    done = np.zeros(B, bool)
    for step in range(max_new_tokens):
        window = np.zeros((B, T), np.int32)
        last = np.zeros(B, np.int32)
        for i, (p, n) in enumerate(zip(prompts, new)):
            w = (p + n)[-T:]
            window[i, :len(w)] = w
            last[i] = len(w) - 1
        tok = np.asarray(_next_uncached(cfg, params, window, last, jax.random.fold_in(key, step), *sampling))
        for i in np.flatnonzero(~done):
            if tok[i] == eot_id:
                done[i] = True
            else:
                new[i].append(int(tok[i]))
        if done.all():
            break
    return new


def sample(cfg: ModelConfig, params: Params, prompt_ids: list[int], max_new_tokens: int, *,
           temperature: float = 0.8, top_k: int = 40, top_p: float = 1.0, seed: int = 0,
           stop_id: int | None = None) -> list[int]:
    """One prompt's new tokens (temperature=0 is greedy). An empty prompt starts from end-of-text."""
    prompt = list(prompt_ids) or ([stop_id] if stop_id is not None else [0])
    return generate(cfg, params, [prompt], max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                    seed=seed, eot_id=stop_id, batch_size=1)[0]


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The sampling options of eval.py and sample.py."""
    p.add_argument("--max-tokens", type=int, default=200, help="new tokens per sample")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the smallest set with this mass (1: off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end a sample at this text (repeatable; \\n and \\t are understood)")
    p.add_argument("--seed", type=int, default=0)


def unescape(text: str, what: str = "the prompt") -> str:
    """\\n, \\t and \\\\ as typed on a command line; everything else (any Unicode) as it is. Bytes that are not
    UTF-8 (Python hands them over as lone surrogates) are refused: the tokenizer would fail on them deep inside."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text.encode("utf-8", "surrogateescape")
        raise GenerationError(f"{what} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start}); pass "
                              f"UTF-8 text (convert it with iconv -t UTF-8)") from None
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)
