"""GPT-1 task fine-tuning as a stage of the training loop: L3 = L2 + λ·L1 on transformed inputs.

A fine-tuning run is an ordinary run directory started from a pretrained run (`init_from`): config.json (the
FinetuneConfig, with the lineage), checkpoints/ (the whole state, for exact resume), best/ (the parameters of
the best validation step by the task's first metric, named in best.json), finetune.json (what evaluating it
needs: the task, its label vocabulary, the special token ids and the sequence lengths), metrics.jsonl and
summary.json.

Deviations from the paper, and why:
- The head reads h_l at the extract token after the final layer norm when the architecture has one (GPT-2/3
  put ln_f before every output layer; GPT-1, post-LN, has none and reads the last block's output as published).
- L1 is the mean next-token loss over the real tokens of every row up to the extract token, start and
  delimiter tokens included (their embeddings are new parameters the LM term also trains); padding never counts.
- Multiple-choice items with fewer choices than the widest item get masked rows (logit −1e9), not dropped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from gptjax import config as config_lib
from gptjax import distributed, sharding
from gptjax.checkpoint import Checkpoints
from gptjax.errors import TaskError
from gptjax.finetune import metrics as metrics_lib
from gptjax.finetune import transform
from gptjax.finetune.config import FinetuneConfig
from gptjax.finetune.task import FinetuneTask
from gptjax.heads import hidden_states, init_task_head, task_head_axes, task_logits
from gptjax.model import Params, abstract_params, dropout, init_params, logical_axes, vocab_mask
from gptjax.optim import make_optimizer, schedule
from gptjax.train import lineage as lineage_lib
from gptjax.train import loop, tracking

# ----------------------------------------------------------------------------------------------
# The pure part: outputs and losses


def task_outputs(mcfg, kind: str, params: Params, tokens_BRT, extract_BR, rows_BR, *, dropout_key=None,
                 clf_pdrop: float = 0.0, offset_NTD=None):
    """(head outputs, final states [B*R, T, D]). Outputs: [B, C] for classification, entailment and similarity
    ([B, 1] for regression), [B, R] choice logits for multiple choice (masked rows at −1e9)."""
    B, R, T = tokens_BRT.shape
    k_model, k_clf = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    h_NTD = hidden_states(mcfg, params, tokens_BRT.reshape(B * R, T), dropout_key=k_model, offset_BTD=offset_NTD)
    idx = extract_BR.reshape(B * R, 1, 1)
    h_BRD = jnp.take_along_axis(h_NTD, idx, axis=1)[:, 0].reshape(B, R, -1)
    if kind == "similarity":  # both orders through the model, their states summed: symmetric in a and b
        z = (h_BRD * rows_BR[..., None].astype(h_BRD.dtype)).sum(axis=1)
    elif kind == "multiple_choice":
        z = h_BRD
    else:
        z = h_BRD[:, 0]
    z = dropout(z, clf_pdrop, k_clf)
    out = task_logits(params["head"], z)
    if kind == "multiple_choice":
        out = out[..., 0] + jnp.where(rows_BR > 0, 0.0, -1e9)
    return out, h_NTD


def lm_loss(mcfg, params: Params, h_NTD, tokens_BRT, extract_BR, rows_BR):
    """L1: mean next-token nats over each real row's tokens up to its extract token."""
    B, R, T = tokens_BRT.shape
    tokens_NT = tokens_BRT.reshape(B * R, T)
    wte = params["wte"]["embedding"]
    logits_NTV = jnp.einsum("NTD,VD->NTV", h_NTD, wte.astype(h_NTD.dtype),
                            preferred_element_type=jnp.float32) + vocab_mask(mcfg)
    logits_NTV, targets_NT = logits_NTV[:, :-1], tokens_NT[:, 1:]
    nats_NT = jax.nn.logsumexp(logits_NTV, -1) - jnp.take_along_axis(logits_NTV, targets_NT[..., None], -1)[..., 0]
    mask_NT = (jnp.arange(T - 1)[None, :] < extract_BR.reshape(B * R, 1)) & (rows_BR.reshape(B * R, 1) > 0)
    mask_NT = mask_NT.astype(jnp.float32)
    return (nats_NT * mask_NT).sum() / jnp.maximum(mask_NT.sum(), 1.0)


def task_loss(kind: str, regression: bool, out, labels_B):
    """L2: cross-entropy over classes or choices, or squared error for a regression head."""
    if regression:
        return jnp.mean((out[:, 0] - labels_B) ** 2)
    logp = jax.nn.log_softmax(out, axis=-1)
    return -jnp.take_along_axis(logp, labels_B[:, None].astype(jnp.int32), axis=-1).mean()


def predictions(regression: bool, out) -> jax.Array:
    return out[:, 0] if regression else jnp.argmax(out, axis=-1)


# ----------------------------------------------------------------------------------------------
# Parameters: the parent's (all, or its embeddings and first k layers), new special-token rows, a new head


def child_model(parent_model, ids: transform.SpecialIds, dropout_rate: float):
    vocab = max(parent_model.vocab_size, ids.extract + 1) if ids.added else parent_model.vocab_size
    m = dataclasses.replace(parent_model, vocab_size=vocab,
                            embd_pdrop=dropout_rate, attn_pdrop=dropout_rate, resid_pdrop=dropout_rate)
    return config_lib.validate_train(dataclasses.replace(config_lib.TrainConfig(), model=m)).model


def param_shardings(mcfg, num_outputs: int, mesh, rules: str):
    shapes = dict(abstract_params(mcfg))
    shapes["head"] = jax.eval_shape(lambda: init_task_head(mcfg, num_outputs, jax.random.key(0)))
    axes = dict(logical_axes(mcfg))
    axes["head"] = task_head_axes()
    return shapes, sharding.tree_shardings(axes, shapes, mesh, rules)


def starting_params(cfg: FinetuneConfig, parent: lineage_lib.Parent, mcfg, task: FinetuneTask, mesh, log
                    ) -> tuple[Params, str]:
    """The parameters a fine-tuning run starts from, placed straight into their shards, and the fingerprint of the
    parent's parameters they came from."""
    rules = cfg.mesh.rules
    shapes, shardings = param_shardings(mcfg, task.num_outputs, mesh, rules)
    key = jax.random.key(cfg.seed)
    k_init, k_head, k_rows = jax.random.split(key, 3)
    L = mcfg.n_layer
    k = L if cfg.transfer_layers < 0 else min(cfg.transfer_layers, L)
    pcfg = parent.cfg.model
    if cfg.init == "random":
        pretrained, fp = None, "not loaded (init=random)"
    else:
        p_shapes = abstract_params(pcfg)
        p_shard = sharding.tree_shardings(logical_axes(pcfg), p_shapes, mesh, rules)
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), p_shapes, p_shard)
        pretrained = lineage_lib.restore_params(parent, target, log=log)
        fp = lineage_lib.params_fingerprint(pretrained)

    def build(pretrained):
        fresh = init_params(mcfg, k_init)
        out = dict(fresh)
        if pretrained is not None:
            wte = pretrained["wte"]["embedding"]
            rows = fresh["wte"]["embedding"].shape[0]
            if wte.shape[0] < rows:  # a bigger padded vocabulary for the new tokens: new rows start fresh
                wte = jnp.concatenate([wte, fresh["wte"]["embedding"][wte.shape[0]:]], axis=0)
            if mcfg.vocab_size > pcfg.vocab_size:  # the special tokens' rows are new parameters
                new = mcfg.init_std * jax.random.normal(k_rows, (mcfg.vocab_size - pcfg.vocab_size, wte.shape[1]))
                wte = wte.at[pcfg.vocab_size:mcfg.vocab_size].set(new.astype(wte.dtype))
            out["wte"] = {"embedding": wte}
            out["wpe"] = pretrained["wpe"]
            keep = (jnp.arange(L) < k)
            out["h"] = jax.tree.map(lambda a, b: jnp.where(keep.reshape((L,) + (1,) * (a.ndim - 1)), a, b),
                                    pretrained["h"], fresh["h"])
            if "ln_f" in fresh and k == L:
                out["ln_f"] = pretrained["ln_f"]
        out["head"] = init_task_head(mcfg, task.num_outputs, k_head)
        return out

    return jax.jit(build, out_shardings=shardings)(pretrained), fp


# ----------------------------------------------------------------------------------------------
# The stage


@dataclasses.dataclass
class Prepared:
    """Everything a fine-tuning run or its evaluation needs, built once."""

    cfg: FinetuneConfig
    parent: lineage_lib.Parent
    task: FinetuneTask
    mcfg: Any
    ids: transform.SpecialIds
    train: transform.Encoded
    val: transform.Encoded
    mesh: Any
    max_len: int


def load_task(cfg: FinetuneConfig, data_cfg, labels: tuple[str, ...] | None = None) -> FinetuneTask:
    from gptjax.finetune import builtin, formats

    if cfg.task in builtin.BUILTIN:
        return builtin.builtin_task(cfg.task, data_cfg, n_train=cfg.n_train, n_val=cfg.n_val, seed=cfg.seed)
    path = Path(cfg.task)
    if not path.exists():
        raise TaskError(f"no task {cfg.task!r}: not a built-in ({', '.join(builtin.BUILTIN)}) and no such file")
    return formats.load_task(path, Path(cfg.val) if cfg.val else None, kind=cfg.kind or None,
                             fields=formats.parse_fields(cfg.fields) if cfg.fields else None, labels=labels)


def prepare(cfg: FinetuneConfig, *, devices=None, labels=None, log=print) -> Prepared:
    parent = lineage_lib.open_parent(cfg.init_from, log=log)
    return prepare_with(cfg, parent, parent.tokenizer, parent.cfg.model, parent.cfg.data, devices=devices,
                        labels=labels)


def prepare_with(cfg: FinetuneConfig, parent, tok, parent_model, data_cfg, *, devices=None, labels=None) -> Prepared:
    """`prepare` from explicit pieces: evaluation takes them from the fine-tuned run itself."""
    task = load_task(cfg, data_cfg, labels)
    ids = transform.special_ids(tok, parent_model.vocab_size)
    mcfg = child_model(parent_model, ids, cfg.dropout)
    max_len = min(cfg.max_len or mcfg.block_size, mcfg.block_size)
    train = transform.encode(task, task.train, tok, ids, max_len, split="train", drop_long=cfg.drop_long)
    val = transform.encode(task, task.val, tok, ids, max_len, split="val", drop_long=cfg.drop_long)
    if train.dropped or val.dropped:  # baselines and metrics then speak of the same items
        task = dataclasses.replace(task, train=train.kept, val=val.kept)
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % shards or cfg.eval_batch_size % shards:
        raise config_lib.ConfigError(f"batch_size={cfg.batch_size} and eval_batch_size={cfg.eval_batch_size} must be "
                                     f"divisible by the {shards} data x fsdp devices; change them or the mesh")
    return Prepared(cfg, parent, task, mcfg, ids, train, val, mesh, max_len)


def total_steps(cfg: FinetuneConfig, n_train: int) -> int:
    return cfg.steps or max(1, math.ceil(cfg.epochs * n_train / cfg.batch_size))


def batch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
    """Example indices of `step`'s batch: epochs walk a fresh permutation each, a pure function of (seed, step)."""
    i = step * batch_size + np.arange(batch_size)
    epochs = i // n
    out = np.empty(batch_size, np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n)
        out[epochs == e] = perm[i[epochs == e] % n]
    return out


@dataclasses.dataclass
class Compiled:
    init_state: Callable  # params -> state
    abstract_state: Callable
    step: Callable
    outputs: Callable  # (params, tokens, extract, rows) -> outputs
    all_finite: Callable
    batch_sharding: Any
    state_shardings: Any


def compile_stage(p: Prepared, steps: int) -> Compiled:
    cfg, mcfg, task, mesh = p.cfg, p.mcfg, p.task, p.mesh
    rules = cfg.mesh.rules
    shapes, param_sh = param_shardings(mcfg, task.num_outputs, mesh, rules)
    warmup = cfg.optim.warmup_steps or int(round(cfg.warmup_fraction * steps))
    optim = dataclasses.replace(cfg.optim, warmup_steps=warmup)
    tx = make_optimizer(optim, steps)
    lr_schedule = schedule(optim, steps)
    replicated = NamedSharding(mesh, P())
    opt_shapes = jax.eval_shape(tx.init, shapes)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_shapes, param_sh, transform_non_params=lambda _: replicated)
    state_sh = {"step": replicated, "params": param_sh, "opt_state": opt_sh}
    batch_sh = sharding.batch_sharding(mesh, rules, ndim=3)
    vec_sh = sharding.batch_sharding(mesh, rules, ndim=2)
    lab_sh = sharding.batch_sharding(mesh, rules, ndim=1)
    base_key = jax.random.key(cfg.seed)

    def init_state(params):
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    init_state = jax.jit(init_state, in_shardings=(param_sh,), out_shardings=state_sh)

    def abstract_state():
        st = jax.eval_shape(lambda: {"step": jnp.zeros((), jnp.int32), "params": shapes, "opt_state": opt_shapes})
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), st, state_sh)

    def loss_fn(params, batch, key):
        tokens, extract, rows, labels = batch
        out, h = task_outputs(mcfg, task.kind, params, tokens, extract, rows, dropout_key=key, clf_pdrop=cfg.clf_pdrop)
        l2 = task_loss(task.kind, task.regression, out, labels)
        l1 = lm_loss(mcfg, params, h, tokens, extract, rows)
        return l2 + cfg.lm_coef * l1, (l2, l1)

    def train_step(state, batch):
        with sharding.use_mesh(mesh, rules):
            key = jax.random.fold_in(base_key, state["step"])
            (loss, (l2, l1)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, key)
            updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
            new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
                   "opt_state": opt_state}
        return new, {"loss": loss, "task_loss": l2, "lm_loss": l1, "grad_norm": optax.tree.norm(grads),
                     "lr": lr_schedule(state["step"])}

    step = jax.jit(train_step, in_shardings=(state_sh, (batch_sh, vec_sh, vec_sh, lab_sh)),
                   out_shardings=(state_sh, replicated), donate_argnums=0)

    def outputs_fn(params, tokens, extract, rows):
        with sharding.use_mesh(mesh, rules):
            return task_outputs(mcfg, task.kind, params, tokens, extract, rows)[0]

    # replicated outputs: every process reads all of them, and all take the same best-checkpoint decision
    outputs = jax.jit(outputs_fn, in_shardings=(param_sh, batch_sh, vec_sh, vec_sh), out_shardings=replicated)
    all_finite = jax.jit(lambda p: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(p)])),
                         out_shardings=replicated)
    return Compiled(init_state, abstract_state, step, outputs, all_finite, (batch_sh, vec_sh, vec_sh, lab_sh), state_sh)


def predict(c: Compiled, params, enc: transform.Encoded, batch_size: int, regression: bool) -> np.ndarray:
    """Predictions (class / choice index, or score) for every example of `enc`, in fixed-size padded batches."""
    out = []
    n = len(enc)
    for s in range(0, n, batch_size):
        idx = np.arange(s, s + batch_size) % n  # the last batch wraps around; its extra rows are dropped
        arrs = [enc.tokens[idx], enc.extract[idx], enc.rows[idx]]
        o = c.outputs(params, *[distributed.host_to_global(a, sh) for a, sh in zip(arrs, c.batch_sharding[:3])])
        out.append(np.asarray(jax.device_get(predictions(regression, o)))[: min(batch_size, n - s)])
    return np.concatenate(out)


def evaluate(p: Prepared, c: Compiled, params) -> dict:
    preds = predict(c, params, p.val, p.cfg.eval_batch_size, p.task.regression)
    return metrics_lib.score(p.task.metrics, preds, p.val.labels, num_classes=len(p.task.labels) or None)


def finetune_info(p: Prepared, parent_model: dict | None = None, data: dict | None = None) -> dict:
    t = p.task
    return {"task": t.name, "kind": t.kind, "labels": list(t.labels), "regression": t.regression,
            "metrics": list(t.metrics), "description": t.description, "special_ids": dataclasses.asdict(p.ids),
            "max_len": p.max_len, "dropped": [p.train.dropped, p.val.dropped], "model": config_lib.to_dict(p.mcfg), "n_train": len(p.train), "n_val": len(p.val),
            "parent_model": parent_model or config_lib.to_dict(p.parent.cfg.model),
            "data": data or config_lib.to_dict(p.parent.cfg.data)}


def finetune(cfg: FinetuneConfig, *, devices=None, log=print) -> dict:
    """Fine-tune (or resume) `cfg`; returns the summary (also written to RUN_DIR/summary.json)."""
    main = distributed.is_main()
    if not main:
        log = lambda *a, **k: None  # noqa: E731
    run_dir = Path(cfg.run_dir)
    t_start = time.time()
    tracking.require(cfg.log)  # a missing tracker package, before anything is prepared
    lock = distributed.process0_first(lambda: loop.RunDirLock(run_dir) if main else None, "lock the run directory")
    try:
        return _finetune(cfg, run_dir, main, t_start, devices, log)
    finally:
        if lock is not None:
            lock.release()


# Settings that make a fine-tuning run what it is: changing one on resume would train a different run.
IDENTITY = ("init_from", "init", "transfer_layers", "task", "val", "kind", "fields", "n_train", "n_val", "max_len",
            "drop_long",
            "seed", "batch_size", "epochs", "steps", "lm_coef")


def check_run_dir(cfg: FinetuneConfig, run_dir: Path, log) -> bool:
    """Whether `run_dir` holds this fine-tuning run to resume (loop.check_stage_run_dir: another kind of run, or
    this task with other settings, is refused before anything is written)."""
    return loop.check_stage_run_dir(cfg, run_dir, stage="finetune", record="finetune.json", identity=IDENTITY,
                                    what="a fine-tuning run", into="fine-tune into", log=log)


def _finetune(cfg, run_dir: Path, main: bool, t_start: float, devices, log) -> dict:
    import shutil

    from gptjax.data import install, load_tokenizer

    # every process reads the same files, before process 0 writes anything (the barrier below)
    resuming = check_run_dir(cfg, run_dir, log)
    info_path, best_path = run_dir / "finetune.json", run_dir / "best.json"
    if resuming:  # everything from the run directory itself: the parent may have moved since
        saved = json.loads(info_path.read_text())
        labels = () if saved["regression"] else (tuple(saved["labels"]) or None)
        parent_model = config_lib.from_dict(config_lib.ModelConfig, saved["parent_model"])
        data_cfg = config_lib.from_dict(config_lib.DataConfig, saved["data"])
        p = prepare_with(cfg, None, load_tokenizer(run_dir), parent_model, data_cfg, devices=devices, labels=labels)
        run_lineage = lineage_lib.read_lineage(run_dir)
        best = json.loads(best_path.read_text()) if best_path.exists() else None
    else:
        p = prepare(cfg, devices=devices, log=log)
        best = None
    steps = total_steps(cfg, len(p.train))
    c = compile_stage(p, steps)
    start_params = None
    if not resuming:
        start_params, parent_fp = starting_params(cfg, p.parent, p.mcfg, p.task, p.mesh, log)
        run_lineage = lineage_lib.lineage(p.parent, parent_fp)
    distributed.barrier("fine-tuning run directory read")
    if main:
        if not resuming:  # a best/ left by an attempt killed before its first checkpoint belongs to nobody
            shutil.rmtree(run_dir / "best", ignore_errors=True)
            best_path.unlink(missing_ok=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        config_lib.save_json(cfg, run_dir / "config.json", lineage=run_lineage, stage="finetune")
        config_lib.write_json(info_path, finetune_info(p, saved["parent_model"] if resuming else None,
                                             saved["data"] if resuming else None))
        if not resuming:
            install(p.parent.tokenizer, run_dir)
    distributed.barrier("fine-tuning run directory written")
    cfg_dict = {**config_lib.to_dict(cfg), "lineage": run_lineage, "stage": "finetune"}
    ckpts = Checkpoints(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save, log=log)
    best_ckpts = Checkpoints(run_dir / "best", keep=1, async_save=False, log=log)
    resume_step = ckpts.latest_step()
    if best is not None and (resume_step is None or best["step"] > resume_step):
        best = None  # chosen in a part of the run that the resume replays: it is chosen again
    key_metric = p.task.metrics[0]
    baseline = metrics_lib.baseline(p.task)
    per_epoch = max(1, math.ceil(len(p.train) / cfg.batch_size))
    metrics_log = loop.MetricsLog(run_dir / "metrics.jsonl", main, cfg.log, cfg_dict)
    T = p.train.tokens.shape[-1]
    R = p.train.tokens.shape[1]
    log(f"fine-tuning {p.task.name} ({p.task.kind}{', regression' if p.task.regression else ''}): "
        f"{len(p.train)} train / {len(p.val)} val items"
        + (f" ({p.train.dropped} / {p.val.dropped} too long for max_len={p.max_len} left out)"
           if p.train.dropped or p.val.dropped else "") + f", {R} row(s) of {T} tokens each, {steps} steps, "
        f"λ={cfg.lm_coef}, init {cfg.init}" + (f", {cfg.transfer_layers} layers transferred"
                                              if cfg.transfer_layers >= 0 else "") + f"; run dir {run_dir}")

    def evaluate_state(state) -> tuple[dict, str]:
        nonlocal best
        m = evaluate(p, c, state["params"])
        step = int(jax.device_get(state["step"]))
        if best is None or m[key_metric] > best["value"]:  # the same decision on every process: replicated metrics
            best = {"step": step, "metric": key_metric, "value": m[key_metric]}
            if step not in best_ckpts.all_steps():
                best_ckpts.save_params(step, state["params"], cfg_dict)
            if main:
                config_lib.write_json(best_path, best)
        return ({f"val_{k}": v for k, v in m.items()},
                ", ".join(f"val {k} {m[k]:.4f}" for k in p.task.metrics) + f" (best {best['value']:.4f} @ {best['step']})")

    def batch(step: int):
        idx = batch_indices(cfg.seed, step, cfg.batch_size, len(p.train))
        arrs = (p.train.tokens[idx], p.train.extract[idx], p.train.rows[idx], p.train.labels[idx])
        return tuple(distributed.host_to_global(a, sh) for a, sh in zip(arrs, c.batch_sharding))

    stage = loop.Stage(steps=steps, step_fn=c.step, batch=batch, all_finite=c.all_finite,
                       tokens_per_step=cfg.batch_size * R * T, log_every=cfg.log_every,
                       checkpoint_every=cfg.checkpoint.every or cfg.eval_every or per_epoch,
                       eval_every=cfg.eval_every or per_epoch,
                       evaluate=evaluate_state, config=cfg_dict,
                       profile_steps=range(cfg.profile.start_step, cfg.profile.start_step + cfg.profile.steps),
                       profile_dir=run_dir / "profile")
    try:
        result = loop.run(stage, ckpts, metrics_log, fresh_state=lambda: c.init_state(start_params),
                          abstract_state=c.abstract_state, main=main, log=log)
        ev, line = evaluate_state(result.state)
        final_step = int(jax.device_get(result.state["step"]))
        metrics_log.write({"step": final_step, **ev})
        log(f"step {final_step}: {line}")
        log(f"baseline ({baseline['name']}): " + ", ".join(f"{k} {baseline[k]:.4f}" for k in p.task.metrics))
    finally:
        metrics_log.close()
        best_ckpts.wait()
    summary = {"step": final_step, "task": p.task.name, **ev, "best": best, "baseline": baseline,
               "train_seconds": result.train_seconds, "total_seconds": time.time() - t_start,
               "tokens_per_s": float(np.median(result.tokens_per_s)) if result.tokens_per_s else None,
               "lineage": run_lineage}
    if main:
        config_lib.write_json(run_dir / "summary.json", summary)
    ckpts.close()
    best_ckpts.close()
    return summary
