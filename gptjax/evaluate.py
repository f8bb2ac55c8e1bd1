"""Held-out loss, perplexity and bits per byte of a token stream."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import jax
import numpy as np
from tqdm.auto import tqdm

from gptjax.distributed import local_rows


def evaluate_windows(eval_fn: Callable, params, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                     batch_sharding, *, total: int | None = None, desc: str = "evaluating") -> dict:
    """Mean nats per predicted token over (tokens [B, T+1], weights [B, T]) batches."""
    nats, count = 0.0, 0.0
    for tokens, weights in tqdm(batches, total=total, desc=desc, unit="batch", leave=False,
                                disable=jax.process_index() != 0):
        # every process sees the same windows and feeds the rows its devices hold
        rows = local_rows(batch_sharding, tokens.shape, axis=0)
        tokens = jax.make_array_from_process_local_data(batch_sharding, tokens[rows], tokens.shape)
        weights = jax.make_array_from_process_local_data(batch_sharding, weights[rows], weights.shape)
        s, c = eval_fn(params, tokens, weights)
        nats += float(s)
        count += float(c)
    if count == 0:
        raise ValueError("nothing to evaluate: the text is shorter than two tokens")
    loss = nats / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count)}


def bits_per_byte(loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    return loss_nats * n_tokens / max(n_bytes, 1) / math.log(2)


def eval_batch_size(cfg, mesh, requested: int = 0) -> int:
    """The training micro-batch (or `requested`), rounded to a multiple of the data x fsdp devices."""
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    bs = requested or max(cfg.batch_size // cfg.micro_batches, 1)
    return max(shards, bs // shards * shards)


def heldout(trainer, params, td, *, batch_size: int = 0, max_batches: int = 0) -> dict:
    """Loss, perplexity and bits per byte on the validation split of TokenData `td`."""
    T = trainer.cfg.model.block_size
    bs = eval_batch_size(trainer.cfg, trainer.mesh, batch_size)
    batches = td.eval_windows(seq_len=T, batch_size=bs)
    total = math.ceil(td.tokens("val") / T / bs)
    if max_batches:
        batches = (b for _, b in zip(range(max_batches), batches))
        total = min(total, max_batches)
    r = evaluate_windows(trainer.eval, params, batches, trainer.eval_batch_sharding, total=total)
    r["bits_per_byte"] = bits_per_byte(r["loss"], td.tokens("val"), td.manifest["bytes"]["val"])
    return r
