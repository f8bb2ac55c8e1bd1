"""Evaluation: held-out loss, perplexity and bits per byte; restoring a run; log-likelihood scoring of
(context, continuation) pairs for zero- and few-shot tasks (see tasks.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from gptjax.data import Tokenizer
from gptjax.distributed import host_to_global
from gptjax.errors import DataError
from gptjax.model import forward, vocab_mask


def mean_nats(eval_fn: Callable, params, batches: Iterable[tuple[np.ndarray, np.ndarray]],
                     batch_sharding, *, total: int | None = None, desc: str = "evaluating") -> dict:
    """Mean nats per predicted token over (tokens [B, T+1], weights [B, T]) batches."""
    nats, count = 0.0, 0.0
    for tokens, weights in tqdm(batches, total=total, desc=desc, unit="batch", leave=False,
                                disable=jax.process_index() != 0):
        # every process sees the same windows and feeds the rows its devices hold
        tokens, weights = host_to_global(tokens, batch_sharding), host_to_global(weights, batch_sharding)
        s, c = eval_fn(params, tokens, weights)
        nats += float(s)
        count += float(c)
    if count == 0:
        raise DataError("nothing to evaluate: the text is shorter than two tokens")
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
    r = mean_nats(trainer.eval_step, params, batches, trainer.eval_batch_sharding, total=total)
    r["bits_per_byte"] = bits_per_byte(r["loss"], td.tokens("val"), td.manifest["bytes"]["val"])
    return r


# ----------------------------------------------------------------------------------------------
# A trained (or imported) run, restored for evaluation


@dataclass
class Run:
    cfg: Any  # TrainConfig; cfg.model is the ModelConfig
    mesh: Any
    trainer: Any
    params: Any
    tokenizer: Tokenizer
    step: int
    run_dir: Path


def load_run(run_dir, step: int | None = None, overrides: Sequence[str] = ()) -> Run:
    """Restore a run directory's checkpoint (the latest, or `step`) onto the devices here, with its tokenizer.

    The checkpoint's own config is used, rebuilt for this machine's devices; `overrides` (key=value) adjust
    it, e.g. mesh.tensor=2 or model.attention_impl=reference.
    """
    from gptjax import config as config_lib
    from gptjax import data as data_lib
    from gptjax.checkpoint import open_step
    from gptjax.sharding import make_mesh
    from gptjax.train.steps import make_train_steps

    ckpts, _, stored = open_step(run_dir, step)
    stored = config_lib.stored_train_config(stored)
    cfg = config_lib.apply_overrides(stored, ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"] + list(overrides))
    mesh = make_mesh(cfg.mesh)
    trainer = make_train_steps(cfg, mesh)
    # step=None: the latest readable checkpoint (an unreadable latest one is reported and passed over)
    step, state = ckpts.restore(trainer.abstract_state(), step, params_only=True)
    tok = data_lib.load_tokenizer(run_dir)
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(f"the tokenizer in {run_dir} has {tok.vocab_size} tokens but the model only "
                                 f"{cfg.model.vocab_size}; put the model's own tokenizer files in {run_dir}")
    return Run(cfg, mesh, trainer, state["params"], tok, step, Path(run_dir))


# ----------------------------------------------------------------------------------------------
# Log-likelihood scoring of (context, continuation) pairs: the core of zero- and few-shot evaluation


class Scorer:
    """Scores continuations given contexts with one compiled function per (batch, length bucket).

    Sequences are packed into a few fixed shapes (lengths: powers of two up to the context), longest first,
    so a task compiles a handful of programs whatever its size.
    """

    def __init__(self, run: Run, *, batch_size: int = 0, progress: bool = True):
        from gptjax.sharding import use_mesh

        self.run, self.progress = run, progress
        self.cfg = run.cfg.model
        self.batch_size = eval_batch_size(run.cfg, run.mesh, batch_size)
        self.truncated = 0  # pairs whose context was cut from the left to fit the window
        self.sharding = run.trainer.eval_batch_sharding
        cfg, mesh, rules = self.cfg, run.mesh, run.cfg.mesh.rules

        def score(params, inputs_BT, targets_BT, mask_BT):
            with use_mesh(mesh, rules):
                logits_BTV = forward(cfg, params, inputs_BT) + vocab_mask(cfg)
            logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
            logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
            greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
            return (logp_BT * mask_BT).sum(-1), jnp.all(greedy_BT | (mask_BT == 0), axis=-1)

        self._score = jax.jit(score)

    def _length_bucket(self, n: int) -> int:
        T = self.cfg.block_size
        return min(T, max(16, 1 << (n - 1).bit_length()))

    def loglikelihood(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                      desc: str = "scoring") -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (log p(continuation | context) in nats, all tokens greedy).

        A context too long for the window loses its start (counted in `self.truncated`); so does a
        continuation longer than the window, of which only the last block_size tokens are scored. The context
        must hold at least one token (use end-of-text).
        """
        T = self.cfg.block_size
        rows = []
        for i, (ctx, cont) in enumerate(pairs):
            ctx, cont = list(ctx), list(cont)
            if not ctx:
                raise ValueError(f"request {i} has an empty context; pass [end-of-text] instead")
            if not cont:
                raise ValueError(f"request {i} has an empty continuation: nothing to score")
            full = (ctx + cont)[-(T + 1):]
            self.truncated += len(ctx) + len(cont) > T + 1
            rows.append((full, min(len(cont), T), i))
        rows.sort(key=lambda r: -len(r[0]))  # longest first: equal lengths share a bucket
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        bs = self.batch_size
        batches = [rows[j:j + bs] for j in range(0, len(rows), bs)]
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False,
                          disable=not self.progress or jax.process_index() != 0):
            L = self._length_bucket(max(len(f) - 1 for f, _, _ in batch))
            inputs = np.zeros((bs, L), np.int32)
            targets = np.zeros((bs, L), np.int32)
            mask = np.zeros((bs, L), np.float32)
            for r, (full, n_cont, _) in enumerate(batch):
                n = len(full) - 1
                inputs[r, :n], targets[r, :n] = full[:-1], full[1:]
                mask[r, n - n_cont:n] = 1.0
            put = lambda a: jax.device_put(a, self.sharding)  # noqa: E731
            logp, greedy = self._score(self.run.params, put(inputs), put(targets), put(mask))
            logp, greedy = np.asarray(logp), np.asarray(greedy)
            for r, (_, _, i) in enumerate(batch):
                out[i] = (float(logp[r]), bool(greedy[r]))
        return out

    def rolling_loglikelihoods(self, docs: Sequence[Sequence[int]], desc: str = "scoring") -> list[float]:
        """Total log-likelihood of each token sequence, its first token conditioned on end-of-text, in disjoint
        windows of block_size predictions, as lm-evaluation-harness's rolling windows: each full window sees
        only the token before it, the last (partial) one as much context as fits. The windows of all the
        sequences are scored together, so short documents share batches."""
        T, eot = self.cfg.block_size, self.run.tokenizer.eot_id
        pairs, owner = [], []
        for d, ids in enumerate(docs):
            seq = [eot] + list(ids)
            for j in range(1, len(seq), T):
                cont = seq[j:j + T]
                pairs.append((seq[max(0, j + len(cont) - T - 1):j], cont))
                owner.append(d)
        totals = [0.0] * len(docs)
        for d, (ll, _) in zip(owner, self.loglikelihood(pairs, desc=desc) if pairs else []):
            totals[d] += ll
        return totals

    def rolling_loglikelihood(self, ids: Sequence[int], desc: str = "scoring") -> float:
        """`rolling_loglikelihoods` of one sequence."""
        return self.rolling_loglikelihoods([ids], desc=desc)[0]
