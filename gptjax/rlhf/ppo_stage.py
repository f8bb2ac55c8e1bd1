"""InstructGPT's PPO stage: `python rlhf.py ppo SFT_RUN --reward RM_RUN` (Ouyang et al. 2022, section 3.5).

A run directory like every other stage's, driven by the shared loop (gptjax/train/loop.py): one loop step is one
PPO iteration (rollouts of `prompts` training prompts from the policy's current parameters, scored by the frozen
reward model, then `ppo_epochs` epochs of minibatch updates of policy and value: ppo.py's pure core). The loop owns
checkpoints, SIGTERM, the non-finite guard and exact resume; an iteration's prompts and sampling seed are a pure
function of (seed, iteration), so a killed run resumed from its checkpoint replays the uninterrupted one.

Models, all on one mesh, sharded by the pretraining rules (no weight copies between sampler and trainer):
  policy     starts as the SFT run's parameters (init_from), dropout off (its log-probs are the sampler's)
  reference  the SFT run's parameters, frozen: the KL penalty's pi_SFT
  reward     the reward-model run's final parameters (bias set), frozen: the score at a completion's end
  value      starts as the reward model (transformer + scalar head), read at every position

Rollouts. The code task's training prompts (code_task.prompts("train") of the SFT run's corpus) that leave room for
max_new_tokens in the policy's context and the reward model's max_len; each iteration draws `prompts` of them (an
epoch-wise permutation of (seed, iteration), reward.batch_indices). A completion ends the way the rank stage ended
the completions the reward model was trained on: at the token that starts a line in column 0 (the function closed:
rank.STOP) or at end-of-text; the reward model and the labelers read it as the rank stage wrote it
(rank.cut_completion: the function part, with EOT appended when it ended), so the reward model scores exactly the
kind of text it learnt to rank.

Evaluation (at step 0, every eval_every iterations, at the end) on every held-out prompt (code_task's "val" split:
files neither pretraining nor any stage trained on), eval_samples completions each, sampled with one fixed seed at
every evaluation (common random numbers: iteration-to-iteration differences are the policy's, not the draw's):
  true_score       code_task.true_score (the noise-free mean of all six labelers), with its standard error over
                   prompts, and each feature (parse rate, defined names, ...) as feat/NAME
  rm_score         the reward model's score (the proxy PPO maximises), bias-adjusted
  kl               sum over the response of log pi - log pi_SFT (the sampled estimate of KL per sequence)
  win_rate         how often the held-out labelers (code_task.HELDOUT_LABELERS, noise included) prefer the policy's
                   completion of a prompt to the SFT policy's completion of it with the same draw (a tie counts
                   1/2), with its standard error over prompts; at step 0 the two are the same text: exactly 0.5
Each evaluation is a metrics.jsonl record (no "loss" key); summary.json has the first and the last, and the
history. The final policy is also written as an ordinary language-model run in RUN_DIR/policy (params only, its
config and tokenizer), which eval.py, sample.py, rlhf.py rank and init_from read.

See ppo.py's docstring for every deviation from the paper in the algorithm itself.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gptjax import config as config_lib
from gptjax import distributed, sharding
from gptjax.checkpoint import Checkpoints
from gptjax.config import ModelConfig
from gptjax.errors import CheckpointError, ConfigError, DataError
from gptjax.model import abstract_params, logical_axes
from gptjax.rlhf import code_task, ppo
from gptjax.rlhf.config import PPOConfig
from gptjax.rlhf.rank import STOP, cut_completion
from gptjax.train import lineage as lineage_lib
from gptjax.train import loop, tracking

Params = Any
EVAL_ITERATION = 2**32 - 1  # every evaluation samples with rollout_seed(seed, this): no training iteration's
_PTX_DOMAIN = 0x707478  # keeps the pretraining batches' seeds apart from every other use of cfg.seed

# Settings that make a PPO run what it is: changing one on resume would train a different run (iterations may grow).
IDENTITY = ("init_from", "reward", "prompts", "k", "max_new_tokens", "temperature", "beta", "gamma", "lam", "clip",
            "vf_clip", "vf_coef", "ppo_epochs", "minibatch", "lr", "value_lr", "ptx_coef", "ptx_batch",
            "no_end_penalty", "seed")


def no_dropout(mcfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(mcfg, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)


def check_run_dir(cfg: PPOConfig, run_dir: Path, log) -> bool:
    """Whether `run_dir` holds this PPO run to resume (loop.check_stage_run_dir)."""
    return loop.check_stage_run_dir(cfg, run_dir, stage="ppo", record="ppo.json", identity=IDENTITY,
                                    what="a PPO run", into="train PPO into", log=log)


@dataclass
class Prompts:
    """The code task's prompts of one split that fit, with their token ids."""

    examples: list
    ids: list[list[int]]
    skipped: int  # prompts too long to leave max_new_tokens of room


def fitting_prompts(tok, data_cfg, split: str, room: int, max_new_tokens: int) -> Prompts:
    examples = code_task.prompts(split, data_cfg=data_cfg)
    ids = [list(x) or [tok.eot_id] for x in tok.encode_batch([e.prompt for e in examples])] if examples else []
    keep = [i for i, x in enumerate(ids) if len(x) + max_new_tokens + 1 <= room]
    return Prompts([examples[i] for i in keep], [ids[i] for i in keep], len(examples) - len(keep))


def _se(x: np.ndarray) -> float | None:
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else None


class Models:
    """The four models' compiled functions and the state's shardings on one mesh."""

    def __init__(self, cfg: PPOConfig, mcfg_p: ModelConfig, mcfg_v: ModelConfig, mesh, rules: str):
        from gptjax.rlhf.reward import head_axes, init_head

        self.mcfg_p, self.mcfg_v, self.mesh, self.rules = mcfg_p, mcfg_v, mesh, rules
        self.hp = ppo.hyper(cfg)
        self.opt_p = ppo.make_optimizer(cfg.lr)
        self.opt_v = ppo.make_optimizer(cfg.value_lr or cfg.lr)
        replicated = NamedSharding(mesh, P())
        p_shapes = abstract_params(mcfg_p)
        v_shapes = {**abstract_params(mcfg_v), "head": jax.eval_shape(lambda: init_head(mcfg_v, jax.random.key(0)))}
        self.p_sh = sharding.tree_shardings(logical_axes(mcfg_p), p_shapes, mesh, rules)
        self.v_sh = sharding.tree_shardings({**logical_axes(mcfg_v), "head": head_axes()}, v_shapes, mesh, rules)

        def opt_sh(tx, shapes, sh):
            return optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, shapes), sh,
                                         transform_non_params=lambda _: replicated)

        self.state_sh = {"step": replicated, "params": {"policy": self.p_sh, "value": self.v_sh},
                         "opt_state": {"policy": opt_sh(self.opt_p, p_shapes, self.p_sh),
                                       "value": opt_sh(self.opt_v, v_shapes, self.v_sh)}}
        self.shapes = {"policy": p_shapes, "value": v_shapes}
        self.tok_sh = sharding.batch_sharding(mesh, rules, ndim=2)
        self.vec_sh = sharding.batch_sharding(mesh, rules, ndim=1)
        self.ptx_sh = NamedSharding(mesh, P(None, *sharding.batch_sharding(mesh, rules, ndim=2).spec))
        self.replicated = replicated
        def start_from(p, v):  # copies: the state is donated each iteration, the reference and reward model stay
            p, v = jax.tree.map(jnp.copy, p), jax.tree.map(jnp.copy, v)
            return {"step": jnp.zeros((), jnp.int32), "params": {"policy": p, "value": v},
                    "opt_state": {"policy": self.opt_p.init(p), "value": self.opt_v.init(v)}}

        self.start_from = jax.jit(start_from, in_shardings=(self.p_sh, self.v_sh), out_shardings=self.state_sh)
        epochs, mb = cfg.ppo_epochs, cfg.minibatch
        hp, opt_p, opt_v = self.hp, self.opt_p, self.opt_v

        def iterate(state, ref, tokens, response, score, ended, key, ptx):
            with sharding.use_mesh(mesh, rules):
                p, v = state["params"]["policy"], state["params"]["value"]
                batch, m0 = ppo.prepare_batch(mcfg_p, mcfg_v, hp, p, ref, v, tokens, response, score, ended)
                p, v, sp, sv, m1 = ppo.ppo_update(mcfg_p, hp, opt_p, opt_v, p, v, state["opt_state"]["policy"],
                                                  state["opt_state"]["value"], batch, key, epochs, mb,
                                                  None if ptx is None else {"tokens": ptx}, mcfg_value=mcfg_v)
            new = {"step": state["step"] + 1, "params": {"policy": p, "value": v},
                   "opt_state": {"policy": sp, "value": sv}}
            return new, {**m0, **m1}

        in_sh = (self.state_sh, self.p_sh, self.tok_sh, self.tok_sh, self.vec_sh, self.vec_sh, replicated)
        self.iterate = jax.jit(lambda s, r, t, m, sc, e, k: iterate(s, r, t, m, sc, e, k, None),
                               in_shardings=in_sh, out_shardings=(self.state_sh, replicated), donate_argnums=0)
        self.iterate_ptx = jax.jit(iterate, in_shardings=in_sh + (self.ptx_sh,),
                                   out_shardings=(self.state_sh, replicated), donate_argnums=0)

        self.kl = make_kl(mcfg_p, mesh, rules, self.p_sh, hp.temperature)
        self.all_finite = jax.jit(lambda params: jnp.all(jnp.stack(
            [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])))

    def abstract_state(self):
        shapes = jax.eval_shape(self.start_from, self.shapes["policy"], self.shapes["value"])
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_sh)

    def abstract_policy(self):
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            self.shapes["policy"], self.p_sh)


def train_ppo(cfg: PPOConfig, *, devices=None, log=print) -> dict:
    """Train (or resume) the PPO run `cfg` names; returns the summary (also RUN_DIR/summary.json)."""
    main = distributed.is_main()
    if not main:
        log = lambda *a, **k: None  # noqa: E731
    run_dir = Path(cfg.run_dir)
    t_start = time.time()
    tracking.require(cfg.log)
    lock = distributed.process0_first(lambda: loop.RunDirLock(run_dir) if main else None, "lock the run directory")
    try:
        return _train(cfg, run_dir, main, t_start, devices, log)
    finally:
        if lock is not None:
            lock.release()


def _open_reward(cfg: PPOConfig, mesh_cfg, devices, log):
    from gptjax.rlhf.reward import load_reward_model

    run, step = config_lib.split_init_from(cfg.reward)
    if step is not None:
        raise ConfigError(f"reward={cfg.reward}: a reward model is used as its run finished it (its final/ "
                          f"parameters, with the bias set); give the run directory without @STEP")
    return load_reward_model(run, devices=devices, mesh_cfg=mesh_cfg, log=log)


def make_kl(mcfg: ModelConfig, mesh, rules: str, p_sh, temperature: float):
    """jit (params, ref, tokens [N, T], response [N, T]) -> [N] sum over the response of log pi - log pi_ref at the
    sampling temperature, replicated."""
    def logps(params, ref, tokens, response):
        with sharding.use_mesh(mesh, rules):
            lp = ppo.token_logps(mcfg, params, tokens, temperature)
            lr = ppo.token_logps(mcfg, ref, tokens, temperature)
        return ppo.kl_per_sequence(lp, lr, response)

    tok_sh = sharding.batch_sharding(mesh, rules, ndim=2)
    return jax.jit(logps, in_shardings=(p_sh, p_sh, tok_sh, tok_sh), out_shardings=NamedSharding(mesh, P()))


class PolicyEval:
    """Sampling and judging a policy on the code task, and its held-out evaluation against the SFT reference.

    sample(params, ids, iteration) draws completions (ppo.rollout: a pure function of (seed, iteration));
    judged(examples, rollout) gives (texts, ended, reward-model scores, true scores) as the rank stage wrote
    completions; evaluate(params) is the evaluation the module docstring describes (true score, reward-model score,
    KL to the reference, the held-out labelers' win rate against the reference's completions, the features), on
    every prompt of `val` with `eval_samples` completions each, sampled with one fixed seed every time. PPO and DPO
    evaluate their policies with it, so the two land on the same axes."""

    def __init__(self, mcfg: ModelConfig, tok, scorer, val: Prompts, ref, kl, *, eval_samples: int,
                 max_new_tokens: int, temperature: float, seed: int, sample_rows: int, pad_id: int):
        self.mcfg, self.tok, self.scorer, self.val, self.ref, self.kl = mcfg, tok, scorer, val, ref, kl
        self.eval_samples, self.max_new_tokens, self.temperature = eval_samples, max_new_tokens, temperature
        self.seed, self.sample_rows, self.pad = seed, sample_rows, pad_id
        self.T = mcfg.block_size
        self.sft = self.rollout(ref)  # the SFT policy's held-out completions: what win rates compare against

    def sample(self, params, ids, iteration):
        return ppo.rollout(self.mcfg, params, ids, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                           seed=self.seed, iteration=iteration, eot_id=self.tok.eot_id, pad_id=self.pad, T=self.T,
                           batch_size=self.sample_rows, stop=STOP, decode=self.tok.decode)

    def judged(self, examples, ro):
        """(texts, ended, reward-model scores, true scores) of a rollout, as the rank stage wrote completions."""
        tok = self.tok
        comps = [cut_completion(tok.decode(n), bool(e) and not c) for n, e, c in
                 zip(ro["new"], ro["ended"], ro["closed"])]
        texts, ended = [t for t, _ in comps], [bool(e) for _, e in comps]
        rm = np.asarray(self.scorer([ex.prompt for ex in examples], texts, ended), np.float32)
        true = np.array([code_task.true_score(ex, t, e) for ex, t, e in zip(examples, texts, ended)])
        return texts, ended, rm, true

    def rollout(self, params):
        S = self.eval_samples
        ids = [x for x in self.val.ids for _ in range(S)]
        exs = [e for e in self.val.examples for _ in range(S)]
        ro = self.sample(params, ids, EVAL_ITERATION)
        texts, ended, rm, true = self.judged(exs, ro)
        L = _bucket(max(len(x) for x in ro["seqs"]), self.T)
        rows = len(ids)
        kl = np.asarray(jax.device_get(self.kl(params, self.ref, *(_pad_rows(ro[k][:, :L], rows, self.sample_rows,
                                                                             self.pad)
                                                                   for k in ("tokens", "response")))))[:rows]
        return exs, texts, ended, rm, true, kl

    def evaluate(self, params) -> tuple[dict, str]:
        exs, texts, ended, rm, true, kl = self.rollout(params)
        sft = self.sft
        S = self.eval_samples
        per_prompt = lambda x: np.asarray(x, np.float64).reshape(-1, S).mean(axis=1)  # noqa: E731
        wins = []
        for i, ex in enumerate(exs):
            a, b = (texts[i], ended[i]), (sft[1][i], sft[2][i])
            for lab in code_task.HELDOUT_LABELERS:
                key = ("ppo-eval", i)
                sa, sb = lab.score(ex, *a, item_key=key), lab.score(ex, *b, item_key=key)
                wins.append(1.0 if sa > sb else 0.5 if sa == sb else 0.0)
        win_p = per_prompt(np.asarray(wins).reshape(len(exs), -1).mean(axis=1))
        feats = [code_task.features(ex, t, e) for ex, t, e in zip(exs, texts, ended)]
        m = {"true_score": float(true.mean()), "true_score_se": _se(per_prompt(true)),
             "rm_score": float(rm.mean()), "rm_score_se": _se(per_prompt(rm)),
             "kl": float(kl.mean()), "kl_se": _se(per_prompt(kl)), "sqrt_kl": float(math.sqrt(max(kl.mean(), 0.0))),
             "win_rate": float(win_p.mean()), "win_rate_se": _se(win_p), "ended": float(np.mean(ended)),
             **{f"feat/{f}": float(np.mean([d[f] for d in feats])) for f in code_task.FEATURES}}
        return m, (f"held-out: true score {m['true_score']:.3f}, reward model {m['rm_score']:+.3f}, KL "
                   f"{m['kl']:.2f} nats, win rate vs SFT {m['win_rate']:.3f}, ended {m['ended']:.2f}")


def _train(cfg: PPOConfig, run_dir: Path, main: bool, t_start: float, devices, log) -> dict:
    from gptjax.data import install, load_tokenizer
    from gptjax.rlhf.reward import batch_indices, tokenizer_fingerprint

    resuming = check_run_dir(cfg, run_dir, log)
    info_path = run_dir / "ppo.json"
    rm_cfg, rm_params, rm_tok, scorer = _open_reward(cfg, cfg.mesh, devices, log)
    if resuming:  # the SFT parent from the run directory's own record: it may have moved since
        info = config_lib.read_json(info_path, f"run_dir={run_dir}")
        parent_cfg = config_lib.stored_train_config(info["parent_config"])
        tok = load_tokenizer(run_dir)
        parent = lineage_lib.Parent(Path(info["parent"]["run_dir"]), info["parent"]["step"], parent_cfg,
                                    [], tok)
        run_lineage = lineage_lib.read_lineage(run_dir)
        if info["reward_params"] != lineage_lib.params_fingerprint(rm_params):
            raise CheckpointError(f"the reward model in {cfg.reward} changed since {run_dir} started (parameters "
                                  f"{info['reward_params']} -> now another); restore it, or train PPO into "
                                  f"another --run-dir")
    else:
        parent = lineage_lib.open_parent(cfg.init_from, log=log)
        parent_cfg, tok = parent.cfg, parent.tokenizer
    if tokenizer_fingerprint(tok) != scorer.tokenizer_fingerprint:
        raise DataError(f"the reward model {cfg.reward} reads another tokenizer than the policy {cfg.init_from}; "
                        f"train the reward model from this SFT run (rlhf.py reward {cfg.init_from} ...)")
    mcfg_p, mcfg_v = no_dropout(parent_cfg.model), no_dropout(rm_cfg.model)
    T = mcfg_p.block_size
    if cfg.max_new_tokens + 2 > min(T, scorer.max_len):
        raise ConfigError(f"max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the policy's context "
                          f"({T}) and the reward model's max_len ({scorer.max_len}); lower it")
    room = min(T, scorer.max_len)
    train_p = fitting_prompts(tok, parent_cfg.data, "train", room, cfg.max_new_tokens)
    val_p = fitting_prompts(tok, parent_cfg.data, "val", room, cfg.max_new_tokens)
    if not train_p.examples:
        raise DataError(f"no training prompt of the code task leaves room for max_new_tokens={cfg.max_new_tokens} in "
                        f"{room} tokens; lower max_new_tokens")
    if not val_p.examples:
        raise DataError(f"no held-out prompt of the code task fits (of {val_p.skipped}); lower max_new_tokens, or "
                        f"pretrain with a larger data.val_fraction")
    mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    rules = cfg.mesh.rules
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    sample_rows = max(shards, -(-cfg.sample_batch // shards) * shards)
    if cfg.prompts % shards or cfg.minibatch % shards:
        raise ConfigError(f"prompts={cfg.prompts} and minibatch={cfg.minibatch} must be divisible by the {shards} "
                          f"data x fsdp devices; change them or the mesh")
    if cfg.ptx_coef > 0 and cfg.ptx_batch % shards:
        raise ConfigError(f"ptx_batch={cfg.ptx_batch} must be divisible by the {shards} data x fsdp devices")
    models = Models(cfg, mcfg_p, mcfg_v, mesh, rules)
    ref = lineage_lib.restore_params(parent, models.abstract_policy(), log=log) if not resuming else None
    if resuming:  # the reference is the SFT parameters the run started from, kept in the run directory
        ref_ckpts = Checkpoints(run_dir / "reference", read_only=True, log=log)
        try:
            _, st = ref_ckpts.restore({"params": models.abstract_policy()}, params_only=True)
        finally:
            ref_ckpts.close()
        ref = st["params"]
    ref_fp = lineage_lib.params_fingerprint(ref)
    if resuming and ref_fp != info["reference_params"]:
        raise CheckpointError(f"the reference parameters in {run_dir}/reference are not the ones the run started "
                              f"with; train PPO into another --run-dir")
    if not resuming:
        run_lineage = lineage_lib.lineage(parent, ref_fp)
    rm_fp = lineage_lib.params_fingerprint(rm_params)

    # PPO-ptx: the pretraining corpus of the policy's lineage, in its tokenizer
    td = None
    if cfg.ptx_coef > 0:
        from gptjax import data as data_lib

        td = data_lib.TokenData(data_lib.prepare(parent_cfg.data, parent_cfg.model.vocab_size, tokenizer=tok,
                                                 log=log))
    distributed.barrier("PPO run directory read")
    info = {"parent_config": config_lib.to_dict(parent_cfg), "reward_config": config_lib.to_dict(rm_cfg),
            "parent": {"run_dir": str(parent.run_dir.absolute()), "step": parent.step},
            "reward_run": str(Path(config_lib.split_init_from(cfg.reward)[0]).absolute()),
            "reference_params": ref_fp, "reward_params": rm_fp, "reward_bias": scorer.bias,
            "tokenizer": scorer.tokenizer_fingerprint, "n_train_prompts": len(train_p.examples),
            "n_val_prompts": len(val_p.examples), "skipped": {"train": train_p.skipped, "val": val_p.skipped},
            "eot_id": tok.eot_id, "pad_id": scorer.pad_id, "context": T, "reward_max_len": scorer.max_len}
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config_lib.save_json(cfg, run_dir / "config.json", lineage=run_lineage, stage="ppo")
        config_lib.write_json(info_path, info)
        if not resuming:
            install(tok, run_dir)
    distributed.barrier("PPO run directory written")
    if not resuming:  # the frozen reference, so a resumed run does not need the SFT run to be where it was
        shutil.rmtree(run_dir / "reference", ignore_errors=True) if main else None
        distributed.barrier("reference cleared")
        rc = Checkpoints(run_dir / "reference", keep=1, async_save=False, log=log)
        rc.save_params(0, ref, {**config_lib.to_dict(parent_cfg), "lineage": run_lineage[1:], "stage": "sft"})
        rc.close()
    ckpt_cfg = {**config_lib.to_dict(cfg), "lineage": run_lineage, "stage": "ppo"}
    ckpts = Checkpoints(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save, log=log)
    metrics_log = loop.MetricsLog(run_dir / "metrics.jsonl", main, cfg.log, ckpt_cfg)
    pad = scorer.pad_id
    log(f"PPO from {parent.run_dir} against the reward model {cfg.reward}: {len(train_p.examples)} training / "
        f"{len(val_p.examples)} held-out prompts of the code task ({train_p.skipped} / {val_p.skipped} too long "
        f"for max_new_tokens={cfg.max_new_tokens}), {cfg.iterations} iterations of {cfg.prompts} rollouts, "
        f"{cfg.ppo_epochs} epochs of minibatches of {cfg.minibatch}; run dir {run_dir}")

    put = distributed.host_to_global

    def step_fn(state, batch):
        it, idx = batch
        params = state["params"]["policy"]
        exs = [train_p.examples[i] for i in idx]
        t0 = time.perf_counter()
        ro = pe.sample(params, [train_p.ids[i] for i in idx], it)
        t1 = time.perf_counter()
        _, ended, rm, true = pe.judged(exs, ro)
        t2 = time.perf_counter()
        key = jax.random.fold_in(jax.random.key(cfg.seed), it)
        L = _bucket(max(len(x) for x in ro["seqs"]), T)  # padding past the longest sequence changes nothing: cut it
        args = (state, ref, put(ro["tokens"][:, :L], models.tok_sh), put(ro["response"][:, :L], models.tok_sh),
                put(rm, models.vec_sh), put(np.asarray(ended, np.float32), models.vec_sh), key)
        if td is not None:
            n_steps = cfg.ppo_epochs * (cfg.prompts // cfg.minibatch)
            seed = int(np.random.SeedSequence([cfg.seed, _PTX_DOMAIN]).generate_state(1)[0] >> 1)
            rows = td.batch(seed, it, n_steps * cfg.ptx_batch, T - 1).reshape(n_steps, cfg.ptx_batch, T)
            new, m = models.iterate_ptx(*args, jax.device_put(rows.astype(np.int32), models.ptx_sh))
        else:
            new, m = models.iterate(*args)
        jax.block_until_ready(new["step"])  # the next rollout needs these parameters anyway: time the update
        t3 = time.perf_counter()
        n_resp = float(ro["response"].sum())
        return new, {**m, "true_score": float(true.mean()), "rm_score": float(rm.mean()),
                     "response_tokens": n_resp / len(idx), "rollout_tokens_per_s": n_resp / max(t1 - t0, 1e-9),
                     "time/generate": t1 - t0, "time/score": t2 - t1, "time/update": t3 - t2}

    def batch(step):
        return step, batch_indices(cfg.seed, step, cfg.prompts, len(train_p.examples))

    pe = PolicyEval(mcfg_p, tok, scorer, val_p, ref, models.kl, eval_samples=cfg.eval_samples,
                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                    sample_rows=sample_rows, pad_id=pad)

    def evaluate_state(state) -> tuple[dict, str]:
        return pe.evaluate(state["params"]["policy"])

    def on_fresh_start(state):
        ev, line = evaluate_state(state)
        metrics_log.write({"step": 0, **ev})
        log(f"init_from {parent.run_dir} step {parent.step} (parameters {ref_fp}): {line} at step 0")

    stage = loop.Stage(steps=cfg.iterations, step_fn=step_fn, batch=batch, all_finite=models.all_finite,
                       tokens_per_step=cfg.prompts * cfg.max_new_tokens, log_every=cfg.log_every,
                       checkpoint_every=cfg.checkpoint.every or cfg.iterations, eval_every=cfg.eval_every,
                       evaluate=evaluate_state, config=ckpt_cfg,
                       profile_steps=range(cfg.profile.start_step, cfg.profile.start_step + cfg.profile.steps),
                       profile_dir=run_dir / "profile")
    try:
        result = loop.run(stage, ckpts, metrics_log,
                          fresh_state=lambda: models.start_from(ref, rm_params),
                          abstract_state=models.abstract_state, on_fresh_start=on_fresh_start, main=main, log=log)
        ev, line = evaluate_state(result.state)
        final_step = int(jax.device_get(result.state["step"]))
        metrics_log.write({"step": final_step, **ev})
        log(f"iteration {final_step}: {line}")
    finally:
        metrics_log.close()
    ckpts.close()
    policy_dir = save_policy(run_dir, result.state["params"]["policy"], final_step, parent_cfg, mcfg_p,
                             cfg.init_from, run_lineage, "ppo", tok, main, log)
    history = eval_history(run_dir / "metrics.jsonl", final_step)
    first = history.get(0, {})
    summary = {"step": final_step, **ev, "at_step_0": first, "history": [{"step": s, **history[s]}
                                                                         for s in sorted(history)],
               "n_train_prompts": len(train_p.examples), "n_val_prompts": len(val_p.examples),
               "eval_samples": cfg.eval_samples, "train_seconds": result.train_seconds,
               "total_seconds": time.time() - t_start, "policy_dir": str(policy_dir), "lineage": run_lineage}
    if main:
        config_lib.write_json(info_path, {**info, "final_step": final_step})
        config_lib.write_json(run_dir / "summary.json", summary)
    return summary


def save_policy(run_dir: Path, params, step: int, parent_cfg, mcfg: ModelConfig, init_from: str, run_lineage,
                stage: str, tok, main: bool, log) -> Path:
    """The final policy as an ordinary language-model run in RUN_DIR/policy (params only, its config and
    tokenizer): eval.py, sample.py, rlhf.py rank and init_from read it."""
    from gptjax.data import install

    policy_dir = run_dir / "policy"
    if main:
        shutil.rmtree(policy_dir, ignore_errors=True)
    distributed.barrier("policy directory cleared")
    policy_cfg = dataclasses.replace(parent_cfg, model=mcfg, run_dir=str(policy_dir), init_from=init_from)
    pc = Checkpoints(policy_dir, keep=1, async_save=False, log=log)
    pc.save_params(step, params, {**config_lib.to_dict(policy_cfg), "lineage": run_lineage, "stage": stage})
    pc.close()
    if main:
        install(tok, policy_dir)
        config_lib.save_json(policy_cfg, policy_dir / "config.json", lineage=run_lineage, stage=stage)
    return policy_dir


def _bucket(n: int, T: int, step: int = 64) -> int:
    """n rounded up to a multiple of `step` (at most T): a few compiled shapes, however long the rollouts are.
    Causal attention and the response mask make positions past a sequence's end irrelevant to everything before."""
    return min(T, -(-n // step) * step)


def _pad_rows(x: np.ndarray, n: int, multiple: int, pad) -> np.ndarray:
    """x [n, ...] padded with rows of `pad` (zeros for a mask) up to a multiple of `multiple` rows."""
    rows = -(-n // multiple) * multiple
    out = np.zeros((rows,) + x.shape[1:], x.dtype)
    if x.dtype.kind == "i":
        out[...] = pad
    out[:n] = x
    return out


def eval_history(path: Path, final_step: int) -> dict[int, dict]:
    """step -> held-out evaluation from metrics.jsonl (the last record per step: a resumed run rewrites later ones)."""
    out: dict[int, dict] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line torn by a kill
            continue
        if "win_rate" in rec and "loss" not in rec and rec.get("step", -1) <= final_step:
            out[int(rec["step"])] = {k: v for k, v in rec.items() if k != "step"}
    return out
