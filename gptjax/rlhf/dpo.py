"""Direct preference optimisation (Rafailov et al. 2023) on the reward model's K-way rankings, beside PPO:
`python rlhf.py dpo SFT_RUN --data RANKINGS [--reward RM_RUN]`.

DPO trains the policy on the rankings directly, with no reward model and no sampling: its implicit reward is
r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)), log-probabilities summed over the completion's tokens (its
end-of-text included where it ended), pi_ref the SFT policy, frozen. The loss is the reward model's ranking loss
(losses.ranking_loss) of that implicit reward (losses.dpo_loss): per prompt, the mean of -log sigmoid(r_w - r_l)
over its ranked pairs, ties dropped, then the mean over prompts; with K = 2 it is the paper's loss. As for the reward
model, all C(K,2) pairs of a prompt are one batch element and each completion goes through the policy (and the
reference) once. The rankings, their split, their encoding (prompt + completion, + EOT where it ended, cut to
max_len) and the batches (a pure function of (seed, step)) are the reward stage's (reward.prepare), so DPO and the
reward model learn from exactly the same comparisons.

Evaluation, at step 0 (the SFT policy: every implicit reward is 0), every eval_every steps (default: each epoch)
and at the end:
  val_loss, val_acc  DPO's held-out loss and the implicit reward's pairwise accuracy on the held-out rankings (with
                     its standard error over prompts, and per labeler as val_acc/NAME), as the reward model reports
  with reward=RM_RUN the policy is also sampled on the code task's held-out prompts and judged exactly as PPO's
                     evaluations judge it (ppo_stage.PolicyEval: true score, reward-model score, KL to SFT per
                     sequence, the held-out labelers' win rate against SFT, each feature), so `rlhf.py report --ppo
                     DPO=RUN_DIR` puts DPO on PPO's axes (true score against sqrt(KL)).
The reward model is never trained on or differentiated through: it only scores evaluation samples.

The run directory: config.json (stage "dpo", the lineage naming the SFT run), dpo.json (the parent, the rankings'
and tokenizer's fingerprints, the reference parameters' fingerprint), checkpoints/ (the policy's training state),
metrics.jsonl, summary.json (with the evaluation history as PPO's has it) and policy/ (the final policy as an
ordinary language-model run that eval.py, sample.py and rlhf.py rank read). Rerunning the same command resumes
exactly; the reference is the SFT run's parameters, re-read from the parent on resume and checked against the
fingerprint recorded at the start.

Deviations from Rafailov et al., and why:
- K-way rankings rather than pairs: every ranked pair of a prompt counts, averaged per prompt (the reward model's
  normalisation), so a prompt with many completions does not outweigh the others.
- K-way rankings are turned into all their pairs, each a Bradley-Terry comparison (the reward model's loss), not
  into the Plackett-Luce likelihood the paper gives for rankings.
- The completions are the SFT policy's own samples, ranked by code_task's labelers: preference data drawn from
  pi_ref itself, as the paper recommends where it can be had, not a human preference set.
- One epoch with a cosine schedule and 2% warmup, AdamW with clipping, as every stage here; the paper uses RMSprop
  at 1e-6 with 150 warmup steps for models of 1B+ parameters. Small models and tens of steps want a larger rate.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax import config as config_lib
from gptjax import distributed, sharding
from gptjax import flops as flops_lib
from gptjax.checkpoint import Checkpoints
from gptjax.config import TrainConfig
from gptjax.errors import CheckpointError, ConfigError, DataError
from gptjax.rlhf import ppo, reward
from gptjax.rlhf.config import DPOConfig
from gptjax.rlhf.losses import dpo_loss
from gptjax.train import lineage as lineage_lib
from gptjax.train import loop, tracking
from gptjax.train.steps import TrainSteps, make_train_steps

# Settings that make a DPO run what it is: changing one on resume would train a different run.
IDENTITY = ("init_from", "data", "val", "beta", "epochs", "steps", "batch_size", "max_len", "dropout",
            "warmup_fraction", "seed")


def completion_mask(row: np.ndarray, n_prompt: int, length: int) -> None:
    """Set `row` [T] to 1 at a sequence's completion tokens: after its n_prompt prompt tokens, up to its last token
    (the EOT included where it ended); 0 at the prompt and past the end."""
    row[:] = 0.0
    row[n_prompt:length] = 1.0


def response_masks(records: Sequence[reward.Encoded | None], K: int, T: int) -> np.ndarray:
    """[P, K, T] float32: completion_mask of each sequence; 0 in every padding slot."""
    out = np.zeros((len(records), K, T), np.float32)
    for p, rec in enumerate(records):
        if rec is None:
            continue
        for k, s in enumerate(rec.seqs):
            completion_mask(out[p, k], rec.n_prompt, len(s))
    return out


def sequence_logps(mcfg, params, tokens_NT: jax.Array, resp_NT: jax.Array, dropout_key=None) -> jax.Array:
    """[N] float32: log pi(completion | prompt), the sum of the completion tokens' log-probabilities."""
    return (ppo.token_logps(mcfg, params, tokens_NT, 1.0, dropout_key=dropout_key) * resp_NT).sum(axis=1)


@dataclass
class DPOSteps:
    ts: TrainSteps  # pretraining's optimizer, schedule and state shardings for the policy
    batch_shardings: tuple  # (tokens [P, K, T], response [P, K, T], ranks [P, K], valid [P, K])
    row_shardings: tuple  # (tokens [N, T], response [N, T])
    step: Callable  # (state, ref, batch) -> (state, metrics), state donated
    logps: Callable  # (params, tokens [N, T], response [N, T]) -> [N], replicated


def compile_stage(child: TrainConfig, mesh, beta: float) -> DPOSteps:
    ts = make_train_steps(child, mesh)
    mcfg, rules, tx = child.model, child.mesh.rules, ts.tx
    replicated = NamedSharding(mesh, P())
    p_sh = ts.state_shardings["params"]
    tok_sh = sharding.batch_sharding(mesh, rules, ndim=3)
    vec_sh = sharding.batch_sharding(mesh, rules, ndim=2)
    base_key = jax.random.key(child.seed)
    dropout_on = max(mcfg.embd_pdrop, mcfg.attn_pdrop, mcfg.resid_pdrop) > 0.0

    def train_step(state, ref, batch):
        tokens_PKT, resp_PKT, ranks_PK, valid_PK = batch
        Pn, K, T = tokens_PKT.shape
        flat, mask = tokens_PKT.reshape(Pn * K, T), resp_PKT.reshape(Pn * K, T)
        with sharding.use_mesh(mesh, rules):
            key = jax.random.fold_in(base_key, state["step"]) if dropout_on else None
            ref_PK = jax.lax.stop_gradient(sequence_logps(mcfg, ref, flat, mask)).reshape(Pn, K)
            params = state["params"]

            def loss_fn(p):
                lp_PK = sequence_logps(mcfg, p, flat, mask, key).reshape(Pn, K)
                return dpo_loss(lp_PK, ref_PK, ranks_PK, valid_PK, beta)

            (loss, r_PK), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt_state": opt_state}
        acc_P, has_P = reward.pairwise_accuracy(r_PK, ranks_PK, valid_PK)
        has = has_P.astype(jnp.float32)
        n = jnp.maximum(valid_PK.sum(), 1.0)
        return new, {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": ts.lr_schedule(state["step"]),
                     "acc": (acc_P * has).sum() / jnp.maximum(has.sum(), 1.0),
                     "implicit_reward_mean": (r_PK * valid_PK).sum() / n}

    step = jax.jit(train_step, in_shardings=(ts.state_shardings, p_sh, (tok_sh, tok_sh, vec_sh, vec_sh)),
                   out_shardings=(ts.state_shardings, replicated), donate_argnums=0)
    row_sh = sharding.batch_sharding(mesh, rules, ndim=2)

    def logps_fn(params, tokens_NT, resp_NT):
        with sharding.use_mesh(mesh, rules):
            return sequence_logps(mcfg, params, tokens_NT, resp_NT)

    logps = jax.jit(logps_fn, in_shardings=(p_sh, row_sh, row_sh), out_shardings=replicated)
    return DPOSteps(ts, (tok_sh, tok_sh, vec_sh, vec_sh), (row_sh, row_sh), step, logps)


def record_logps(ds: DPOSteps, params, records: Sequence[reward.Encoded], rows: int, T: int, pad_id: int
                 ) -> list[np.ndarray]:
    """log pi(completion | prompt) of every completion of every record, `rows` sequences a call."""
    from tqdm.auto import tqdm

    from gptjax.rlhf.ppo_stage import _bucket

    seqs = [(s, rec.n_prompt) for rec in records for s in rec.seqs]
    out = []
    for a in tqdm(range(0, len(seqs), rows), desc="held-out log-probabilities", unit="batch", leave=False,
                  disable=jax.process_index() != 0):
        chunk = seqs[a:a + rows]
        L = _bucket(max(len(s) for s, _ in chunk), T)
        tokens = np.full((rows, L), pad_id, np.int32)
        resp = np.zeros((rows, L), np.float32)
        for i, (s, n_prompt) in enumerate(chunk):
            tokens[i, :len(s)] = s
            completion_mask(resp[i], n_prompt, len(s))
        lp = ds.logps(params, *(distributed.host_to_global(x, sh) for x, sh in zip((tokens, resp), ds.row_shardings)))
        out.append(np.asarray(jax.device_get(lp), np.float64)[:len(chunk)])
    flat = np.concatenate(out) if out else np.zeros((0,))
    bounds = np.cumsum([0] + [rec.k for rec in records])
    return [flat[a:b] for a, b in zip(bounds, bounds[1:])]


def check_run_dir(cfg: DPOConfig, run_dir: Path, log) -> bool:
    return loop.check_stage_run_dir(cfg, run_dir, stage="dpo", record="dpo.json", identity=IDENTITY,
                                    what="a DPO run", into="train DPO into", log=log)


def train_dpo(cfg: DPOConfig, *, devices=None, log=print) -> dict:
    """Train (or resume) the DPO run `cfg` names; returns the summary (also RUN_DIR/summary.json)."""
    main = distributed.is_main()
    if not main:
        log = lambda *a, **k: None  # noqa: E731
    for key in ("data", "val"):  # a mistyped file is refused before the run directory is made
        value = getattr(cfg, key)
        if value and not Path(value).is_file():
            raise DataError(f"{key}={value}: no such file; give a JSONL file of ranking records {reward.RECORD}")
    run_dir = Path(cfg.run_dir)
    t_start = time.time()
    tracking.require(cfg.log)
    lock = distributed.process0_first(lambda: loop.RunDirLock(run_dir) if main else None, "lock the run directory")
    try:
        return _train(cfg, run_dir, main, t_start, devices, log)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: DPOConfig, run_dir: Path, main: bool, t_start: float, devices, log) -> dict:
    from gptjax.data import install, load_tokenizer
    from gptjax.rlhf import ppo_stage

    resuming = check_run_dir(cfg, run_dir, log)
    info_path = run_dir / "dpo.json"
    if resuming:  # the SFT parent as the run recorded it
        info = config_lib.read_json(info_path, f"run_dir={run_dir}")
        parent_cfg = config_lib.stored_train_config(info["parent_config"])
        tok = load_tokenizer(run_dir)
        parent = lineage_lib.Parent(Path(info["parent"]["run_dir"]), info["parent"]["step"], parent_cfg, [], tok)
        if reward.tokenizer_fingerprint(tok) != info["tokenizer"]:
            raise DataError(f"the tokenizer in {run_dir} is not the one the DPO run started with (its parent's); "
                            f"copy the parent's tokenizer back, or train into another --run-dir")
        run_lineage = lineage_lib.read_lineage(run_dir)
    else:
        parent = lineage_lib.open_parent(cfg.init_from, log=log)
        parent_cfg, tok = parent.cfg, parent.tokenizer
    p = reward.prepare(cfg, parent_cfg, tok)
    if resuming and p.fingerprint != info["rankings"]:
        raise DataError(f"the rankings in {cfg.data}{' / ' + cfg.val if cfg.val else ''} changed since {run_dir} "
                        f"started (fingerprint {info['rankings']} -> {p.fingerprint}); restore them, or train into "
                        f"another --run-dir")
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % shards or cfg.eval_batch_size % shards:
        raise ConfigError(f"batch_size={cfg.batch_size} (prompts) and eval_batch_size={cfg.eval_batch_size} "
                          f"(completions) must be divisible by the {shards} data x fsdp devices; change them or the "
                          f"mesh")
    ds = compile_stage(p.child, mesh, cfg.beta)
    param_target = ds.ts.abstract_state()["params"]
    try:
        ref = lineage_lib.restore_params(parent, param_target, log=log)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (the DPO run's reference is its SFT parent {parent.run_dir}: restore it there "
                              f"to resume)") from None
    ref_fp = lineage_lib.params_fingerprint(ref)
    if resuming and ref_fp != info["reference_params"]:
        raise CheckpointError(f"the SFT run {parent.run_dir} holds other parameters than the DPO run {run_dir} "
                              f"started from (fingerprint {info['reference_params']} -> {ref_fp}); restore it, or "
                              f"train DPO into another --run-dir")
    if not resuming:
        run_lineage = lineage_lib.lineage(parent, ref_fp)

    # the policy evaluation on PPO's axes (only with a reward model to report the proxy score)
    pe = None
    if cfg.reward:
        _, _, _, scorer = ppo_stage._open_reward(cfg, cfg.mesh, devices, log)
        if reward.tokenizer_fingerprint(tok) != scorer.tokenizer_fingerprint:
            raise DataError(f"the reward model {cfg.reward} reads another tokenizer than the policy {cfg.init_from}; "
                            f"give a reward model trained from this SFT run, or no --reward")
        mcfg = ppo_stage.no_dropout(parent_cfg.model)
        room = min(mcfg.block_size, scorer.max_len)
        if cfg.max_new_tokens + 2 > room:
            raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the policy's "
                              f"context and the reward model's max_len ({room}); lower it")
        val_p = ppo_stage.fitting_prompts(tok, parent_cfg.data, "val", room, cfg.max_new_tokens)
        if not val_p.examples:
            raise DataError(f"no held-out prompt of the code task fits (of {val_p.skipped}); lower max_new_tokens")
        sample_rows = max(shards, -(-cfg.sample_batch // shards) * shards)
        kl = ppo_stage.make_kl(mcfg, mesh, cfg.mesh.rules, ds.ts.state_shardings["params"], cfg.temperature)
        pe = ppo_stage.PolicyEval(mcfg, tok, scorer, val_p, ref, kl, eval_samples=cfg.eval_samples,
                                  max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                                  sample_rows=sample_rows, pad_id=p.pad_id)
    distributed.barrier("DPO run directory read")
    info = {"parent_config": config_lib.to_dict(parent_cfg), "train_config": config_lib.to_dict(p.child),
            "parent": {"run_dir": str(parent.run_dir.absolute()), "step": parent.step}, "rankings": p.fingerprint,
            "tokenizer": p.tokenizer, "reference_params": ref_fp, "n_train": len(p.train), "n_val": len(p.val),
            "k_distribution": {"train": reward.k_distribution(p.train), "val": reward.k_distribution(p.val)},
            "K": p.K, "max_len": p.max_len, "steps": p.steps, "eot_id": tok.eot_id, "pad_id": p.pad_id,
            "truncated": {"train": sum(r.truncated for r in p.train), "val": sum(r.truncated for r in p.val)},
            "labelers": list(p.labelers), "n_eval_prompts": len(pe.val.examples) if pe else 0}
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_lib.save_json(cfg, run_dir / "config.json", lineage=run_lineage, stage="dpo")
        config_lib.write_json(info_path, info)
        if not resuming:
            install(tok, run_dir)
    distributed.barrier("DPO run directory written")
    ckpt_cfg = {**config_lib.to_dict(p.child), "lineage": run_lineage, "stage": "dpo"}
    cfg_dict = {**config_lib.to_dict(cfg), "lineage": run_lineage, "stage": "dpo"}
    ckpts = Checkpoints(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save, log=log)
    metrics_log = loop.MetricsLog(run_dir / "metrics.jsonl", main, cfg.log, cfg_dict)
    log(f"DPO (beta {cfg.beta}) from {parent.run_dir} on {cfg.data}: {len(p.train)} train / {len(p.val)} held-out "
        f"rankings (K {min(r.k for r in p.train + p.val)}..{p.K}), {p.steps} steps of {cfg.batch_size} prompts x "
        f"{p.K} completions" + (f"; the policy evaluated on {len(pe.val.examples)} held-out prompts of the code task "
                                f"against the reward model {cfg.reward}" if pe else "") + f"; run dir {run_dir}")
    ref_val = record_logps(ds, ref, p.val, cfg.eval_batch_size, p.max_len, p.pad_id)

    def evaluate_state(state) -> tuple[dict, str]:
        params = state["params"]
        lp = record_logps(ds, params, p.val, cfg.eval_batch_size, p.max_len, p.pad_id)
        r = [cfg.beta * (a - b) for a, b in zip(lp, ref_val)]
        m = reward.ranking_metrics(r, p.val, p.labelers)
        se = f" +- {m['val_acc_se']:.3f}" if m["val_acc_se"] is not None else ""
        line = f"held-out DPO loss {m['val_loss']:.4f}, pairwise accuracy {m['val_acc']:.3f}{se}"
        if pe is not None:
            pm, pline = pe.evaluate(params)
            m, line = {**m, **pm}, f"{line}; {pline}"
        return m, line

    def on_fresh_start(state):
        ev, line = evaluate_state(state)  # the SFT policy itself: every implicit reward is 0
        metrics_log.write({"step": 0, **ev})
        log(f"init_from {parent.run_dir} step {parent.step} (parameters {ref_fp}): {line} at step 0")

    def batch(step: int):
        idx = reward.batch_indices(cfg.seed, step, cfg.batch_size, len(p.train))
        recs = [p.train[i] for i in idx]
        tokens, _, ranks, valid = reward.fill(recs, p.K, p.max_len, p.pad_id)
        # padding past the batch's longest sequence changes nothing (causal attention, masked log-probs): cut it
        L = ppo_stage._bucket(max(len(s) for r in recs for s in r.seqs), p.max_len)
        arrs = (tokens[:, :, :L], response_masks(recs, p.K, p.max_len)[:, :, :L], ranks, valid)
        return tuple(distributed.host_to_global(a, sh) for a, sh in zip(arrs, ds.batch_shardings))

    peak = flops_lib.device_peak_flops()
    stage = loop.Stage(steps=p.steps, step_fn=lambda state, b: ds.step(state, ref, b), batch=batch,
                       all_finite=ds.ts.all_finite, tokens_per_step=cfg.batch_size * p.K * p.max_len,
                       log_every=cfg.log_every, checkpoint_every=p.child.checkpoint.every,
                       eval_every=cfg.eval_every or p.per_epoch, evaluate=evaluate_state, config=ckpt_cfg,
                       mfu=lambda tps: flops_lib.mfu(tps, p.child.model, mesh.devices.size, peak),
                       profile_steps=range(cfg.profile.start_step, cfg.profile.start_step + cfg.profile.steps),
                       profile_dir=run_dir / "profile")
    try:
        result = loop.run(stage, ckpts, metrics_log, fresh_state=lambda: ds.ts.start_from(jax.tree.map(jnp.copy, ref)),
                          abstract_state=ds.ts.abstract_state, on_fresh_start=on_fresh_start, main=main, log=log)
        ev, line = evaluate_state(result.state)
        final_step = int(jax.device_get(result.state["step"]))
        metrics_log.write({"step": final_step, **ev})
        log(f"step {final_step}: {line}")
    finally:
        metrics_log.close()
    ckpts.close()
    policy_dir = ppo_stage.save_policy(run_dir, result.state["params"], final_step, parent_cfg,
                                       ppo_stage.no_dropout(parent_cfg.model), cfg.init_from, run_lineage, "dpo",
                                       tok, main, log)
    evals = reward._eval_history(run_dir / "metrics.jsonl", final_step)
    summary = {"step": final_step, **ev, "at_step_0": evals.get(0, {}),
               "history": [evals[s] for s in sorted(evals)], "beta": cfg.beta, "n_train": len(p.train),
               "n_val": len(p.val), "n_val_prompts": info["n_eval_prompts"], "eval_samples": cfg.eval_samples,
               "k_distribution": info["k_distribution"], "truncated": info["truncated"], "max_len": p.max_len,
               "train_seconds": result.train_seconds, "total_seconds": time.time() - t_start,
               "tokens_per_s": float(np.median(result.tokens_per_s)) if result.tokens_per_s else None,
               "policy_dir": str(policy_dir), "lineage": run_lineage}
    if main:
        config_lib.write_json(info_path, {**info, "final_step": final_step})
        config_lib.write_json(run_dir / "summary.json", summary)
    return summary

