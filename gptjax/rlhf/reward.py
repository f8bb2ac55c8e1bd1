"""InstructGPT's second stage, the reward model (Ouyang et al. 2022, section 3.5): the SFT model with its
unembedding replaced by a scalar head, read at the response's end, trained on rankings of K completions of a
prompt, as a stage of the one training loop.

A ranking record (code_task.py writes them) is {"prompt", "completions": [K strings], "ended": [K bools],
"ranks": [K ints], "labeler"}: rank 0 is the best, equal ranks are ties. Each completion is encoded as prompt
tokens + completion tokens, + end-of-text when its `ended` flag is true, and the reward is read at the last real
token: the EOT of a completion that ended, the last completion token of one that did not (it has no EOT to read
at). The model runs once per completion: a batch is P prompts x K completions x T tokens, flattened to P*K
sequences for one forward pass, and the rewards r [P, K] = w . h + b, h the final hidden state (after ln_f) at each
read position. The loss (losses.ranking_loss) is, per prompt, the mean of -log sigmoid(r_w - r_l) over its ranked
pairs (w ranked above l; ties dropped), then the mean over the prompts: all C(K,2) pairs of a prompt are one batch
element, so no completion is scored twice and a prompt with many completions does not outweigh the others.

Batches: each epoch walks the training records in a fresh seeded order, `batch_size` records a step: a pure
function of (seed, step), so a resumed run replays the uninterrupted one. Held-out rankings (the val file, or the
records whose prompt falls in a deterministic 5% by hash: the same prompt never on both sides) are scored at step 0
(the parent's weights and a fresh head), every eval_every steps (default: each epoch) and at the end: the held-out
loss, the pairwise accuracy (the fraction of a prompt's ranked pairs with r_w > r_l, averaged over prompts, with
its standard error over prompts) and that accuracy per labeler (val_acc/NAME; eval_labelers picks the names).

After training, the bias b is shifted by the mean reward of the demonstrations (prompt + response + EOT, read at
the EOT), so that they average 0; the parameters with that bias are saved in RUN_DIR/final/ (the loop's own
checkpoints keep the trained, unshifted head, so a rerun of a finished run computes the same shift again).
`load_reward_model(run_dir)` reads them back, with the tokenizer and a scoring function for PPO and best-of-n.

The run directory: config.json (the RewardConfig, stage "reward", the lineage naming the parent run, its step and
its parameters' fingerprint), checkpoints/ (the trained state; their stored config is the reward model's
TrainConfig), final/ (the parameters with the bias set), the tokenizer copied from the parent (a reward model
shares its parent's tokenizer: there is no setting to give it another, and its fingerprint is recorded and checked
on resume and on load), reward.json (what a resume and a load need without the parent: its TrainConfig, the
rankings' and tokenizer's fingerprints, the K distribution, the demonstrations used and, once done, the bias
shift), metrics.jsonl and summary.json.

Deviations from the paper, and why:
- Labelers and prompts are what the data says: here typically code_task's programmatic labelers on code prompts
  (no people), whose rankings the paper's ~40 contractors made by hand. Held-out prompts are split by a hash of the
  prompt, not by customer, as there are no customers.
- The reward model is its parent's size (the paper used one 6B reward model for every policy, as 175B was
  unstable to train): small models are what this repository trains in minutes.
- Any K >= 2 is accepted (the paper's K is 4..9); a record with one completion has no pair and is refused, as is one
  whose ranks all tie. Within a prompt the loss is divided by its number of untied pairs, which is C(K,2) without
  ties (the paper's normaliser) and smaller with them (tied pairs are dropped, not counted as zero).
- K is padded to the largest K in the data (train and held-out), not to each batch's: one compiled step shape for
  the whole run. Padding slots are masked out of the loss and the metrics (they still cost compute).
- A completion that did not end is read at its last token and never gets an EOT; prompt + completion (+ EOT)
  longer than max_len loses the end of the completion (counted and reported) and is read at the last token kept.
  A prompt that leaves no room for a single token is refused. The paper's completions fit its 2048-token context.
- The demonstrations that set the bias are the parent SFT run's own (train and held-out), or --demos; ones longer
  than max_len (their EOT would be cut off) are left out of the mean and counted. The paper sets the bias with its
  labelers' demonstrations.
- One epoch (the paper's), learning rate 5e-5 rather than 9e-6 (a fresh head on a small model, tens of steps:
  see rlhf/config.py), 2% warmup, no dropout. The head w ~ N(0, init_std), b = 0; neither is weight-decayed (optim's
  decay mask names matrices and embeddings).
- "ended" may be left out of a record (every completion ended, as in a hand-written comparison data set).
- Prompt and completion are tokenized separately and concatenated (as SFT does), so a completion's tokens are the
  same whatever the prompt, and a policy's sampled tokens are scored as they were sampled.
- Pairwise accuracy counts r_w > r_l strictly: equal rewards are a wrong answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax import config as config_lib
from gptjax import distributed, sharding
from gptjax import flops as flops_lib
from gptjax.checkpoint import Checkpoints, complete_steps
from gptjax.config import ModelConfig, TrainConfig
from gptjax.errors import CheckpointError, ConfigError, DataError
from gptjax.heads import hidden_states
from gptjax.model import Params, abstract_params, logical_axes
from gptjax.rlhf.config import BUILTIN, RewardConfig, SFTConfig, labeler_names
from gptjax.rlhf.losses import ranking_loss
from gptjax.train import lineage as lineage_lib
from gptjax.train import loop, tracking
from gptjax.train.steps import TrainSteps, make_train_steps

VAL_FRACTION = 0.05  # of the prompts held out (by a hash of the prompt) when no val file is given
RECORD = '{"prompt": str, "completions": [str, ...], "ended": [bool, ...], "ranks": [int, ...], "labeler": str}'

# ----------------------------------------------------------------------------------------------
# Rankings: records, encoding, batches (pure numpy)


@dataclass(frozen=True)
class Ranking:
    prompt: str
    completions: tuple[str, ...]
    ended: tuple[bool, ...]
    ranks: tuple[int, ...]
    labeler: str  # "" when the record names none
    where: str  # "FILE line N": named in every message about this record


@dataclass(frozen=True)
class Encoded:
    """One ranking, encoded: a sequence per completion, read at its last token."""

    seqs: tuple[np.ndarray, ...]  # int32: prompt + completion (+ EOT if it ended), at most max_len tokens each
    ranks: np.ndarray  # int32 [K]
    labeler: str
    truncated: int  # completions that lost their end to max_len
    n_prompt: int  # the prompt's tokens at the start of every sequence (never cut: check_prompt)

    @property
    def k(self) -> int:
        return len(self.seqs)


def _check_record(rec: Any, where: str) -> Ranking:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a ranking record must be a JSON object {RECORD}, got {type(rec).__name__}")

    def need(key: str, ok: bool, what: str):
        if not ok:
            got = "missing" if key not in rec else f"got {json.dumps(rec[key])[:60]}"
            raise DataError(f"{where}: the record needs \"{key}\", {what} ({got}; its keys: "
                            f"{', '.join(map(str, rec)) or 'none'}); every line is {RECORD}")

    comps, ranks = rec.get("completions"), rec.get("ranks")
    need("prompt", isinstance(rec.get("prompt"), str), "a string")
    need("completions", isinstance(comps, list) and all(isinstance(c, str) for c in comps), "a list of strings")
    need("ranks", isinstance(ranks, list) and all(isinstance(r, int) and not isinstance(r, bool) and r >= 0
                                                  for r in ranks), "a list of integers >= 0 (0 the best)")
    ended = rec.get("ended", [True] * len(comps))
    need("ended", isinstance(ended, list) and all(isinstance(e, bool) for e in ended), "a list of booleans")
    labeler = rec.get("labeler", "")
    need("labeler", isinstance(labeler, str), "a string, or no such key")
    k = len(comps)
    if not rec["prompt"]:
        raise DataError(f"{where}: the prompt is empty; every ranking needs the prompt its completions follow")
    if k < 2:
        raise DataError(f"{where}: the record ranks {k} completion(s); a ranking needs at least 2 (the paper ranks "
                        f"K = 4..9 per prompt): add completions or drop the record")
    if len(ranks) != k or len(ended) != k:
        raise DataError(f"{where}: {k} completions but {len(ranks)} ranks and {len(ended)} ended flags; give one "
                        f"rank (and one ended flag) per completion")
    if len(set(ranks)) == 1:
        raise DataError(f"{where}: all {k} completions have rank {ranks[0]}: every pair is a tie, and ties are "
                        f"dropped, so the record has nothing to teach; rank them apart or drop the record")
    return Ranking(rec["prompt"], tuple(comps), tuple(ended), tuple(ranks), labeler, where)


def read_rankings(path: str | Path) -> list[Ranking]:
    """Every record of a JSONL file of rankings; a bad record is one DataError naming it and the fix."""
    from gptjax.data import iter_jsonl

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no ranking file {path}: give a JSONL file of {RECORD} records")
    out = [_check_record(rec, f"{path} line {line}") for line, rec in iter_jsonl(path, error=DataError)]
    if not out:
        raise DataError(f"{path} holds no records; each line should be a JSON object {RECORD}")
    return out


def split_rankings(records: list[Ranking], fraction: float = VAL_FRACTION) -> tuple[list[Ranking], list[Ranking]]:
    """(train, held-out), in file order, by a hash of the prompt: stable across runs and machines, and the same
    prompt (ranked by several labelers) never on both sides. With nothing held out by hash, the last prompt is."""
    from gptjax.data import is_validation

    val = [r for r in records if is_validation(r.prompt, fraction)]
    if not val:
        val = [r for r in records if r.prompt == records[-1].prompt]
    held = {r.prompt for r in val}
    return [r for r in records if r.prompt not in held], val


def load_rankings(cfg: RewardConfig) -> tuple[list[Ranking], list[Ranking]]:
    if cfg.val:
        train, val = read_rankings(cfg.data), read_rankings(cfg.val)
    else:
        train, val = split_rankings(read_rankings(cfg.data))
    if not train:
        raise DataError(f"{cfg.data} has {len(val)} record(s), all held out: too few to train on; add records or give "
                        f"a separate --val FILE")
    return train, val


def rankings_fingerprint(train: list[Ranking], val: list[Ranking]) -> str:
    """A hash of the rankings, split included: a resumed run must see the same ones."""
    h = hashlib.sha256()
    for split, recs in (("train", train), ("val", val)):
        for r in recs:
            h.update(json.dumps([split, r.prompt, r.completions, r.ended, r.ranks, r.labeler]).encode() + b"\n")
    return h.hexdigest()[:16]


def check_prompt(n_prompt: int, max_len: int, context: int, where: str) -> None:
    if n_prompt == 0:
        raise DataError(f"{where}: the prompt is empty; every completion needs a prompt to follow")
    if n_prompt >= max_len:  # not even the EOT would fit after it
        fix = f"raise max_len (up to the model's context, {context})" if max_len < context else "drop the record"
        raise DataError(f"{where}: the prompt is {n_prompt} tokens, more than the {max_len - 1} that max_len={max_len} "
                        f"leaves for it (a completion needs at least one token); shorten the prompt or {fix}")


def encode_sequence(prompt: Sequence[int], completion: Sequence[int], ended: bool, eot_id: int,
                    max_len: int) -> tuple[np.ndarray, bool]:
    """(prompt + completion (+ EOT if it ended), cut to max_len tokens; whether it was cut). The reward is read at
    its last token."""
    full = list(prompt) + list(completion) + ([eot_id] if ended else [])
    return np.asarray(full[:max_len], np.int32), len(full) > max_len


def encode_rankings(tok, records: list[Ranking], max_len: int, context: int) -> list[Encoded]:
    if not records:
        return []
    prompts = tok.encode_batch([r.prompt for r in records])
    flat = tok.encode_batch([c for r in records for c in r.completions])
    out, i = [], 0
    for r, p in zip(records, prompts):
        check_prompt(len(p), max_len, context, r.where)
        seqs, cut = [], 0
        for c, e in zip(flat[i:i + len(r.completions)], r.ended):
            s, t = encode_sequence(p, c, e, tok.eot_id, max_len)
            seqs.append(s)
            cut += t
        i += len(r.completions)
        out.append(Encoded(tuple(seqs), np.asarray(r.ranks, np.int32), r.labeler, cut, len(p)))
    return out


def fill(records: Sequence[Encoded | None], K: int, T: int, pad_id: int
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(tokens [P, K, T] int32, read [P, K] int32, ranks [P, K] int32, valid [P, K] float32). Slots past a record's
    K (and every slot of a None record) hold padding, read position 0 and valid 0."""
    n = len(records)
    tokens = np.full((n, K, T), pad_id, np.int32)
    read = np.zeros((n, K), np.int32)
    ranks = np.zeros((n, K), np.int32)
    valid = np.zeros((n, K), np.float32)
    for p, rec in enumerate(records):
        if rec is None:
            continue
        for k, s in enumerate(rec.seqs):
            tokens[p, k, :len(s)] = s
            read[p, k] = len(s) - 1
        ranks[p, :rec.k] = rec.ranks
        valid[p, :rec.k] = 1.0
    return tokens, read, ranks, valid


def fill_rows(seqs: Sequence[np.ndarray], rows: int, T: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [rows, T], read [rows]) for up to `rows` sequences; rows past them are padding read at 0."""
    tokens = np.full((rows, T), pad_id, np.int32)
    read = np.zeros((rows,), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
        read[i] = len(s) - 1
    return tokens, read


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Record indices of `step`'s batch: each epoch walks a fresh permutation seeded by (seed, epoch), a pure
    function of (seed, step)."""
    i = step * batch_size + np.arange(batch_size)
    epochs = i // n
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n)
        out[epochs == e] = perm[i[epochs == e] % n]
    return out


# ----------------------------------------------------------------------------------------------
# The pure part: the head, the rewards, the loss, the accuracy


def init_head(mcfg: ModelConfig, key: jax.Array) -> Params:
    """The scalar reward head: r = w . h + b on a final hidden state h [D]."""
    return {"w": mcfg.init_std * jax.random.normal(key, (mcfg.d_model,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def head_axes() -> Params:
    return {"w": ("embed",), "b": ()}


def rewards(mcfg: ModelConfig, params: Params, tokens_NT: jax.Array, read_N: jax.Array, *,
            dropout_key=None) -> jax.Array:
    """[N] float32 rewards of N sequences, each read at its position read_N (the last real token)."""
    h_NTD = hidden_states(mcfg, params, tokens_NT, dropout_key=dropout_key)
    h_ND = jnp.take_along_axis(h_NTD, read_N[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    head = params["head"]
    return h_ND.astype(jnp.float32) @ head["w"] + head["b"]


def reward_loss(mcfg: ModelConfig, params: Params, tokens_PKT: jax.Array, read_PK: jax.Array, ranks_PK: jax.Array,
                valid_PK: jax.Array, dropout_key=None) -> tuple[jax.Array, jax.Array]:
    """(the ranking loss, rewards [P, K]): every completion of every prompt through the model once, as one batch of
    P * K sequences."""
    Pn, K, T = tokens_PKT.shape
    r_PK = rewards(mcfg, params, tokens_PKT.reshape(Pn * K, T), read_PK.reshape(Pn * K),
                   dropout_key=dropout_key).reshape(Pn, K)
    return ranking_loss(r_PK, ranks_PK, valid_PK), r_PK


def pairwise_accuracy(rewards_PK, ranks_PK, valid_PK, xp=jnp):
    """(per-prompt accuracy [P], whether the prompt has a ranked pair [P]): the fraction of its pairs (w ranked
    strictly above l, both valid) with r_w > r_l. xp: jnp or numpy."""
    valid = valid_PK.astype(bool)
    pair = (ranks_PK[:, :, None] < ranks_PK[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    right = (rewards_PK[:, :, None] > rewards_PK[:, None, :]) & pair
    n = pair.sum((1, 2))
    return right.sum((1, 2)) / xp.maximum(n, 1), n > 0


@dataclass
class RewardSteps:
    """Everything jit-compiled for one reward model on one mesh. The optimizer (AdamW, clipping, the schedule) is
    pretraining's, from make_train_steps (ts); the state adds the head to the model's parameters."""

    ts: TrainSteps
    param_shapes: Any
    param_shardings: Any
    state_shardings: Any
    batch_shardings: tuple  # (tokens [P, K, T], read, ranks, valid [P, K])
    row_shardings: tuple  # (tokens [N, T], read [N])
    start_from: Callable  # params -> state at step 0
    step: Callable  # (state, batch) -> (state, metrics), state donated
    score: Callable  # (params, tokens [N, T], read [N]) -> rewards [N], replicated
    all_finite: Callable

    def abstract_state(self):
        shapes = jax.eval_shape(self.start_from, self.param_shapes)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self.state_shardings)

    def abstract_params(self):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), self.param_shapes,
                            self.param_shardings)


def param_shardings(mcfg: ModelConfig, mesh, rules: str):
    """(shapes, shardings) of the reward model's parameters: the language model's, and the head under "head"."""
    shapes = dict(abstract_params(mcfg))
    shapes["head"] = jax.eval_shape(lambda: init_head(mcfg, jax.random.key(0)))
    axes = dict(logical_axes(mcfg))
    axes["head"] = head_axes()
    return shapes, sharding.tree_shardings(axes, shapes, mesh, rules)


def make_score(mcfg: ModelConfig, mesh, rules: str, shardings) -> tuple[Callable, tuple]:
    row_tok = sharding.batch_sharding(mesh, rules, ndim=2)
    row_vec = sharding.batch_sharding(mesh, rules, ndim=1)

    def score_fn(params, tokens_NT, read_N):
        with sharding.use_mesh(mesh, rules):
            return rewards(mcfg, params, tokens_NT, read_N)

    # replicated rewards: every process reads all of them and computes the same metrics and bias
    score = jax.jit(score_fn, in_shardings=(shardings, row_tok, row_vec), out_shardings=NamedSharding(mesh, P()))
    return score, (row_tok, row_vec)


def compile_stage(child: TrainConfig, mesh) -> RewardSteps:
    ts = make_train_steps(child, mesh)
    mcfg, rules = child.model, child.mesh.rules
    tx, replicated = ts.tx, NamedSharding(mesh, P())
    shapes, param_sh = param_shardings(mcfg, mesh, rules)
    opt_shapes = jax.eval_shape(tx.init, shapes)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, param_sh, transform_non_params=lambda _: replicated)
    state_sh = {"step": replicated, "params": param_sh, "opt_state": opt_sh}
    start_from = jax.jit(lambda params: {"step": jnp.zeros((), jnp.int32), "params": params,
                                         "opt_state": tx.init(params)},
                         in_shardings=(param_sh,), out_shardings=state_sh)
    tok_sh = sharding.batch_sharding(mesh, rules, ndim=3)
    vec_sh = sharding.batch_sharding(mesh, rules, ndim=2)
    base_key = jax.random.key(child.seed)
    m = mcfg
    dropout_on = max(m.embd_pdrop, m.attn_pdrop, m.resid_pdrop) > 0.0

    def train_step(state, batch):
        tokens_PKT, read_PK, ranks_PK, valid_PK = batch
        with sharding.use_mesh(mesh, rules):
            key = jax.random.fold_in(base_key, state["step"]) if dropout_on else None
            params = state["params"]
            (loss, r_PK), grads = jax.value_and_grad(
                lambda p: reward_loss(mcfg, p, tokens_PKT, read_PK, ranks_PK, valid_PK, key), has_aux=True)(params)
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt_state": opt_state}
        acc_P, has_P = pairwise_accuracy(r_PK, ranks_PK, valid_PK)
        has = has_P.astype(jnp.float32)
        n = jnp.maximum(valid_PK.sum(), 1.0)
        mean = (r_PK * valid_PK).sum() / n
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": ts.lr_schedule(state["step"]),
                     "acc": (acc_P * has).sum() / jnp.maximum(has.sum(), 1.0), "reward_mean": mean,
                     "reward_std": jnp.sqrt((((r_PK - mean) ** 2) * valid_PK).sum() / n)}

    step = jax.jit(train_step, in_shardings=(state_sh, (tok_sh, vec_sh, vec_sh, vec_sh)),
                   out_shardings=(state_sh, replicated), donate_argnums=0)
    score, row_sh = make_score(mcfg, mesh, rules, param_sh)
    return RewardSteps(ts, shapes, param_sh, state_sh, (tok_sh, vec_sh, vec_sh, vec_sh), row_sh, start_from, step,
                       score, ts.all_finite)


def score_sequences(score: Callable, params, seqs: Sequence[np.ndarray], rows: int, T: int, pad_id: int,
                    row_shardings: tuple, desc: str = "scoring") -> np.ndarray:
    """Rewards [len(seqs)] float32 of encoded sequences, `rows` at a time (the last batch padded)."""
    from tqdm.auto import tqdm

    out = []
    for s in tqdm(range(0, len(seqs), rows), desc=desc, unit="batch", leave=False, disable=jax.process_index() != 0):
        chunk = seqs[s:s + rows]
        tokens, read = fill_rows(chunk, rows, T, pad_id)
        r = score(params, *(distributed.host_to_global(a, sh) for a, sh in zip((tokens, read), row_shardings)))
        out.append(np.asarray(jax.device_get(r), np.float32)[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def ranking_metrics(r_list: Sequence[np.ndarray], records: Sequence[Encoded], labelers: Sequence[str]) -> dict:
    """Held-out loss, pairwise accuracy (per prompt, averaged; its standard error over prompts) and the accuracy of
    each named labeler's records (with its standard error and number of prompts), from each record's rewards."""
    K = max(rec.k for rec in records)
    r_PK = np.zeros((len(records), K), np.float32)
    ranks_PK = np.zeros((len(records), K), np.int32)
    valid_PK = np.zeros((len(records), K), np.float32)
    for p, (r, rec) in enumerate(zip(r_list, records)):
        r_PK[p, :rec.k], ranks_PK[p, :rec.k], valid_PK[p, :rec.k] = r, rec.ranks, 1.0
    acc_P, has_P = pairwise_accuracy(r_PK, ranks_PK, valid_PK, xp=np)
    acc = acc_P[has_P]
    out = {"val_loss": float(ranking_loss(jnp.asarray(r_PK), jnp.asarray(ranks_PK), jnp.asarray(valid_PK))),
           "val_acc": float(acc.mean()),
           "val_acc_se": float(acc.std(ddof=1) / math.sqrt(len(acc))) if len(acc) > 1 else None,
           "val_prompts": int(len(acc))}
    names = np.asarray([rec.labeler for rec in records])
    for name in labelers:
        sel = (names == name) & has_P
        out[f"val_acc/{name}"] = float(acc_P[sel].mean()) if sel.any() else None
        out[f"val_acc_se/{name}"] = float(acc_P[sel].std(ddof=1) / math.sqrt(sel.sum())) if sel.sum() > 1 else None
        out[f"val_prompts/{name}"] = int(sel.sum())
    return out


# ----------------------------------------------------------------------------------------------
# Demonstrations: what the bias is set on


def demos_source(cfg: RewardConfig, parent_dir: Path) -> dict:
    """{"data", "val", "seed"}: the demonstrations (a SFT-style data spec) the bias is set on. --demos, else the
    parent SFT run's own (its config.json names a file or a built-in set); a pretrained parent has none."""
    if cfg.demos:
        spec = {"data": cfg.demos, "val": "", "seed": cfg.seed, "from": "demos"}
    else:
        path = Path(parent_dir) / "config.json"
        stored = config_lib.read_config(path, f"init_from={cfg.init_from}") if path.exists() else {}
        if stored.get("stage") != "sft":
            raise DataError(f"init_from={cfg.init_from} is a {stored.get('stage', 'pretrain')} run, with no "
                            f"demonstrations of its own to set the reward's bias on; give --demos FILE (a JSONL file "
                            f"of {{\"prompt\", \"response\"}} records)"
                            + (f" or a built-in set ({', '.join(BUILTIN)})" if BUILTIN else ""))
        spec = {"data": stored.get("data", ""), "val": stored.get("val", ""), "seed": stored.get("seed", 0),
                "from": f"the SFT run {parent_dir}"}
    for key in ("data", "val"):
        value = spec[key]
        if value and value not in BUILTIN and not Path(value).is_file():
            whose = "demos" if spec["from"] == "demos" else f"{spec['from']} was trained on {key}"
            raise DataError(f"{whose}={value}: no such file; give the demonstrations with --demos FILE (a JSONL file "
                            f"of {{\"prompt\", \"response\"}} records)")
    return spec


def load_bias_demos(spec: dict, data_cfg, limit: int, seed: int) -> list:
    """The demonstrations `spec` names (train and held-out alike), or a seeded subset of `limit` of them."""
    from gptjax.rlhf.sft import load_demos

    scfg = SFTConfig(init_from="-", data=spec["data"], val=spec["val"], seed=int(spec["seed"]))
    train, val = load_demos(scfg, data_cfg)
    demos = train + val
    if limit and limit < len(demos):
        keep = np.sort(np.random.default_rng([seed, 1]).choice(len(demos), size=limit, replace=False))
        demos = [demos[i] for i in keep]
    return demos


def encode_demos(tok, demos: list, max_len: int) -> tuple[list[np.ndarray], int]:
    """(prompt + response + EOT of each demonstration that fits in max_len, how many did not: those are left out of
    the bias, which is an average over the demonstrations as the reward model reads them, at their EOT)."""
    if not demos:
        return [], 0
    prompts = tok.encode_batch([d.prompt for d in demos])
    responses = tok.encode_batch([d.response for d in demos])
    out, cut = [], 0
    for p, r in zip(prompts, responses):
        s, t = encode_sequence(p, r, True, tok.eot_id, max_len)
        if t:
            cut += 1
        else:
            out.append(s)
    return out, cut


# ----------------------------------------------------------------------------------------------
# The stage


@dataclass
class Prepared:
    """Everything a reward-model run needs, built once (from the parent, or from the run directory on resume)."""

    cfg: RewardConfig
    parent_cfg: TrainConfig
    tok: Any
    train: list[Encoded]
    val: list[Encoded]
    labelers: tuple[str, ...]
    K: int
    max_len: int
    pad_id: int
    steps: int
    per_epoch: int
    child: TrainConfig
    fingerprint: str
    tokenizer: str  # its fingerprint


def child_config(cfg: RewardConfig, parent_cfg: TrainConfig, steps: int, checkpoint_every: int) -> TrainConfig:
    """The parent's TrainConfig with this stage's dropout, optimizer, batch (prompts), steps, mesh and run."""
    model = dataclasses.replace(parent_cfg.model, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                                resid_pdrop=cfg.dropout)
    warmup = cfg.optim.warmup_steps or int(round(cfg.warmup_fraction * steps))
    return config_lib.validate_train(dataclasses.replace(
        parent_cfg, model=model, optim=dataclasses.replace(cfg.optim, warmup_steps=warmup), mesh=cfg.mesh,
        checkpoint=dataclasses.replace(cfg.checkpoint, every=checkpoint_every), log=cfg.log, profile=cfg.profile,
        run_dir=cfg.run_dir, init_from=cfg.init_from, steps=steps, batch_size=cfg.batch_size, micro_batches=1,
        seed=cfg.seed, log_every=cfg.log_every, eval_every=0, eval_batches=0))


def tokenizer_fingerprint(tok) -> str:
    from gptjax.data import fingerprint

    return fingerprint(tok.files)


def k_distribution(records: Sequence[Encoded]) -> dict[str, int]:
    return {str(k): n for k, n in sorted(Counter(r.k for r in records).items())}


def prepare(cfg: RewardConfig, parent_cfg: TrainConfig, tok) -> Prepared:
    """Read, split and encode the rankings; size the run."""
    context = parent_cfg.model.block_size
    max_len = min(cfg.max_len or context, context)
    train_recs, val_recs = load_rankings(cfg)
    train = encode_rankings(tok, train_recs, max_len, context)
    val = encode_rankings(tok, val_recs, max_len, context)
    found = sorted({r.labeler for r in val if r.labeler})
    labelers = labeler_names(cfg) or tuple(found)
    missing = [n for n in labelers if n not in found]
    if missing:
        raise DataError(f"eval_labelers names {', '.join(missing)}, who ranked none of the held-out records "
                        f"(their labelers: {', '.join(found) or 'none named'}); fix eval_labelers or the val file")
    per_epoch = max(1, math.ceil(len(train) / cfg.batch_size))
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * len(train) / cfg.batch_size))
    every = cfg.checkpoint.every or cfg.eval_every or per_epoch
    child = child_config(cfg, parent_cfg, steps, every)
    pad_id = tok.pad_id if tok.pad_id != tok.eot_id else 0  # never the EOT (masks and read positions hide padding)
    K = max(r.k for r in train + val)
    return Prepared(cfg, parent_cfg, tok, train, val, labelers, K, max_len, pad_id, steps, per_epoch, child,
                    rankings_fingerprint(train_recs, val_recs), tokenizer_fingerprint(tok))


def start_params(rs: RewardSteps, parent: lineage_lib.Parent, seed: int, log) -> tuple[Params, str]:
    """The parent's parameters (restored into their shards) and a fresh head; the parent parameters' fingerprint."""
    lm = lineage_lib.restore_params(parent, rs.ts.abstract_state()["params"], log=log)
    fp = lineage_lib.params_fingerprint(lm)
    key = jax.random.fold_in(jax.random.key(seed), 1)
    mcfg = rs.ts.cfg.model
    build = jax.jit(lambda lm: {**lm, "head": init_head(mcfg, key)}, out_shardings=rs.param_shardings)
    return build(lm), fp


# Settings that make a reward-model run what it is: changing one on resume would train a different run.
IDENTITY = ("init_from", "data", "val", "epochs", "steps", "batch_size", "max_len", "dropout", "warmup_fraction",
            "seed")


def check_run_dir(cfg: RewardConfig, run_dir: Path, log) -> bool:
    """Whether `run_dir` holds this reward-model run to resume (loop.check_stage_run_dir: another kind of run, or
    a reward-model run with other settings, is refused before anything is written)."""
    return loop.check_stage_run_dir(cfg, run_dir, stage="reward", record="reward.json", identity=IDENTITY,
                                    what="a reward-model run", into="train into", log=log)


def train_reward(cfg: RewardConfig, *, devices=None, log=print) -> dict:
    """Train (or resume) the reward model `cfg` names, then set its bias; returns the summary (also
    RUN_DIR/summary.json)."""
    main = distributed.is_main()
    if not main:
        log = lambda *a, **k: None  # noqa: E731
    for key in ("data", "val", "demos"):  # a mistyped file is refused before the run directory is made
        value = getattr(cfg, key)
        if value and not (key == "demos" and value in BUILTIN) and not Path(value).is_file():
            what = ("{\"prompt\", \"response\"} demonstrations" + (f", or a built-in set ({', '.join(BUILTIN)})"
                                                                  if BUILTIN else "")) if key == "demos" \
                else "ranking records " + RECORD
            raise DataError(f"{key}={value}: no such file; give a JSONL file of {what}")
    run_dir = Path(cfg.run_dir)
    t_start = time.time()
    tracking.require(cfg.log)
    lock = distributed.process0_first(lambda: loop.RunDirLock(run_dir) if main else None, "lock the run directory")
    try:
        return _train(cfg, run_dir, main, t_start, devices, log)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RewardConfig, run_dir: Path, main: bool, t_start: float, devices, log) -> dict:
    from gptjax.data import install, load_tokenizer

    resuming = check_run_dir(cfg, run_dir, log)
    info_path = run_dir / "reward.json"
    parent = None
    if resuming:  # everything from the run directory itself: the parent may have moved since
        info = config_lib.read_json(info_path, f"run_dir={run_dir}")
        parent_cfg = config_lib.stored_train_config(info["parent_config"])
        tok = load_tokenizer(run_dir)
        if tokenizer_fingerprint(tok) != info["tokenizer"]:
            raise DataError(f"the tokenizer in {run_dir} is not the one the reward model started with (its parent's); "
                            f"copy the parent's tokenizer back, or train into another --run-dir")
        p = prepare(cfg, parent_cfg, tok)
        if p.fingerprint != info["rankings"]:
            raise DataError(f"the rankings in {cfg.data}{' / ' + cfg.val if cfg.val else ''} changed since {run_dir} "
                            f"started (fingerprint {info['rankings']} -> {p.fingerprint}); restore them, or train into "
                            f"another --run-dir")
        run_lineage = lineage_lib.read_lineage(run_dir)
        demos_spec = demos_source(cfg, Path("-")) if cfg.demos else info["demos"]
    else:
        parent = lineage_lib.open_parent(cfg.init_from, log=log)
        parent_cfg = parent.cfg
        demos_spec = demos_source(cfg, parent.run_dir)  # a missing demonstration set is refused before training
        p = prepare(cfg, parent_cfg, parent.tokenizer)
    demos = load_bias_demos(demos_spec, parent_cfg.data, cfg.demos_limit, cfg.seed)
    demo_seqs, demos_cut = encode_demos(p.tok, demos, p.max_len)
    if not demo_seqs:
        raise DataError(f"none of the {len(demos)} demonstrations of {demos_spec['data']} fits in max_len={p.max_len} "
                        f"with its end-of-text; raise max_len or give shorter ones with --demos FILE")
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % shards or cfg.eval_batch_size % shards:
        raise ConfigError(f"batch_size={cfg.batch_size} (prompts) and eval_batch_size={cfg.eval_batch_size} "
                          f"(completions) must be divisible by the {shards} data x fsdp devices; change them or the "
                          f"mesh")
    rs = compile_stage(p.child, mesh)
    first_params = None
    if not resuming:
        first_params, parent_fp = start_params(rs, parent, cfg.seed, log)
        run_lineage = lineage_lib.lineage(parent, parent_fp)
    distributed.barrier("reward run directory read")
    info = {"parent_config": config_lib.to_dict(parent_cfg), "train_config": config_lib.to_dict(p.child),
            "rankings": p.fingerprint, "tokenizer": p.tokenizer, "n_train": len(p.train), "n_val": len(p.val),
            "k_distribution": {"train": k_distribution(p.train), "val": k_distribution(p.val)}, "K": p.K,
            "max_len": p.max_len, "steps": p.steps, "eot_id": p.tok.eot_id, "pad_id": p.pad_id,
            "truncated": {"train": sum(r.truncated for r in p.train), "val": sum(r.truncated for r in p.val)},
            "demos": demos_spec, "labelers": list(p.labelers)}
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_lib.save_json(cfg, run_dir / "config.json", lineage=run_lineage, stage="reward")
        config_lib.write_json(info_path, info)
        if not resuming:
            install(parent.tokenizer, run_dir)
    distributed.barrier("reward run directory written")
    # the checkpoints' config is the reward model's TrainConfig (its transformer; the head is params["head"])
    ckpt_cfg = {**config_lib.to_dict(p.child), "lineage": run_lineage, "stage": "reward"}
    cfg_dict = {**config_lib.to_dict(cfg), "lineage": run_lineage, "stage": "reward"}
    ckpts = Checkpoints(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save, log=log)
    metrics_log = loop.MetricsLog(run_dir / "metrics.jsonl", main, cfg.log, cfg_dict)
    val_seqs = [s for r in p.val for s in r.seqs]
    log(f"reward model on {cfg.data}: {len(p.train)} train / {len(p.val)} held-out rankings (K "
        f"{min(r.k for r in p.train + p.val)}..{p.K}, {sum(r.k for r in p.train)} / {len(val_seqs)} completions"
        + (f", {info['truncated']['train']} / {info['truncated']['val']} cut to max_len={p.max_len}"
           if any(info["truncated"].values()) else "") + f"), {p.steps} steps of {cfg.batch_size} prompts x {p.K} "
        f"completions; the bias from {len(demo_seqs)} demonstrations of {demos_spec['data']}; run dir {run_dir}")

    def rewards_of(params, seqs, desc):
        return score_sequences(rs.score, params, seqs, cfg.eval_batch_size, p.max_len, p.pad_id, rs.row_shardings,
                               desc)

    def evaluate_state(state) -> tuple[dict, str]:
        r = rewards_of(state["params"], val_seqs, "held-out rankings")
        bounds = np.cumsum([0] + [rec.k for rec in p.val])
        m = ranking_metrics([r[a:b] for a, b in zip(bounds, bounds[1:])], p.val, p.labelers)
        se = f" +- {m['val_acc_se']:.3f}" if m["val_acc_se"] is not None else ""
        per = "".join(f", {n} {m[f'val_acc/{n}']:.3f}" for n in p.labelers if m[f"val_acc/{n}"] is not None)
        return m, f"held-out loss {m['val_loss']:.4f}, pairwise accuracy {m['val_acc']:.3f}{se}{per}"

    def on_fresh_start(state):
        ev, line = evaluate_state(state)  # the parent's weights and a fresh head, before any update
        metrics_log.write({"step": 0, **ev})
        log(f"init_from {parent.run_dir} step {parent.step} (parameters {run_lineage[0]['params_fingerprint']}): "
            f"{line} at step 0")

    def batch(step: int):
        idx = batch_indices(cfg.seed, step, cfg.batch_size, len(p.train))
        arrs = fill([p.train[i] for i in idx], p.K, p.max_len, p.pad_id)
        return tuple(distributed.host_to_global(a, sh) for a, sh in zip(arrs, rs.batch_shardings))

    peak = flops_lib.device_peak_flops()
    stage = loop.Stage(steps=p.steps, step_fn=rs.step, batch=batch, all_finite=rs.all_finite,
                       tokens_per_step=cfg.batch_size * p.K * p.max_len, log_every=cfg.log_every,
                       checkpoint_every=p.child.checkpoint.every, eval_every=cfg.eval_every or p.per_epoch,
                       evaluate=evaluate_state, config=ckpt_cfg,
                       mfu=lambda tps: flops_lib.mfu(tps, p.child.model, mesh.devices.size, peak),
                       profile_steps=range(cfg.profile.start_step, cfg.profile.start_step + cfg.profile.steps),
                       profile_dir=run_dir / "profile")
    try:
        result = loop.run(stage, ckpts, metrics_log, fresh_state=lambda: rs.start_from(first_params),
                          abstract_state=rs.abstract_state, on_fresh_start=on_fresh_start, main=main, log=log)
        ev, line = evaluate_state(result.state)
        final_step = int(jax.device_get(result.state["step"]))
        metrics_log.write({"step": final_step, **ev})
        log(f"step {final_step}: {line}")
    finally:
        metrics_log.close()
    ckpts.close()
    # the bias: the demonstrations' mean reward moves to 0
    r_demos = rewards_of(result.state["params"], demo_seqs, "demonstrations")
    shift = float(np.mean(r_demos, dtype=np.float64))
    final = jax.jit(lambda prm: {**prm, "head": {**prm["head"], "b": prm["head"]["b"] - shift}},
                    out_shardings=rs.param_shardings)(result.state["params"])
    bias = {"shift": -shift, "demos_mean_before": shift, "demos_std": float(np.std(r_demos)),
            "b": float(jax.device_get(final["head"]["b"])), "n_demos": len(demo_seqs), "n_demos_too_long": demos_cut,
            "demos": demos_spec, "step": final_step}
    log(f"bias: the {len(demo_seqs)} demonstrations' mean reward was {shift:+.4f} (std {bias['demos_std']:.4f}); "
        f"b is now {bias['b']:+.4f}, so they average 0" + (f" ({demos_cut} longer than max_len={p.max_len} left out)"
                                                            if demos_cut else ""))
    if main:
        shutil.rmtree(run_dir / "final", ignore_errors=True)  # a rerun sets the bias again, maybe on other demos
    distributed.barrier("final reward parameters cleared")
    final_ckpts = Checkpoints(run_dir / "final", keep=1, async_save=False, log=log)
    final_ckpts.save_params(final_step, final, {**ckpt_cfg, "bias": bias})
    final_ckpts.close()
    evals = _eval_history(run_dir / "metrics.jsonl", final_step)
    summary = {"step": final_step, **ev, "val_acc_at_step_0": evals.get(0, {}).get("val_acc"),
               "val_loss_at_step_0": evals.get(0, {}).get("val_loss"), "bias": bias, "n_train": len(p.train),
               "n_val": len(p.val), "k_distribution": info["k_distribution"], "truncated": info["truncated"],
               "max_len": p.max_len, "tokenizer": p.tokenizer, "train_seconds": result.train_seconds,
               "total_seconds": time.time() - t_start,
               "tokens_per_s": float(np.median(result.tokens_per_s)) if result.tokens_per_s else None,
               "lineage": run_lineage}
    if main:
        config_lib.write_json(info_path, {**info, "bias": bias, "final_step": final_step})
        config_lib.write_json(run_dir / "summary.json", summary)
    return summary


def _eval_history(path: Path, final_step: int) -> dict[int, dict]:
    """step -> held-out metrics from metrics.jsonl (the last record per step: a resumed run rewrites later ones)."""
    out: dict[int, dict] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
        if "val_acc" in rec and "loss" not in rec and rec.get("step", -1) <= final_step:
            out[int(rec["step"])] = rec
    return out


# ----------------------------------------------------------------------------------------------
# Loading a trained reward model (PPO, best-of-n)


class Scorer:
    """Rewards of (prompt, completion, ended) triples under a trained reward model, on its mesh.

    `tokenizer_fingerprint` names the tokenizer the model reads: a caller that samples with another model's
    tokenizer (a PPO policy) must compare it with its own (`tokenizer_fingerprint(tok)`) before scoring."""

    def __init__(self, mcfg: ModelConfig, params, tok, max_len: int, pad_id: int, batch_size: int, score: Callable,
                 row_shardings: tuple, tokenizer_fingerprint: str, bias: dict):
        self.mcfg, self.params, self.tok, self.max_len, self.pad_id = mcfg, params, tok, max_len, pad_id
        self.batch_size, self.score, self.row_shardings = batch_size, score, row_shardings
        self.tokenizer_fingerprint, self.bias = tokenizer_fingerprint, bias

    def encode(self, prompts: Sequence[str], completions: Sequence[str], ended: Sequence[bool]) -> list[np.ndarray]:
        if not len(prompts) == len(completions) == len(ended):
            raise DataError(f"{len(prompts)} prompts, {len(completions)} completions and {len(ended)} ended flags: "
                            f"give one of each per completion")
        p_ids = self.tok.encode_batch(list(prompts))
        c_ids = self.tok.encode_batch(list(completions))
        out = []
        for i, (p, c, e) in enumerate(zip(p_ids, c_ids, ended)):
            check_prompt(len(p), self.max_len, self.mcfg.block_size, f"completion {i}")
            out.append(encode_sequence(p, c, bool(e), self.tok.eot_id, self.max_len)[0])
        return out

    def score_tokens(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """Rewards [N] of token sequences (prompt + completion, + EOT where it ended), each read at its last token
        (at most max_len tokens each)."""
        arrs = [np.asarray(s, np.int32) for s in seqs]
        long = [i for i, s in enumerate(arrs) if not 0 < len(s) <= self.max_len]
        if long:
            raise DataError(f"sequence {long[0]} has {len(arrs[long[0]])} tokens; the reward model reads "
                            f"1..{self.max_len}")
        return score_sequences(self.score, self.params, arrs, self.batch_size, self.max_len, self.pad_id,
                               self.row_shardings)

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], ended: Sequence[bool]) -> np.ndarray:
        """Rewards [N] float32: prompt + completion (+ EOT where ended), read at the last token."""
        return self.score_tokens(self.encode(prompts, completions, ended))


def load_reward_model(run_dir: str | Path, *, devices=None, mesh_cfg=None, batch_size: int = 64, log=print
                      ) -> tuple[TrainConfig, Params, Any, Scorer]:
    """A trained reward model: (its TrainConfig, its parameters with the bias set (the head under "head"), its
    tokenizer, a Scorer: score_fn(prompts, completions, ended) -> np.ndarray of rewards).

    Args:
      run_dir: a finished reward-model run directory (rlhf.py reward ...).
      devices, mesh_cfg: where the parameters go (default: every device, the default mesh).
      batch_size: sequences per scoring batch (rounded up to a multiple of the data x fsdp devices).
    """
    from gptjax.config import MeshConfig
    from gptjax.data import load_tokenizer

    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    stored = config_lib.read_config(path, str(run_dir)) if path.exists() else {}
    if stored.get("stage") != "reward" or not (run_dir / "reward.json").exists():
        raise CheckpointError(f"{run_dir} is not a reward-model run (no config.json with stage \"reward\" and "
                              f"reward.json); train one with python rlhf.py reward SFT_RUN --data RANKINGS")
    info = config_lib.read_json(run_dir / "reward.json", str(run_dir))
    final_dir = run_dir / "final"
    if "bias" not in info or not complete_steps(final_dir / "checkpoints"):
        raise CheckpointError(f"the reward model in {run_dir} is not finished (no final/ parameters with the bias "
                              f"set); rerun the command that trained it to finish it")
    tok = load_tokenizer(run_dir)
    fp = tokenizer_fingerprint(tok)
    if fp != info["tokenizer"]:
        raise DataError(f"the tokenizer in {run_dir} is not the one its reward model was trained with (fingerprint "
                        f"{info['tokenizer'][:12]}, found {fp[:12]}); copy the parent run's tokenizer back")
    child = config_lib.stored_train_config(info["train_config"])
    mcfg = child.model
    mesh = sharding.make_mesh(mesh_cfg or MeshConfig(), devices=devices)
    rules = (mesh_cfg or MeshConfig()).rules
    shapes, shardings = param_shardings(mcfg, mesh, rules)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    ckpts = Checkpoints(final_dir, read_only=True, log=log)
    try:
        _, state = ckpts.restore({"params": target}, params_only=True)
    finally:
        ckpts.close()
    params = state["params"]
    score, row_sh = make_score(mcfg, mesh, rules, shardings)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows = max(shards, -(-batch_size // shards) * shards)
    scorer = Scorer(mcfg, params, tok, info["max_len"], info["pad_id"], rows, score, row_sh, fp, info["bias"])
    return child, params, tok, scorer
