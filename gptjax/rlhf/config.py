"""The RLHF stages' root configs: typed, frozen, overridable with key.sub=value like TrainConfig (the same loader,
config.from_dict / apply_overrides, which runs the validation registered in config.VALIDATORS).

SFTConfig's defaults are InstructGPT's SFT settings (Ouyang et al. 2022, appendix C.1) where they carry over to
any model size: 16 epochs, cosine learning-rate decay to 10% of the peak, residual dropout 0.2, batch 32. The
paper's learning rate (9.65e-6 for 1.3B and 6B, 5.03e-6 for 175B, from a geometric search) is tuned for those
sizes; 1e-4 is the default here, a rate that moves the small models this repository trains in minutes without
wrecking them (set optim.lr for big ones). The paper uses no warmup; here it is 2% of the steps (warmup_fraction=0
restores the paper's schedule), cheap insurance against the first Adam steps on a small batch.

RewardConfig's defaults are InstructGPT's reward-model settings (appendix C.2) where they carry over: one epoch
(the paper's reward models overfit after one), batch 64 prompts (each with all its K completions), cosine decay
to 10% of the peak. The paper's learning rate, 9e-6, is for its 6B reward model; 5e-5 is the default here: the
stage trains a freshly initialised scalar head, and an epoch of our ranking sets is tens to a few hundred steps,
in which 9e-6 hardly moves a small model (set optim.lr=9e-6 for a big model on a big data set). Dropout is 0 (the
paper gives none for the reward model) and warmup 2% of the steps, as for SFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gptjax import config as config_lib
from gptjax.config import CheckpointConfig, LogConfig, MeshConfig, OptimConfig, ProfileConfig
from gptjax.errors import ConfigError

# Built-in demonstration sets, by name: name -> fn(data_cfg, seed) -> (train records, val records), each record
# {"prompt": str, "response": str}; data_cfg is the parent run's DataConfig (the corpus a set is cut from).


def _code_demos(data_cfg, seed: int):
    """The code task's demonstrations (code_task.py): a function's signature, docstring and first line, then its
    real body; training items from the corpus's training files, held-out items from its held-out files."""
    from gptjax.rlhf import code_task

    return tuple([{"prompt": e.prompt, "response": e.response} for e in code_task.prompts(split, data_cfg=data_cfg)]
                 for split in ("train", "val"))


BUILTIN: dict[str, Callable] = {"code": _code_demos}


@dataclass(frozen=True)
class SFTConfig:
    init_from: str = ""  # the pretrained run, RUN_DIR or RUN_DIR@STEP
    data: str = ""  # a JSONL file of {"prompt": str, "response": str} records, or a built-in set's name
    val: str = ""  # a held-out JSONL file ("": a deterministic 5% of data's records, chosen by a hash of the prompt)
    epochs: float = 16.0  # the paper's 16 (it reports overfitting in validation loss after one; see summary.json)
    steps: int = 0  # 0: epochs over the packed training rows
    batch_size: int = 32  # rows (of max_len + 1 tokens, several examples each when packed) per step
    max_len: int = 0  # 0: the model's context; an example longer than this loses the end of its response
    pack: bool = True  # several examples per row where they fit (False: one example per row)
    resid_pdrop: float = 0.2  # the model's residual dropout while fine-tuning (embd/attn dropout stay the parent's)
    warmup_fraction: float = 0.02  # of the steps; optim.warmup_steps > 0 sets a number of steps instead
    eval_every: int = 0  # 0: at the end of every epoch (and always at step 0 and at the end)
    eval_batch_size: int = 32
    seed: int = 0
    run_dir: str = "runs/sft"
    log_every: int = 10
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, min_lr_ratio=0.1, decay="cosine",
                                                                    warmup_steps=0, weight_decay=0.1))
    mesh: MeshConfig = field(default_factory=MeshConfig)
    # every=0: a checkpoint at every evaluation (the end of each epoch unless eval_every says otherwise)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=0, keep=2))
    log: LogConfig = field(default_factory=LogConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


def validate_sft(cfg: SFTConfig) -> SFTConfig:
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

    need(cfg.init_from, "give the pretrained run to start from: rlhf.py sft RUN_DIR --data FILE (init_from=RUN_DIR)")
    need(cfg.data, "give the demonstrations: rlhf.py sft RUN_DIR --data FILE (a JSONL file of {\"prompt\", "
                   "\"response\"} records)" + (f" or a built-in set ({', '.join(BUILTIN)})" if BUILTIN else ""))
    need(cfg.run_dir, "run_dir must not be empty (default runs/sft)")
    need(cfg.epochs > 0 or cfg.steps > 0, "epochs (or steps) must be positive")
    need(cfg.steps >= 0, f"steps must be >= 0 (0: epochs over the training rows), got {cfg.steps}")
    need(cfg.batch_size > 0 and cfg.eval_batch_size > 0, "batch_size and eval_batch_size must be positive")
    need(cfg.max_len == 0 or cfg.max_len >= 2, f"max_len must be 0 (the model's context) or at least 2, got "
                                               f"{cfg.max_len}")
    need(0 <= cfg.resid_pdrop < 1, f"resid_pdrop must be in [0, 1), got {cfg.resid_pdrop}")
    need(0 <= cfg.warmup_fraction < 1, f"warmup_fraction must be in [0, 1), got {cfg.warmup_fraction}")
    need(cfg.eval_every >= 0, f"eval_every must be >= 0 (0: at the end of every epoch), got {cfg.eval_every}")
    need(cfg.log_every > 0, f"log_every must be positive, got {cfg.log_every}")
    need(cfg.checkpoint.every >= 0 and cfg.checkpoint.keep > 0, "checkpoint.every must be >= 0 (0: at every "
                                                                "evaluation) and checkpoint.keep positive")
    config_lib.check_mesh(cfg.mesh)
    config_lib.check_optim(cfg.optim)
    config_lib.check_log(cfg.log, cfg.profile)
    for key in ("init_from", "run_dir", "data", "val"):
        config_lib.check_local_path(key, getattr(cfg, key))
    run, _ = config_lib.split_init_from(cfg.init_from)
    need(Path(cfg.run_dir).absolute() != Path(run).absolute(),
         f"the run directory {cfg.run_dir} is the pretrained run itself; fine-tune into another --run-dir")
    return cfg


config_lib.VALIDATORS[SFTConfig] = validate_sft


def resolve_sft(overrides: list[str]) -> SFTConfig:
    """Defaults, then key.sub=value overrides (typed, with did-you-mean), then validation."""
    return config_lib.apply_overrides(SFTConfig(), overrides)


@dataclass(frozen=True)
class RewardConfig:
    init_from: str = ""  # the SFT (or pretrained) run, RUN_DIR or RUN_DIR@STEP
    data: str = ""  # a JSONL file of ranking records {"prompt", "completions", "ended", "ranks", "labeler"}
    val: str = ""  # a held-out JSONL file of rankings ("": a deterministic 5% of data's prompts, by a hash)
    # the demonstrations whose mean reward the bias sets to 0: a JSONL file of {"prompt", "response"} or a built-in
    # set's name; "": the parent SFT run's own demonstrations (then required when the parent is a pretrained run)
    demos: str = ""
    demos_limit: int = 0  # 0: every demonstration; else a seeded subset of this many sets the bias
    eval_labelers: str = ""  # comma-separated labeler names with a held-out accuracy each ("": every one found)
    epochs: float = 1.0  # the paper's one (its reward models overfit after it)
    steps: int = 0  # 0: epochs over the training prompts
    batch_size: int = 64  # prompts per step, each with all its K completions (the paper's 64)
    max_len: int = 0  # 0: the model's context; prompt + completion (+ EOT) longer than this loses the end
    dropout: float = 0.0  # embedding, attention and residual dropout while training the reward model
    warmup_fraction: float = 0.02  # of the steps; optim.warmup_steps > 0 sets a number of steps instead
    eval_every: int = 0  # 0: at the end of every epoch (and always at step 0 and at the end)
    eval_batch_size: int = 64  # sequences (completions) per scoring batch
    seed: int = 0
    run_dir: str = "runs/reward"
    log_every: int = 10
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, min_lr_ratio=0.1, decay="cosine",
                                                                    warmup_steps=0, weight_decay=0.1))
    mesh: MeshConfig = field(default_factory=MeshConfig)
    # every=0: a checkpoint at every evaluation (the end of each epoch unless eval_every says otherwise)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=0, keep=2))
    log: LogConfig = field(default_factory=LogConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


def labeler_names(cfg: RewardConfig) -> tuple[str, ...]:
    """eval_labelers as names (empty: every labeler the held-out records name)."""
    return tuple(n.strip() for n in cfg.eval_labelers.split(",") if n.strip())


def validate_reward(cfg: RewardConfig) -> RewardConfig:
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

    need(cfg.init_from, "give the SFT (or pretrained) run to start from: rlhf.py reward RUN_DIR --data FILE "
                        "(init_from=RUN_DIR)")
    need(cfg.data, "give the rankings: rlhf.py reward RUN_DIR --data FILE (a JSONL file of {\"prompt\", "
                   "\"completions\", \"ended\", \"ranks\"} records)")
    need(cfg.run_dir, "run_dir must not be empty (default runs/reward)")
    need(cfg.epochs > 0 or cfg.steps > 0, "epochs (or steps) must be positive")
    need(cfg.steps >= 0, f"steps must be >= 0 (0: epochs over the training prompts), got {cfg.steps}")
    need(cfg.batch_size > 0 and cfg.eval_batch_size > 0, "batch_size and eval_batch_size must be positive")
    need(cfg.max_len == 0 or cfg.max_len >= 2, f"max_len must be 0 (the model's context) or at least 2, got "
                                               f"{cfg.max_len}")
    need(cfg.demos_limit >= 0, f"demos_limit must be >= 0 (0: every demonstration), got {cfg.demos_limit}")
    need(0 <= cfg.dropout < 1, f"dropout must be in [0, 1), got {cfg.dropout}")
    need(0 <= cfg.warmup_fraction < 1, f"warmup_fraction must be in [0, 1), got {cfg.warmup_fraction}")
    need(cfg.eval_every >= 0, f"eval_every must be >= 0 (0: at the end of every epoch), got {cfg.eval_every}")
    need(cfg.log_every > 0, f"log_every must be positive, got {cfg.log_every}")
    need(cfg.checkpoint.every >= 0 and cfg.checkpoint.keep > 0, "checkpoint.every must be >= 0 (0: at every "
                                                                "evaluation) and checkpoint.keep positive")
    names = labeler_names(cfg)
    need(len(set(names)) == len(names), f"eval_labelers names a labeler twice: {cfg.eval_labelers!r}")
    config_lib.check_mesh(cfg.mesh)
    config_lib.check_optim(cfg.optim)
    config_lib.check_log(cfg.log, cfg.profile)
    for key in ("init_from", "run_dir", "data", "val", "demos"):
        config_lib.check_local_path(key, getattr(cfg, key))
    run, _ = config_lib.split_init_from(cfg.init_from)
    need(Path(cfg.run_dir).absolute() != Path(run).absolute(),
         f"the run directory {cfg.run_dir} is the parent run itself; train the reward model into another --run-dir")
    return cfg


config_lib.VALIDATORS[RewardConfig] = validate_reward


def resolve_reward(overrides: list[str]) -> RewardConfig:
    """Defaults, then key.sub=value overrides (typed, with did-you-mean), then validation."""
    return config_lib.apply_overrides(RewardConfig(), overrides)


@dataclass(frozen=True)
class PPOConfig:
    """InstructGPT's PPO stage (appendix C.4): `python rlhf.py ppo SFT_RUN --reward RM_RUN` (ppo_stage.py runs it,
    ppo.py has the pure core).

    beta=0.02, gamma=1, lam=0.95 and clip=0.2 are the paper's. ptx_coef is the weight of the pretraining
    log-likelihood (PPO-ptx); the paper's gamma=27.8 multiplies a per-sequence log-likelihood summed against a
    per-sequence RL objective, while here both the PPO losses and the pretraining term are means over tokens, so
    the comparable value is far smaller and is a setting of its own (0: plain PPO, the default). vf_coef weights
    the clipped value loss (the value model is a separate network, initialised from the reward run, with its own
    AdamW). no_end_penalty is subtracted from the reward-model score of a completion that never ended (not in the
    paper; 0 turns it off)."""

    init_from: str = ""  # the SFT run (the policy's and the reference's start), RUN_DIR or RUN_DIR@STEP
    reward: str = ""  # the reward-model run (the reward model, frozen, and the value model's start)
    iterations: int = 100  # rollout + update rounds
    prompts: int = 64  # prompts per iteration (k=1 completion each)
    k: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    beta: float = 0.02
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2
    vf_clip: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    minibatch: int = 16  # sequences per update; prompts * k must be a multiple of it
    lr: float = 1e-5  # policy AdamW
    value_lr: float = 0.0  # 0: the same as lr
    ptx_coef: float = 0.0
    ptx_batch: int = 8  # pretraining rows (of the context's length) per update step, when ptx_coef > 0
    no_end_penalty: float = 1.0
    seed: int = 0
    run_dir: str = "runs/ppo"
    eval_every: int = 10  # iterations between held-out evaluations (0: only at the start and the end)
    eval_samples: int = 4  # completions per held-out prompt at each evaluation
    sample_batch: int = 64  # rows per sampler call (rollouts and evaluation)
    log_every: int = 1
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=10, keep=2))
    log: LogConfig = field(default_factory=LogConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


def validate_ppo(cfg: PPOConfig) -> PPOConfig:
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

    need(cfg.init_from, "give the SFT run to start from: rlhf.py ppo SFT_RUN --reward RM_RUN (init_from=SFT_RUN)")
    need(cfg.reward, "give the reward-model run: rlhf.py ppo SFT_RUN --reward RM_RUN (reward=RM_RUN)")
    need(cfg.run_dir, "run_dir must not be empty (default runs/ppo)")
    need(cfg.iterations > 0 and cfg.prompts > 0, "iterations and prompts must be positive")
    need(cfg.k == 1, f"k must be 1 (one completion per prompt, as in the paper's PPO), got {cfg.k}")
    need(cfg.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    need(cfg.temperature > 0, f"temperature must be positive (the log-probs are at logits / temperature), got "
                              f"{cfg.temperature}")
    need(cfg.beta >= 0 and cfg.ptx_coef >= 0 and cfg.vf_coef >= 0, "beta, ptx_coef and vf_coef must be >= 0")
    need(0 <= cfg.gamma <= 1 and 0 <= cfg.lam <= 1, f"gamma and lam must be in [0, 1], got {cfg.gamma}, {cfg.lam}")
    need(cfg.clip > 0 and cfg.vf_clip > 0, "clip and vf_clip must be positive")
    need(cfg.ppo_epochs >= 1, f"ppo_epochs must be at least 1, got {cfg.ppo_epochs}")
    need(cfg.minibatch >= 1 and (cfg.prompts * cfg.k) % cfg.minibatch == 0,
         f"minibatch ({cfg.minibatch}) must divide the rollouts per iteration (prompts * k = {cfg.prompts * cfg.k})")
    need(cfg.lr > 0 and cfg.value_lr >= 0, "lr must be positive and value_lr >= 0 (0: lr)")
    need(cfg.no_end_penalty >= 0, f"no_end_penalty must be >= 0 (it is subtracted), got {cfg.no_end_penalty}")
    need(cfg.eval_every >= 0 and cfg.log_every > 0, "eval_every must be >= 0 and log_every positive")
    need(cfg.ptx_batch >= 1 and cfg.eval_samples >= 1 and cfg.sample_batch >= 1,
         "ptx_batch, eval_samples and sample_batch must be positive")
    need(cfg.checkpoint.every >= 0 and cfg.checkpoint.keep > 0, "checkpoint.every must be >= 0 and "
                                                                "checkpoint.keep positive")
    config_lib.check_mesh(cfg.mesh)
    config_lib.check_log(cfg.log, cfg.profile)
    for key in ("init_from", "reward", "run_dir"):
        config_lib.check_local_path(key, getattr(cfg, key))
    for key in ("init_from", "reward"):
        run, _ = config_lib.split_init_from(getattr(cfg, key))
        need(Path(cfg.run_dir).absolute() != Path(run).absolute(),
             f"the run directory {cfg.run_dir} is the {key} run itself; train PPO into another --run-dir")
    return cfg


config_lib.VALIDATORS[PPOConfig] = validate_ppo


def resolve_ppo(overrides: list[str]) -> PPOConfig:
    """Defaults, then key.sub=value overrides (typed, with did-you-mean), then validation."""
    return config_lib.apply_overrides(PPOConfig(), overrides)


@dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimisation (Rafailov et al. 2023) on the reward model's rankings: `python rlhf.py dpo
    SFT_RUN --data RANKINGS` (gptjax/rlhf/dpo.py). The policy starts as the SFT run, which is also the frozen
    reference; beta is DPO's (0.1 is the paper's usual value). The fields shared with RewardConfig mean the same
    (the rankings, their split, batches of prompts with all their K completions, one epoch). reward (optional) is
    a reward-model run, read only to evaluate: with it, every evaluation also samples the code task's held-out
    prompts and reports what PPO's evaluations report (true score, reward-model score, KL to SFT, win rate), so DPO
    and PPO land on the same axes; max_new_tokens, temperature, eval_samples and sample_batch are that
    evaluation's, as in PPOConfig."""

    init_from: str = ""  # the SFT run (policy start and frozen reference), RUN_DIR or RUN_DIR@STEP
    data: str = ""  # a JSONL file of ranking records {"prompt", "completions", "ended", "ranks", "labeler"}
    val: str = ""  # a held-out JSONL file of rankings ("": a deterministic 5% of data's prompts, by a hash)
    reward: str = ""  # a reward-model run, only for evaluation ("": held-out rankings only)
    beta: float = 0.1
    eval_labelers: str = ""  # comma-separated labeler names with a held-out accuracy each ("": every one found)
    epochs: float = 1.0
    steps: int = 0  # 0: epochs over the training prompts
    batch_size: int = 32  # prompts per step, each with all its K completions
    max_len: int = 0  # 0: the model's context; prompt + completion (+ EOT) longer than this loses the end
    dropout: float = 0.0  # embedding, attention and residual dropout of the policy while training
    warmup_fraction: float = 0.02  # of the steps; optim.warmup_steps > 0 sets a number of steps instead
    eval_every: int = 0  # 0: at the end of every epoch (and always at step 0 and at the end)
    eval_batch_size: int = 64  # sequences per log-probability batch on the held-out rankings
    max_new_tokens: int = 128  # the policy evaluation's (with reward=)
    temperature: float = 1.0
    eval_samples: int = 1
    sample_batch: int = 64
    seed: int = 0
    run_dir: str = "runs/dpo"
    log_every: int = 10
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-5, min_lr_ratio=0.1, decay="cosine",
                                                                    warmup_steps=0, weight_decay=0.1))
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=0, keep=2))
    log: LogConfig = field(default_factory=LogConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


def validate_dpo(cfg: DPOConfig) -> DPOConfig:
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

    need(cfg.init_from, "give the SFT run to start from: rlhf.py dpo SFT_RUN --data RANKINGS (init_from=SFT_RUN)")
    need(cfg.data, "give the rankings: rlhf.py dpo SFT_RUN --data FILE (a JSONL file of {\"prompt\", "
                   "\"completions\", \"ended\", \"ranks\"} records)")
    need(cfg.run_dir, "run_dir must not be empty (default runs/dpo)")
    need(cfg.beta > 0, f"beta must be positive (DPO's KL strength; 0.1 is usual), got {cfg.beta}")
    need(cfg.epochs > 0 or cfg.steps > 0, "epochs (or steps) must be positive")
    need(cfg.steps >= 0, f"steps must be >= 0 (0: epochs over the training prompts), got {cfg.steps}")
    need(cfg.batch_size > 0 and cfg.eval_batch_size > 0, "batch_size and eval_batch_size must be positive")
    need(cfg.max_len == 0 or cfg.max_len >= 2, f"max_len must be 0 (the model's context) or at least 2, got "
                                               f"{cfg.max_len}")
    need(0 <= cfg.dropout < 1, f"dropout must be in [0, 1), got {cfg.dropout}")
    need(0 <= cfg.warmup_fraction < 1, f"warmup_fraction must be in [0, 1), got {cfg.warmup_fraction}")
    need(cfg.eval_every >= 0, f"eval_every must be >= 0 (0: at the end of every epoch), got {cfg.eval_every}")
    need(cfg.max_new_tokens > 0 and cfg.eval_samples > 0 and cfg.sample_batch > 0,
         "max_new_tokens, eval_samples and sample_batch must be positive")
    need(cfg.temperature > 0, f"temperature must be positive, got {cfg.temperature}")
    need(cfg.log_every > 0, f"log_every must be positive, got {cfg.log_every}")
    need(cfg.checkpoint.every >= 0 and cfg.checkpoint.keep > 0, "checkpoint.every must be >= 0 (0: at every "
                                                                "evaluation) and checkpoint.keep positive")
    names = labeler_names(cfg)
    need(len(set(names)) == len(names), f"eval_labelers names a labeler twice: {cfg.eval_labelers!r}")
    config_lib.check_mesh(cfg.mesh)
    config_lib.check_optim(cfg.optim)
    config_lib.check_log(cfg.log, cfg.profile)
    for key in ("init_from", "run_dir", "data", "val", "reward"):
        config_lib.check_local_path(key, getattr(cfg, key))
    run, _ = config_lib.split_init_from(cfg.init_from)
    need(Path(cfg.run_dir).absolute() != Path(run).absolute(),
         f"the run directory {cfg.run_dir} is the SFT run itself; train DPO into another --run-dir")
    return cfg


config_lib.VALIDATORS[DPOConfig] = validate_dpo


def resolve_dpo(overrides: list[str]) -> DPOConfig:
    """Defaults, then key.sub=value overrides (typed, with did-you-mean), then validation."""
    return config_lib.apply_overrides(DPOConfig(), overrides)
