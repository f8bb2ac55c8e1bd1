"""InstructGPT's first stage, supervised fine-tuning (Ouyang et al. 2022, section 3.5): the pretrained model is
trained on demonstrations, next-token loss on the response tokens only, as a stage of the one training loop.

An example is prompt tokens + response tokens + end-of-text. Its loss weights (over target positions: weight t
belongs to the prediction of token t+1) are 1 where the target is a response token or the EOT and 0 where it
is a prompt token or padding, so the loss is the mean negative log-likelihood per response token of the batch
(losses.masked_lm_loss). Examples are packed: each epoch walks the training examples in a fresh seeded order and
puts them, greedily and in that order, into rows of max_len + 1 tokens, starting a new row when the next example
does not fit; a row never splits an example, so every example appears exactly once per epoch. A batch is
`batch_size` consecutive rows of that endless stream of epochs: a pure function of (seed, step), so a resumed run
replays the uninterrupted one. Held-out demonstrations are scored one per row, unpacked, at step 0 (the parent's
weights, before any update), every eval_every steps (default: each epoch) and at the end.

The run directory is an ordinary one: config.json (the SFTConfig, with stage "sft" and the lineage naming the
parent run, its step and a fingerprint of its parameters), checkpoints/ (whose stored config is the child's
TrainConfig, so eval.py and sample.py read an SFT run as the language model it is), the tokenizer copied from the
parent, sft.json (what a resume needs without the parent: its TrainConfig, and a fingerprint of the
demonstrations, which must not change under a run), metrics.jsonl and summary.json.

Deviations from the paper, and why:
- Packing. Packed examples can attend to the earlier examples in the same row, as pretraining's documents do:
  the model has no segment (document) mask, and adding one would change the attention kernels every stage
  shares. Each example's loss is still on its own response only, and the EOT between examples marks the boundary
  the model learnt in pretraining. The paper does not say how it batched. pack=false gives one example per row.
- Examples longer than max_len + 1 tokens lose the end of their response (counted and reported; such an example
  has no EOT, as its response does not end there); one whose prompt alone does not fit is refused. The paper's
  prompts and demonstrations fit its 2048-token context.
- Held-out loss is the model selection signal reported here; the paper picked its final SFT model by reward-model
  score, which needs the reward stage. The final step is the result (the paper notes validation loss overfits
  after one epoch while reward-model score keeps improving: compare the metrics.jsonl evaluations).
- A short warmup (SFTConfig.warmup_fraction) and a learning rate for small models; see rlhf/config.py.
- Residual dropout is resid_pdrop (0.2, as in the paper); embedding and attention dropout stay the parent's.
- The loss is the mean over the batch's response tokens, so long responses weigh more than short ones (the paper
  does not say; per-token is what a packed batch gives naturally and what pretraining does).
- Prompt and response are tokenized separately and concatenated (a BPE merge across the boundary is never made),
  so the response's tokens are the same whatever the prompt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax import config as config_lib
from gptjax import distributed, sharding
from gptjax import flops as flops_lib
from gptjax.checkpoint import Checkpoints
from gptjax.config import TrainConfig
from gptjax.errors import ConfigError, DataError
from gptjax.model import Params, hidden
from gptjax.rlhf.config import BUILTIN, SFTConfig
from gptjax.rlhf.losses import masked_lm_loss
from gptjax.train import lineage as lineage_lib
from gptjax.train import loop, tracking
from gptjax.train.steps import TrainSteps, check_batch_fits_mesh, make_train_steps, output_nats

VAL_FRACTION = 0.05  # of the records held out (by a hash of the prompt) when no val file is given

# ----------------------------------------------------------------------------------------------
# Demonstrations: records, encoding, packing (pure numpy)


@dataclass(frozen=True)
class Demo:
    prompt: str
    response: str
    where: str  # "FILE line N" or "SET item N": named in every message about this record


@dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32: prompt + response (+ EOT unless truncated)
    n_prompt: int
    truncated: bool

    def __len__(self) -> int:
        return len(self.tokens)


def read_demos(path: str | Path) -> list[Demo]:
    """Every record of a JSONL file of {"prompt": str, "response": str}; a bad record is one DataError naming it."""
    from gptjax.data import iter_jsonl

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no demonstration file {path}: give a JSONL file of {{\"prompt\", \"response\"}} records"
                        + (f" or a built-in set ({', '.join(BUILTIN)})" if BUILTIN else ""))
    out = []
    for line, rec in iter_jsonl(path, error=DataError):
        where = f"{path} line {line}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: a record must be a JSON object {{\"prompt\": ..., \"response\": ...}}, got "
                            f"{type(rec).__name__}")
        for key in ("prompt", "response"):
            if not isinstance(rec.get(key), str):
                got = "missing" if key not in rec else f"a {type(rec[key]).__name__}"
                raise DataError(f"{where}: the record needs a string \"{key}\" ({got}; its keys: "
                                f"{', '.join(map(str, rec)) or 'none'}); every line is {{\"prompt\": ..., "
                                f"\"response\": ...}}")
        out.append(Demo(rec["prompt"], rec["response"], where))
    if not out:
        raise DataError(f"{path} holds no records; each line should be a JSON object {{\"prompt\": ..., "
                        f"\"response\": ...}}")
    return out


def split_demos(demos: list[Demo], fraction: float = VAL_FRACTION) -> tuple[list[Demo], list[Demo]]:
    """(train, held-out), in file order, by a hash of the prompt: stable across runs and machines, and the same
    prompt never lands on both sides. With nothing held out by hash, the last record is (as the corpus split does)."""
    from gptjax.data import is_validation

    val = [d for d in demos if is_validation(d.prompt, fraction)]
    train = [d for d in demos if not is_validation(d.prompt, fraction)]
    if not val:
        val, train = train[-1:], train[:-1]
    return train, val


def load_demos(cfg: SFTConfig, data_cfg) -> tuple[list[Demo], list[Demo]]:
    """The training and held-out demonstrations `cfg` names (a built-in set, or a file with a val file or not)."""
    if cfg.data in BUILTIN:
        train, val = BUILTIN[cfg.data](data_cfg, cfg.seed)
        train, val = ([Demo(r["prompt"], r["response"], f"{cfg.data} {split} item {i}") for i, r in enumerate(recs)]
                      for split, recs in (("train", train), ("val", val)))
        if cfg.val:
            val = read_demos(cfg.val)
    elif cfg.val:
        train, val = read_demos(cfg.data), read_demos(cfg.val)
    else:
        train, val = split_demos(read_demos(cfg.data))
    if not train:
        raise DataError(f"{cfg.data} has {len(val)} record(s), all held out: too few to train on; add records or give "
                        f"a separate --val FILE")
    return train, val


def demos_fingerprint(train: list[Demo], val: list[Demo]) -> str:
    """A hash of the demonstrations' text, split included: a resumed run must see the same ones."""
    h = hashlib.sha256()
    for split, demos in (("train", train), ("val", val)):
        for d in demos:
            h.update(json.dumps([split, d.prompt, d.response]).encode() + b"\n")
    return h.hexdigest()[:16]


def encode_demo(tok, demo: Demo, max_len: int, context: int, prompt: list[int] | None = None,
                response: list[int] | None = None) -> Example:
    """prompt + response + EOT, in at most max_len + 1 tokens (a row: max_len inputs and their max_len targets).
    A response that does not fit loses its end (and the EOT); a prompt that does not fit is refused. `prompt` and
    `response`: their tokens, if already encoded."""
    prompt = tok.encode(demo.prompt) if prompt is None else list(prompt)
    response = tok.encode(demo.response) if response is None else list(response)
    if not prompt:
        raise DataError(f"{demo.where}: the prompt is empty; every demonstration needs a prompt for its response to "
                        f"follow")
    if len(prompt) > max_len:  # not even one response token could be a target
        fix = f"raise max_len (up to the model's context, {context})" if max_len < context else "drop the record"
        raise DataError(f"{demo.where}: the prompt is {len(prompt)} tokens, more than max_len={max_len} leaves for it; "
                        f"shorten the prompt or {fix}")
    full = prompt + response + [tok.eot_id]
    room = max_len + 1
    return Example(np.asarray(full[:room], np.int32), len(prompt), len(full) > room)


def encode_demos(tok, demos: list[Demo], max_len: int, context: int) -> list[Example]:
    if not demos:
        return []
    prompts = tok.encode_batch([d.prompt for d in demos])
    responses = tok.encode_batch([d.response for d in demos])
    return [encode_demo(tok, d, max_len, context, p, r) for d, p, r in zip(demos, prompts, responses)]


def fitting(tok, demos: list[Demo], max_len: int) -> list[Demo]:
    """The demonstrations whose prompt + response + EOT fit in a row of max_len + 1 tokens whole."""
    if not demos:
        return []
    prompts = tok.encode_batch([d.prompt for d in demos])
    responses = tok.encode_batch([d.response for d in demos])
    return [d for d, p, r in zip(demos, prompts, responses) if len(p) + len(r) + 1 <= max_len + 1]


def pack(lengths: np.ndarray, order: np.ndarray, row_len: int, packed: bool = True) -> list[list[int]]:
    """Example indices per row: greedily in `order`, a new row whenever the next example does not fit in what the
    current one has left (packed=False: one example per row). Every index once; no row over row_len tokens."""
    rows: list[list[int]] = []
    used = row_len  # forces a first row
    for i in order:
        n = int(lengths[i])
        if not packed or used + n > row_len:
            rows.append([])
            used = 0
        rows[-1].append(int(i))
        used += n
    return rows


def fill_rows(rows: list[list[int]], examples: list[Example], row_len: int, pad_id: int
              ) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [R, row_len] int32, weights [R, row_len - 1] float32) for rows of example indices. Weight t is the
    prediction of token t+1: 1 on each example's response tokens and EOT, 0 on prompts and padding."""
    tokens = np.full((len(rows), row_len), pad_id, np.int32)
    weights = np.zeros((len(rows), row_len - 1), np.float32)
    for r, row in enumerate(rows):
        o = 0
        for i in row:
            e = examples[i]
            n = len(e)
            tokens[r, o:o + n] = e.tokens
            weights[r, o + e.n_prompt - 1:o + n - 1] = 1.0
            o += n
    return tokens, weights


class RowStream:
    """The training rows of every epoch, one after another: epoch e packs the examples in the order of a
    permutation seeded by (seed, e). Step s's batch is rows [s * B, (s + 1) * B): a pure function of (seed, s)."""

    def __init__(self, examples: list[Example], row_len: int, seed: int, packed: bool, pad_id: int):
        self.examples, self.row_len, self.seed, self.packed, self.pad_id = examples, row_len, seed, packed, pad_id
        self.lengths = np.asarray([len(e) for e in examples])
        self._epochs: list[list[list[int]]] = []
        self._starts = [0]  # the stream index of each epoch's first row

    def epoch(self, e: int) -> list[list[int]]:
        while len(self._epochs) <= e:
            k = len(self._epochs)
            order = np.random.default_rng([self.seed, k]).permutation(len(self.examples))
            self._epochs.append(pack(self.lengths, order, self.row_len, self.packed))
            self._starts.append(self._starts[-1] + len(self._epochs[-1]))
        return self._epochs[e]

    def rows(self, start: int, count: int) -> list[list[int]]:
        out, e = [], 0
        while len(out) < count:
            rows = self.epoch(e)
            lo = max(start + len(out) - self._starts[e], 0)
            if lo < len(rows):
                out += rows[lo:lo + count - len(out)]
            e += 1
        return out

    def total_rows(self, epochs: float) -> int:
        """Rows in `epochs` epochs (a fraction of the last one rounds to whole rows)."""
        full = int(epochs)
        n = sum(len(self.epoch(e)) for e in range(full))
        return n + int(round((epochs - full) * len(self.epoch(full)))) if epochs > full else n

    def batch(self, step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        return fill_rows(self.rows(step * batch_size, batch_size), self.examples, self.row_len, self.pad_id)


def eval_batches(examples: list[Example], row_len: int, batch_size: int, pad_id: int):
    """Every held-out example alone in its row, in order; the last batch is filled with rows that weigh nothing."""
    for s in range(0, len(examples), batch_size):
        rows = [[i] for i in range(s, min(s + batch_size, len(examples)))]
        tokens, weights = fill_rows(rows, examples, row_len, pad_id)
        extra = batch_size - len(rows)
        yield (np.concatenate([tokens, np.full((extra, row_len), pad_id, np.int32)]),
               np.concatenate([weights, np.zeros((extra, row_len - 1), np.float32)]))


# ----------------------------------------------------------------------------------------------
# The pure part: the loss and the step


def sft_loss(mcfg, params: Params, inputs_BT: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array,
             dropout_key=None) -> jax.Array:
    """Mean next-token nats over the weighted (response) targets: pretraining's per-token loss, masked."""
    x_BTD = hidden(mcfg, params, inputs_BT, dropout_key=dropout_key)
    return masked_lm_loss(output_nats(mcfg, params, x_BTD, targets_BT), weights_BT)


def make_step(ts: TrainSteps) -> Callable:
    """(state, (tokens [B, T+1], weights [B, T])) -> (state, metrics), jitted once with the state donated. The
    optimizer (AdamW, global-norm clipping, the schedule), shardings and state layout are pretraining's (ts)."""
    mcfg, mesh, rules = ts.cfg.model, ts.mesh, ts.cfg.mesh.rules
    base_key = jax.random.key(ts.cfg.seed)
    dropout_on = max(mcfg.embd_pdrop, mcfg.attn_pdrop, mcfg.resid_pdrop) > 0.0

    def train_step(state, batch):
        tokens_BT1, weights_BT = batch
        with sharding.use_mesh(mesh, rules):
            key = jax.random.fold_in(base_key, state["step"]) if dropout_on else None
            params = state["params"]
            loss, grads = jax.value_and_grad(
                lambda p: sft_loss(mcfg, p, tokens_BT1[:, :-1], tokens_BT1[:, 1:], weights_BT, key))(params)
            updates, opt_state = ts.tx.update(grads, state["opt_state"], params)
            new = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt_state": opt_state}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": ts.lr_schedule(state["step"]),
                     "response_tokens": weights_BT.sum()}

    bs = ts.eval_batch_sharding
    return jax.jit(train_step, in_shardings=(ts.state_shardings, (bs, bs)),
                   out_shardings=(ts.state_shardings, NamedSharding(mesh, P())), donate_argnums=0)


# ----------------------------------------------------------------------------------------------
# The stage


@dataclass
class Prepared:
    """Everything an SFT run needs, built once (from the parent, or from the run directory on resume)."""

    cfg: SFTConfig
    parent_cfg: TrainConfig
    tok: Any
    train: list[Example]
    val: list[Example]
    stream: RowStream
    max_len: int
    steps: int
    per_epoch: int  # steps in the first epoch
    child: TrainConfig  # the model being trained, as a TrainConfig: what the checkpoints record
    fingerprint: str


def child_config(cfg: SFTConfig, parent_cfg: TrainConfig, steps: int, checkpoint_every: int) -> TrainConfig:
    """The parent's TrainConfig with this stage's model dropout, optimizer, batch, steps, mesh and run."""
    model = dataclasses.replace(parent_cfg.model, resid_pdrop=cfg.resid_pdrop)
    warmup = cfg.optim.warmup_steps or int(round(cfg.warmup_fraction * steps))
    return config_lib.validate_train(dataclasses.replace(
        parent_cfg, model=model, optim=dataclasses.replace(cfg.optim, warmup_steps=warmup), mesh=cfg.mesh,
        checkpoint=dataclasses.replace(cfg.checkpoint, every=checkpoint_every), log=cfg.log, profile=cfg.profile,
        run_dir=cfg.run_dir, init_from=cfg.init_from, steps=steps, batch_size=cfg.batch_size, micro_batches=1,
        seed=cfg.seed, log_every=cfg.log_every, eval_every=0, eval_batches=0))


def prepare(cfg: SFTConfig, parent_cfg: TrainConfig, tok) -> Prepared:
    """Read, split, encode and pack the demonstrations; size the run."""
    context = parent_cfg.model.block_size
    max_len = min(cfg.max_len or context, context)
    train_demos, val_demos = load_demos(cfg, parent_cfg.data)
    if cfg.data in BUILTIN:  # a built-in set is cut from a corpus for any context: keep what fits whole
        train_demos, val_demos = (fitting(tok, d, max_len) for d in (train_demos, val_demos))
        if not train_demos or not val_demos:
            raise DataError(f"no demonstration of the built-in set '{cfg.data}' fits max_len={max_len} tokens with its "
                            f"end ({len(train_demos)} training, {len(val_demos)} held out); raise max_len or use a "
                            f"model with a longer context")
    train = encode_demos(tok, train_demos, max_len, context)
    val = encode_demos(tok, val_demos, max_len, context)
    pad_id = tok.pad_id if tok.pad_id != tok.eot_id else 0  # never the EOT (weights hide padding anyway)
    stream = RowStream(train, max_len + 1, cfg.seed, cfg.pack, pad_id)
    per_epoch = max(1, math.ceil(len(stream.epoch(0)) / cfg.batch_size))
    steps = cfg.steps or max(1, math.ceil(stream.total_rows(cfg.epochs) / cfg.batch_size))
    every = cfg.checkpoint.every or cfg.eval_every or per_epoch
    child = child_config(cfg, parent_cfg, steps, every)
    return Prepared(cfg, parent_cfg, tok, train, val, stream, max_len, steps, per_epoch, child,
                    demos_fingerprint(train_demos, val_demos))


# Settings that make an SFT run what it is: changing one on resume would train a different run.
IDENTITY = ("init_from", "data", "val", "epochs", "steps", "batch_size", "max_len", "pack", "resid_pdrop",
            "warmup_fraction", "seed")


def check_run_dir(cfg: SFTConfig, run_dir: Path, log) -> bool:
    """Whether `run_dir` holds this SFT run to resume (loop.check_stage_run_dir: another kind of run, or an SFT
    run with other settings, is refused before anything is written)."""
    return loop.check_stage_run_dir(cfg, run_dir, stage="sft", record="sft.json", identity=IDENTITY,
                                    what="an SFT run", into="fine-tune into", log=log)


def sft(cfg: SFTConfig, *, devices=None, log=print) -> dict:
    """Fine-tune (or resume) `cfg` on its demonstrations; returns the summary (also RUN_DIR/summary.json)."""
    main = distributed.is_main()
    if not main:
        log = lambda *a, **k: None  # noqa: E731
    for key in ("data", "val"):  # a mistyped file is refused before the run directory is made
        value = getattr(cfg, key)
        if value and value not in BUILTIN and not Path(value).is_file():
            builtin = f" or a built-in set ({', '.join(BUILTIN)})" if BUILTIN and key == "data" else ""
            raise DataError(f"{key}={value}: no such file; give a JSONL file of {{\"prompt\", \"response\"}} "
                            f"records{builtin}")
    run_dir = Path(cfg.run_dir)
    t_start = time.time()
    tracking.require(cfg.log)
    lock = distributed.process0_first(lambda: loop.RunDirLock(run_dir) if main else None, "lock the run directory")
    try:
        return _sft(cfg, run_dir, main, t_start, devices, log)
    finally:
        if lock is not None:
            lock.release()


def _evaluate(p: Prepared, ts: TrainSteps, params) -> dict:
    from gptjax.eval.scoring import mean_nats

    bs = p.cfg.eval_batch_size
    return mean_nats(ts.eval_step, params, eval_batches(p.val, p.max_len + 1, bs, p.stream.pad_id),
                     ts.eval_batch_sharding, total=math.ceil(len(p.val) / bs), desc="held-out demonstrations")


def _sft(cfg: SFTConfig, run_dir: Path, main: bool, t_start: float, devices, log) -> dict:
    from gptjax.data import install, load_tokenizer

    resuming = check_run_dir(cfg, run_dir, log)
    info_path = run_dir / "sft.json"
    parent = None
    if resuming:  # everything from the run directory itself: the parent may have moved since
        info = config_lib.read_json(info_path, f"run_dir={run_dir}")
        parent_cfg = config_lib.stored_train_config(info["parent_config"])
        p = prepare(cfg, parent_cfg, load_tokenizer(run_dir))
        if p.fingerprint != info["demonstrations"]:
            raise DataError(f"the demonstrations in {cfg.data}{' / ' + cfg.val if cfg.val else ''} changed since "
                            f"{run_dir} started (fingerprint {info['demonstrations']} -> {p.fingerprint}); restore "
                            f"them, or fine-tune into another --run-dir")
        run_lineage = lineage_lib.read_lineage(run_dir)
    else:
        parent = lineage_lib.open_parent(cfg.init_from, log=log)
        parent_cfg = parent.cfg
        p = prepare(cfg, parent_cfg, parent.tokenizer)
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    check_batch_fits_mesh(p.child, mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.eval_batch_size % shards:
        raise ConfigError(f"eval_batch_size={cfg.eval_batch_size} must be divisible by the {shards} data x fsdp "
                          f"devices; change it or the mesh")
    ts = make_train_steps(p.child, mesh)
    step_fn = make_step(ts)
    start_params = None
    if not resuming:
        start_params = lineage_lib.restore_params(parent, ts.abstract_state()["params"], log=log)
        run_lineage = lineage_lib.lineage(parent, lineage_lib.params_fingerprint(start_params))
    distributed.barrier("SFT run directory read")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_lib.save_json(cfg, run_dir / "config.json", lineage=run_lineage, stage="sft")
        config_lib.write_json(info_path, {
            "parent_config": config_lib.to_dict(parent_cfg), "train_config": config_lib.to_dict(p.child),
            "demonstrations": p.fingerprint, "n_train": len(p.train), "n_val": len(p.val), "max_len": p.max_len,
            "rows_per_epoch": len(p.stream.epoch(0)), "steps": p.steps, "eot_id": p.tok.eot_id,
            "pad_id": p.stream.pad_id})
        if not resuming:
            install(parent.tokenizer, run_dir)
    distributed.barrier("SFT run directory written")
    # the checkpoints' config is the model's TrainConfig: eval.py and sample.py read an SFT run like any other
    ckpt_cfg = {**config_lib.to_dict(p.child), "lineage": run_lineage, "stage": "sft"}
    cfg_dict = {**config_lib.to_dict(cfg), "lineage": run_lineage, "stage": "sft"}
    ckpts = Checkpoints(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save, log=log)
    metrics_log = loop.MetricsLog(run_dir / "metrics.jsonl", main, cfg.log, cfg_dict)
    trunc = (sum(e.truncated for e in p.train), sum(e.truncated for e in p.val))
    rows0 = len(p.stream.epoch(0))
    used = float(p.stream.lengths.sum()) / (rows0 * (p.max_len + 1))
    log(f"SFT on {cfg.data}: {len(p.train)} train / {len(p.val)} held-out demonstrations"
        + (f" ({trunc[0]} / {trunc[1]} cut to max_len={p.max_len})" if any(trunc) else "")
        + f", {rows0} rows of {p.max_len + 1} tokens per epoch ({len(p.train) / rows0:.2f} examples a row, "
        f"{used:.0%} of positions used), {p.steps} steps of {cfg.batch_size} rows; run dir {run_dir}")

    def evaluate_state(state) -> tuple[dict, str]:
        ev = _evaluate(p, ts, state["params"])
        return ({"val_loss": ev["loss"], "val_perplexity": ev["perplexity"]},
                f"held-out response loss {ev['loss']:.4f} nats/token, perplexity {ev['perplexity']:.2f}")

    def on_fresh_start(state):
        ev, line = evaluate_state(state)  # the parent's weights, before any update
        metrics_log.write({"step": 0, **ev})
        log(f"init_from {parent.run_dir} step {parent.step} (parameters {run_lineage[0]['params_fingerprint']}): "
            f"{line} at step 0")

    def batch(step: int):
        tokens, weights = p.stream.batch(step, cfg.batch_size)
        return (distributed.host_to_global(tokens, ts.eval_batch_sharding),
                distributed.host_to_global(weights, ts.eval_batch_sharding))

    peak = flops_lib.device_peak_flops()
    stage = loop.Stage(steps=p.steps, step_fn=step_fn, batch=batch, all_finite=ts.all_finite,
                       tokens_per_step=cfg.batch_size * p.max_len, log_every=cfg.log_every,
                       checkpoint_every=p.child.checkpoint.every, eval_every=cfg.eval_every or p.per_epoch,
                       evaluate=evaluate_state, config=ckpt_cfg,
                       mfu=lambda tps: flops_lib.mfu(tps, p.child.model, mesh.devices.size, peak),
                       profile_steps=range(cfg.profile.start_step, cfg.profile.start_step + cfg.profile.steps),
                       profile_dir=run_dir / "profile")
    try:
        result = loop.run(stage, ckpts, metrics_log, fresh_state=lambda: ts.start_from(start_params),
                          abstract_state=ts.abstract_state, on_fresh_start=on_fresh_start, main=main, log=log)
        ev, line = evaluate_state(result.state)
        final_step = int(jax.device_get(result.state["step"]))
        metrics_log.write({"step": final_step, **ev})
        log(f"step {final_step}: {line}")
    finally:
        metrics_log.close()
    evals = _eval_history(run_dir / "metrics.jsonl", final_step)
    best = min(evals, key=lambda s: evals[s]) if evals else final_step
    summary = {"step": final_step, **ev, "val_loss_at_step_0": evals.get(0),
               "best": {"step": best, "val_loss": evals.get(best, ev["val_loss"])},
               "n_train": len(p.train), "n_val": len(p.val), "truncated": {"train": trunc[0], "val": trunc[1]},
               "rows_per_epoch": rows0, "max_len": p.max_len,
               "train_seconds": result.train_seconds, "total_seconds": time.time() - t_start,
               "tokens_per_s": float(np.median(result.tokens_per_s)) if result.tokens_per_s else None,
               "lineage": run_lineage}
    if main:
        config_lib.write_json(run_dir / "summary.json", summary)
    ckpts.close()
    return summary


def _eval_history(path: Path, final_step: int) -> dict[int, float]:
    """step -> held-out loss from metrics.jsonl (the last record per step: a resumed run rewrites later ones)."""
    out: dict[int, float] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
        if "val_loss" in rec and "loss" not in rec and rec.get("step", -1) <= final_step:
            out[int(rec["step"])] = rec["val_loss"]
    return out
