"""The fine-tuning stage's root config: typed, frozen, overridable with key.sub=value like TrainConfig (the same
loader, config.from_dict / apply_overrides). Defaults are GPT-1's fine-tuning hyperparameters (Radford et al.
2018, section 4.1): lr 6.25e-5, batch 32, 3 epochs, linear decay with warmup over 0.2% of training, dropout
0.1 in the classifier, λ = 0.5."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from gptjax import config as config_lib
from gptjax.config import CheckpointConfig, LogConfig, MeshConfig, OptimConfig, ProfileConfig
from gptjax.errors import ConfigError

INITS = ("pretrained", "random")


@dataclass(frozen=True)
class FinetuneConfig:
    init_from: str = ""  # the pretrained run, RUN_DIR or RUN_DIR@STEP (also a run made by convert.py from-hf)
    init: str = "pretrained"  # "random": the parent's architecture and tokenizer, freshly initialised (Table 5)
    transfer_layers: int = -1  # -1: every layer; k: the embeddings and the first k blocks only (Figure 2)
    task: str = ""  # a built-in task name or a JSONL file
    val: str = ""  # a validation JSONL file ("": the built-in's held-out items, or held out from the file)
    kind: str = ""  # override the detected task kind (classification, entailment, similarity, multiple_choice)
    fields: str = ""  # field mapping for other JSONL shapes, e.g. "text=review,label=stars"
    n_train: int = 2000  # built-in tasks: items generated for training
    n_val: int = 500  # and for validation
    lm_coef: float = 0.5  # λ in L3 = L2 + λ·L1; 0 is the task loss alone
    clf_pdrop: float = 0.1  # dropout on the extract state before the head
    dropout: float = 0.1  # the model's embedding / attention / residual dropout while fine-tuning
    epochs: float = 3.0
    steps: int = 0  # 0: epochs over the training set
    batch_size: int = 32
    max_len: int = 0  # 0: the model's context; longer inputs are cut, longest segment first
    drop_long: bool = False  # leave out (and count) examples whose protected parts alone exceed max_len
    warmup_fraction: float = 0.002  # of the steps; optim.warmup_steps > 0 sets a number of steps instead
    eval_every: int = 0  # 0: at the end of every epoch
    eval_batch_size: int = 64
    seed: int = 0
    run_dir: str = ""  # "" means runs/ft-<task>
    log_every: int = 10
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=6.25e-5, min_lr_ratio=0.0, warmup_steps=0,
                                                                    weight_decay=0.01, decay="linear"))
    mesh: MeshConfig = field(default_factory=MeshConfig)
    # every=0: a checkpoint at every evaluation (the end of each epoch unless eval_every says otherwise)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=0, keep=1))
    log: LogConfig = field(default_factory=LogConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)


def validate(cfg: FinetuneConfig) -> FinetuneConfig:
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

    need(cfg.task, "give the task to fine-tune on: --task NAME_OR_FILE (built-in: code-package, code-follows, "
                   "code-renamed, code-body)")
    need(cfg.init in INITS, f"init must be one of {INITS}, got '{cfg.init}'")
    need(cfg.init_from, "give the pretrained run to start from: finetune.py RUN_DIR (init_from=RUN_DIR)")
    need(cfg.lm_coef >= 0, f"lm_coef (λ) must be >= 0, got {cfg.lm_coef}")
    need(0 <= cfg.clf_pdrop < 1 and 0 <= cfg.dropout < 1, "clf_pdrop and dropout must be in [0, 1)")
    need(cfg.epochs > 0 or cfg.steps > 0, "epochs (or steps) must be positive")
    need(cfg.batch_size > 0 and cfg.eval_batch_size > 0, "batch_size and eval_batch_size must be positive")
    need(cfg.log_every > 0, "log_every must be positive")
    need(cfg.transfer_layers >= -1, "transfer_layers is -1 (all) or a number of layers >= 0")
    need(0 <= cfg.warmup_fraction < 1, "warmup_fraction must be in [0, 1)")
    need(cfg.checkpoint.every >= 0 and cfg.checkpoint.keep > 0, "checkpoint.every must be >= 0 (0: at every "
                                                                "evaluation) and checkpoint.keep positive")
    config_lib.check_mesh(cfg.mesh)
    config_lib.check_optim(cfg.optim)
    config_lib.check_log(cfg.log, cfg.profile)
    need(cfg.n_train > 0 and cfg.n_val > 0, "n_train and n_val must be positive")
    need(cfg.steps >= 0, f"steps must be >= 0 (0: epochs over the training set), got {cfg.steps}")
    for key in ("init_from", "run_dir", "task", "val"):
        config_lib.check_local_path(key, getattr(cfg, key))
    need(cfg.eval_every >= 0, "eval_every must be >= 0 (0: at the end of every epoch)")
    run, _ = config_lib.split_init_from(cfg.init_from)
    need(not cfg.run_dir or Path(cfg.run_dir).absolute() != Path(run).absolute(),
         f"the run directory {cfg.run_dir} is the pretrained run itself; fine-tune into another --run-dir")
    need(cfg.max_len == 0 or cfg.max_len >= 8, f"max_len must be 0 (the model's context) or at least 8, got {cfg.max_len}")
    return cfg


def resolve(overrides: list[str]) -> FinetuneConfig:
    """Defaults, then key.sub=value overrides (typed, with did-you-mean), then validation."""
    cfg = config_lib.apply_overrides(FinetuneConfig(), overrides)
    if not cfg.run_dir:
        name = cfg.task.rsplit("/", 1)[-1].removesuffix(".jsonl")
        cfg = dataclasses.replace(cfg, run_dir=f"runs/ft-{name}")
    return validate(cfg)
