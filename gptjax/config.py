"""Typed, frozen configuration: dataclasses, named presets, dotted overrides.

A run is described by one `TrainConfig`. Presets are JSON files in `gptjax/configs/` (shipped inside the
package, so a plain `pip install` has them; `configs/` in a source checkout is a link to it) holding a nested dict of
the fields that differ from the defaults below; `key.sub=value` overrides go on top, each parsed to the
field's type. Unknown keys and bad values raise `ConfigError` naming the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptjax.errors import ConfigError




ATTENTION_KINDS = ("dense", "banded")
ATTENTION_IMPLS = ("auto", "reference", "blockwise", "jax", "cudnn", "splash")  # see attention.py
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
DTYPES = ("float32", "bfloat16")
RULE_SETS = ("dp", "fsdp", "fsdp_tp")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny"
    vocab_size: int = 4096  # also the size the SentencePiece tokenizer is trained to
    vocab_multiple: int = 128  # embedding rows are padded up to a multiple of this, for speed
    block_size: int = 256  # context length
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    d_ff: int = 0  # 0 means 4 * d_model
    norm: str = "pre"  # "pre" (GPT-2/3) or "post" (GPT-1)
    final_norm: bool = True  # ln_f before the output layer (GPT-2/3)
    scaled_resid_init: bool = True  # c_proj init std / sqrt(2 * n_layer) (GPT-2/3)
    attention_pattern: tuple[str, ...] = ("dense",)  # repeated over the layers
    local_window: int = 256  # band width of "banded" layers
    attention_impl: str = "auto"  # auto, reference, blockwise, jax, cudnn, splash (see attention.py)
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    init_std: float = 0.02
    ln_eps: float = 1e-5
    scan_layers: bool = True
    remat: str = "none"
    dtype: str = "float32"  # compute dtype; parameters and loss stay float32
    param_dtype: str = "float32"
    loss_chunk: int = 0  # >0: output layer + loss over this many positions at a time (never all [B, T, V] logits)

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def padded_vocab(self) -> int:
        m = self.vocab_multiple
        return -(-self.vocab_size // m) * m


DATA_SOURCES = ("stdlib", "text", "jsonl", "parquet", "bin")  # see gptjax/data/sources.py
SAMPLING = ("random", "epoch")


@dataclass(frozen=True)
class MixtureSource:
    """One weighted source of a mixture (`data.mixture`): its own corpus, its own held-out split."""

    name: str = ""  # names its held-out metrics: val_loss/NAME
    weight: float = 1.0  # share of training rows (weights are normalised)
    source: str = "text"
    paths: tuple[str, ...] = ()
    text_field: str = "text"
    separator: str = ""


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"  # stdlib (this interpreter's standard library), text, jsonl, parquet or bin
    paths: tuple[str, ...] = ()  # files or globs for text / jsonl (.jsonl, .jsonl.gz, .jsonl.zst) / parquet / bin
    text_field: str = "text"  # JSONL field or parquet column holding a document
    separator: str = ""  # text: split each file into documents at this string (escapes like \n allowed); "": one per file
    tokenizer: str = ""  # a tokenizer to pretrain with (tokenizer.json, a .tiktoken file, or a dir); "": train one
    cache_dir: str = ""  # "" means $GPTJAX_CACHE or ~/.cache/gptjax
    val_fraction: float = 0.02  # share of documents held out (chosen by a hash of the document)
    tokenizer_sample_bytes: int = 6_000_000  # training text fed to SentencePiece
    shard_tokens: int = 1 << 24
    num_task_tokens: int = 16  # reserved control tokens for later task formats
    workers: int = 0  # tokenizing processes; 0: one per core
    verify: bool = False  # reuse a cache only after hashing the whole corpus again (else: a cheap fingerprint)
    sampling: str = "random"  # random windows per step, or "epoch": every window once per epoch, seeded order
    mixture: tuple[MixtureSource, ...] = ()  # several weighted sources instead of source/paths (in a config file)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    decay: str = "cosine"  # after warmup: "cosine" (GPT-2/3 pretraining) or "linear" (GPT-1 fine-tuning)
    warmup_steps: int = 100
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass(frozen=True)
class MeshConfig:
    data: int = 1
    fsdp: int = -1  # -1: all devices not used by the other axes
    tensor: int = 1
    rules: str = "fsdp"  # logical-to-mesh rule set: dp, fsdp, fsdp_tp


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 200  # steps between saves (the last step is always saved)
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class LogConfig:
    """Where metrics go besides RUN_DIR/metrics.jsonl (always written): TensorBoard event files and Weights &
    Biases, each an optional extra (pip install -e '.[track]')."""

    tensorboard: bool = False  # event files in RUN_DIR/tensorboard (tensorboard --logdir RUN_DIR/tensorboard)
    wandb: bool = False
    wandb_project: str = "gptjax"
    wandb_mode: str = "offline"  # offline (no network; `wandb sync` later), online, disabled
    wandb_entity: str = ""


@dataclass(frozen=True)
class ProfileConfig:
    """A jax.profiler trace of steps [start_step, start_step + steps) into RUN_DIR/profile (TensorBoard's
    profile tab or Perfetto)."""

    start_step: int = 5  # the first steps compile; start after them
    steps: int = 0  # 0: no trace


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    preset: str = "tiny"
    run_dir: str = ""  # "" means runs/<preset>
    init_from: str = ""  # RUN_DIR or RUN_DIR@STEP: start from that run's parameters (model and tokenizer too)
    steps: int = 1000
    batch_size: int = 32  # global, in sequences
    micro_batches: int = 1  # gradient accumulation: batch_size is split into this many
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 0  # 0: the whole validation split
    sample_prompt: str = "def "
    sample_tokens: int = 200
    temperature: float = 0.8
    top_k: int = 40

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.model.block_size


# ----------------------------------------------------------------------------------------------
# Dict conversion and validation


def to_dict(cfg: Any) -> dict:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = [to_dict(x) if dataclasses.is_dataclass(x) else x for x in v]
        out[f.name] = v
    return out


def _all_keys(cls, prefix="") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            keys += _all_keys(t, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown(key: str, root, cls, error: type[Exception]) -> Exception:
    """An unknown key, with the nearest valid one. Under TrainConfig the suggestion is a full dotted key
    (train.py --list-keys lists them); under other roots, a field of the section the key was found in."""
    if root is not TrainConfig:
        fields = [f.name for f in dataclasses.fields(cls)]
        near = difflib.get_close_matches(key.split(".")[-1], fields, n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        return error(f"unknown key '{key}'{hint} (valid: {', '.join(fields)})")
    keys = _all_keys(root)
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not near:  # try matching the last component alone ("n_layers" -> "model.n_layer")
        tails = {k.split(".")[-1]: k for k in keys}
        m = difflib.get_close_matches(key.split(".")[-1], list(tails), n=1, cutoff=0.6)
        near = [tails[m[0]]] if m else []
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return error(f"unknown config key '{key}'{hint} (valid keys: python train.py --list-keys)")


def coerce(key: str, t, v):
    """Check or convert value `v` (from JSON, or a string from the command line) to type `t`."""
    origin = typing.get_origin(t)
    if origin is tuple:
        if isinstance(v, str):
            v = [s for s in (p.strip() for p in v.split(",")) if s]
        if not isinstance(v, (list, tuple)):
            raise ConfigError(f"'{key}' expects a comma-separated list, got {v!r}")
        (elem, _ellipsis) = typing.get_args(t)
        return tuple(coerce(key, elem, x) for x in v)
    if t is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "1", "yes", "false", "0", "no"):
            return v.lower() in ("true", "1", "yes")
        raise ConfigError(f"'{key}' expects true or false, got {v!r}")
    if t is int:
        if isinstance(v, bool):
            raise ConfigError(f"'{key}' expects an integer, got {v!r}")
        if isinstance(v, int):
            return v
        if isinstance(v, str):
            try:
                return int(v.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"'{key}' expects an integer, got {v!r}")
    if t is float:
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if isinstance(v, str):
            try:
                return float(v)
            except ValueError:
                pass
        raise ConfigError(f"'{key}' expects a number, got {v!r}")
    if t is str:
        if isinstance(v, str):
            return v
        raise ConfigError(f"'{key}' expects a string, got {v!r}")
    raise ConfigError(f"'{key}': unsupported type {t}")


def _dataclass_tuple(t):
    """The element class of a `tuple[SomeDataclass, ...]` field, else None."""
    if typing.get_origin(t) is tuple:
        args = typing.get_args(t)
        if args and dataclasses.is_dataclass(args[0]):
            return args[0]
    return None


def from_dict(cls, d: dict, prefix: str = "", *, root=None, error: type[Exception] = ConfigError):
    """Build dataclass `cls` (any root config: train, sweep, and every later stage's) from a (partial) nested
    dict, filling defaults and checking types. Unknown keys and wrong types raise `error` naming the key."""
    root = root or cls
    if not isinstance(d, dict):
        raise error(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            raise _unknown(prefix + k, root, cls, error)
        t, key = hints[k], prefix + k
        if dataclasses.is_dataclass(t):
            kwargs[k] = from_dict(t, v, key + ".", root=root, error=error)
        elif _dataclass_tuple(t) is not None:
            if not isinstance(v, (list, tuple)):
                raise error(f"'{key}' must be a list of mappings, got {v!r}")
            kwargs[k] = tuple(from_dict(_dataclass_tuple(t), x, f"{key}[{i}].", root=root, error=error)
                              for i, x in enumerate(v))
        else:
            try:
                kwargs[k] = coerce(key, t, v)
            except ConfigError as e:
                raise error(str(e)) from None
    return cls(**kwargs)


def apply_overrides(cfg, overrides: list[str]):
    """`cfg` (any root config dataclass) with key.sub=value overrides, each parsed to its field's type."""
    root = type(cfg)
    d = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value (e.g. model.n_layer=6)")
        key, value = item.split("=", 1)
        key = key.strip()
        node, cls = d, root
        parts = key.split(".")
        for p in parts[:-1]:
            hints = typing.get_type_hints(cls)
            if p not in hints or not dataclasses.is_dataclass(hints[p]):
                raise _unknown(key, root, cls, ConfigError)
            node, cls = node[p], hints[p]
        hints = typing.get_type_hints(cls)
        last = parts[-1]
        if last not in hints or dataclasses.is_dataclass(hints[last]):
            raise _unknown(key, root, cls, ConfigError)
        node[last] = _mappings(key, value) if _dataclass_tuple(hints[last]) else coerce(key, hints[last], value)
    return validate(from_dict(root, d))


def _mappings(key: str, value: str) -> list:
    """A list-of-mappings field on the command line: inline JSON ([{...}, ...]), a JSON file holding such a list,
    or nothing (key=) for an empty list. from_dict then checks each mapping."""
    value = value.strip()
    if not value:
        return []
    if value.startswith("["):
        text, where = value, "the value"
    else:
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}={value}: expects a JSON list of mappings, inline or in a file; no file {path}")
        text, where = path.read_text(), str(path)
    try:
        out = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{key}: {where} is not valid JSON ({e.msg}, line {e.lineno}); it must be a list of "
                          f"mappings") from None
    if not isinstance(out, list):
        raise ConfigError(f"{key}: {where} must hold a JSON list of mappings, got {type(out).__name__}")
    return out


def validate(cfg):
    """Check a root config's values (TrainConfig here; other roots register theirs in VALIDATORS)."""
    check = VALIDATORS.get(type(cfg))
    return check(cfg) if check else cfg


def _need(ok, msg):
    if not ok:
        raise ConfigError(msg)


OBJECT_STORE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_local_path(key: str, value: str) -> None:
    """Run directories, caches and corpora are local (or mounted) paths. `gs://bucket/run` would otherwise
    become the local folder `gs:/bucket/run` without a word."""
    if value and OBJECT_STORE.match(value):
        scheme = value.split("://", 1)[0]
        raise ConfigError(f"{key}={value}: {scheme}:// paths are not supported; mount the bucket as a local "
                          f"directory (e.g. gcsfuse BUCKET /mnt/BUCKET) and pass {key}=/mnt/BUCKET/...")


def check_optim(o: OptimConfig) -> None:
    _need(o.lr > 0, f"optim.lr must be positive, got {o.lr} (a learning rate <= 0 does not train)")
    _need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _need(o.decay in ("cosine", "linear"), f"optim.decay must be 'cosine' or 'linear', got '{o.decay}'")
    _need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _need(0.0 <= o.b1 < 1.0 and 0.0 <= o.b2 < 1.0, f"optim.b1 and optim.b2 must be in [0, 1), got {o.b1}, {o.b2}")
    _need(o.eps > 0, f"optim.eps must be positive, got {o.eps}")
    _need(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _need(o.grad_clip >= 0, f"optim.grad_clip must be >= 0 (0: no clipping), got {o.grad_clip}")


def check_mesh(m: MeshConfig) -> None:
    _need(m.rules in RULE_SETS, f"mesh.rules must be one of {RULE_SETS}, got '{m.rules}'")
    sizes = (m.data, m.fsdp, m.tensor)  # sizes against the devices present are checked in sharding.make_mesh
    _need(all(x >= 1 or x == -1 for x in sizes) and sizes.count(-1) <= 1,
          f"mesh sizes must be positive, with at most one -1 (all the devices left), got data={m.data} "
          f"fsdp={m.fsdp} tensor={m.tensor}")


WANDB_MODES = ("offline", "online", "disabled")


def check_log(log: LogConfig, profile: ProfileConfig) -> None:
    _need(log.wandb_mode in WANDB_MODES, f"log.wandb_mode must be one of {WANDB_MODES}, got '{log.wandb_mode}'")
    _need(profile.steps >= 0 and profile.start_step >= 0,
          f"profile.start_step and profile.steps must be >= 0 (profile.steps=0: no trace), got "
          f"{profile.start_step} and {profile.steps}")


def check_data(d: DataConfig) -> None:
    need = _need
    sources = d.mixture or (d,)
    for i, s in enumerate(sources):
        key = f"data.mixture[{i}]." if d.mixture else "data."
        need(s.source in DATA_SOURCES, f"{key}source must be one of {', '.join(DATA_SOURCES)}, got '{s.source}'")
        need(s.source == "stdlib" or s.paths, f"{key}source={s.source} needs files: add {key}paths='corpus/*.txt'")
        for p in s.paths:
            check_local_path(f"{key}paths", p)
    if d.mixture:
        names = [s.name for s in d.mixture]
        need(all(re.fullmatch(r"[A-Za-z0-9_.-]+", n) for n in names),
             f"data.mixture names must be non-empty and use letters, digits, _ . - (they name metrics), got {names}")
        need(len(set(names)) == len(names), f"data.mixture names must differ, got {names}")
        need(all(s.weight > 0 for s in d.mixture), "data.mixture weights must be positive")
        need(all(s.source != "bin" for s in d.mixture), "data.mixture takes text sources, not already-tokenized bin")
        need(d.sampling == "random", "data.sampling=epoch is for a single source; a mixture draws its rows at random "
                                     "(set data.sampling=random)")
    need(d.source != "bin" or d.tokenizer or d.mixture,
         "data.source=bin holds token ids: name the tokenizer that made them with data.tokenizer=PATH "
         "(e.g. GPT-2's tokenizer.json or r50k_base.tiktoken)")
    if d.tokenizer:
        check_local_path("data.tokenizer", d.tokenizer)
    need(d.sampling in SAMPLING, f"data.sampling must be one of {', '.join(SAMPLING)}, got '{d.sampling}'")
    need(d.workers >= 0, f"data.workers must be >= 0 (0: one per core), got {d.workers}")


def validate_train(cfg: TrainConfig) -> TrainConfig:
    m = cfg.model
    need = _need

    for k in ("vocab_size", "vocab_multiple", "block_size", "n_layer", "n_head", "d_model"):
        need(getattr(m, k) > 0, f"model.{k} must be positive, got {getattr(m, k)}")
    need(m.d_ff >= 0, f"model.d_ff must be >= 0 (0: 4 * d_model), got {m.d_ff}")
    need(m.loss_chunk >= 0, f"model.loss_chunk must be >= 0 (0: the whole sequence at once), got {m.loss_chunk}")
    need(m.d_model % m.n_head == 0,
         f"model.d_model={m.d_model} is not divisible by model.n_head={m.n_head}; pick heads that divide it")
    need(m.norm in ("pre", "post"), f"model.norm must be 'pre' or 'post', got '{m.norm}'")
    need(len(m.attention_pattern) > 0 and all(k in ATTENTION_KINDS for k in m.attention_pattern),
         f"model.attention_pattern entries must be among {ATTENTION_KINDS}, got {m.attention_pattern}")
    need(m.n_layer % len(m.attention_pattern) == 0,
         f"model.n_layer={m.n_layer} must be a multiple of the attention pattern's length "
         f"{len(m.attention_pattern)} ({','.join(m.attention_pattern)})")
    need(m.remat in REMAT_POLICIES, f"model.remat must be one of {REMAT_POLICIES}, got '{m.remat}'")
    need(m.dtype in DTYPES, f"model.dtype must be one of {DTYPES}, got '{m.dtype}'")
    need(m.param_dtype in DTYPES, f"model.param_dtype must be one of {DTYPES}, got '{m.param_dtype}'")
    need(m.attention_impl in ATTENTION_IMPLS,
         f"model.attention_impl must be one of {ATTENTION_IMPLS}, got '{m.attention_impl}'")
    need(m.local_window >= 1, f"model.local_window must be at least 1 (keys per query, itself included), "
                              f"got {m.local_window}")
    for p in ("embd_pdrop", "attn_pdrop", "resid_pdrop"):
        need(0.0 <= getattr(m, p) < 1.0, f"model.{p} must be in [0, 1)")
    need(m.init_std > 0 and m.ln_eps > 0, "model.init_std and model.ln_eps must be positive")
    check_data(cfg.data)
    need(0.0 < cfg.data.val_fraction < 0.5, "data.val_fraction must be in (0, 0.5)")
    need(cfg.data.tokenizer_sample_bytes > 0 and cfg.data.shard_tokens > 0,
         "data.tokenizer_sample_bytes and data.shard_tokens must be positive")
    need(cfg.data.num_task_tokens >= 0, f"data.num_task_tokens must be >= 0, got {cfg.data.num_task_tokens}")
    check_optim(cfg.optim)
    check_mesh(cfg.mesh)
    check_log(cfg.log, cfg.profile)
    need(cfg.steps > 0, f"steps must be positive, got {cfg.steps}")
    need(cfg.batch_size > 0, f"batch_size must be positive (sequences per step), got {cfg.batch_size}")
    need(cfg.micro_batches > 0 and cfg.batch_size % cfg.micro_batches == 0,
         f"batch_size={cfg.batch_size} must be divisible by micro_batches={cfg.micro_batches}")
    need(cfg.log_every > 0, f"log_every must be positive (steps between metrics lines), got {cfg.log_every}")
    need(cfg.eval_every >= 0, f"eval_every must be >= 0 (0: evaluate only at the end), got {cfg.eval_every}")
    need(cfg.eval_batches >= 0, f"eval_batches must be >= 0 (0: the whole validation split), got {cfg.eval_batches}")
    need(cfg.checkpoint.every > 0 and cfg.checkpoint.keep > 0, "checkpoint.every and checkpoint.keep must be positive")
    need(cfg.temperature >= 0, f"temperature must be >= 0 (0: greedy), got {cfg.temperature}")
    need(cfg.top_k >= 0 and cfg.sample_tokens >= 0, "top_k and sample_tokens must be >= 0")
    for key in ("run_dir", "init_from", "data.cache_dir"):
        check_local_path(key, getattr(cfg.data, "cache_dir") if key == "data.cache_dir" else getattr(cfg, key))
    return cfg


VALIDATORS: dict[type, Any] = {TrainConfig: validate_train}


# ----------------------------------------------------------------------------------------------
# Presets


def configs_dir() -> Path:
    return Path(os.environ.get("GPTJAX_CONFIGS", Path(__file__).resolve().parent / "configs"))


def list_presets() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.json"))


def load_preset(name: str) -> TrainConfig:
    """A preset by name (a file in configs/) or a path to a JSON file."""
    path = Path(name)
    if not (path.suffix == ".json" and path.exists()):
        path = configs_dir() / f"{name}.json"
    if not path.exists():
        near = difflib.get_close_matches(name, list_presets(), n=1, cutoff=0.4)
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise ConfigError(f"unknown preset '{name}'{hint} (presets: {', '.join(list_presets())})")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"preset file {path} is not valid JSON: {e}") from None
    d.setdefault("preset", path.stem)
    return validate(from_dict(TrainConfig, d))


def resolve(preset: str = "tiny", overrides: list[str] | None = None) -> TrainConfig:
    overrides = list(overrides or [])
    cfg = apply_overrides(load_preset(preset), overrides)
    if cfg.init_from:
        cfg = adopt_parent_model(cfg, overrides)
    if cfg.init_from and not cfg.run_dir:
        raise ConfigError(f"init_from={cfg.init_from} starts a new run: give it its own run_dir=... (the default, "
                          f"runs/{cfg.preset}, may hold another run)")
    if not cfg.run_dir:
        cfg = dataclasses.replace(cfg, run_dir=str(Path("runs") / cfg.preset))
    if cfg.init_from and Path(cfg.run_dir).absolute() == Path(split_init_from(cfg.init_from)[0]).absolute():
        raise ConfigError(f"init_from={cfg.init_from} names the run directory itself; start the new run in another "
                          f"run_dir=... (to continue that run, drop init_from and rerun its own command)")
    return cfg


# Model fields a run started with init_from may set differently from its parent: they change how the same
# parameters are computed with (or regularised), not what they are. Every other field comes from the parent.
INHERIT_MAY_CHANGE = ("name", "scan_layers", "remat", "attention_impl", "dtype", "loss_chunk", "embd_pdrop",
                      "attn_pdrop", "resid_pdrop")


def split_init_from(spec: str) -> tuple[str, int | None]:
    """'RUN_DIR' or 'RUN_DIR@STEP' -> (RUN_DIR, STEP or None)."""
    run, sep, step = spec.rpartition("@")
    if not sep or not step.isdigit():
        return spec, None
    return run, int(step)


def stored_train_config(d: dict) -> TrainConfig:
    """A TrainConfig from a run's config.json or a checkpoint's config (records such as 'lineage' set aside)."""
    return validate(from_dict(TrainConfig, {k: v for k, v in d.items() if k not in RECORD_KEYS}))


RECORD_KEYS = ("lineage", "stage")  # written beside the resolved config, not settings


def read_json(path: Path, what: str, fix: str = "restore it, or start a new run_dir") -> Any:
    """A JSON file a run directory or cache holds. A corrupt one (a torn write, an edit gone wrong) is one line
    naming the file and the fix, never a JSONDecodeError traceback."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what}: {path} is not valid JSON ({e}); {fix}") from None


def read_config(path: Path, what: str) -> dict:
    """A run's config.json (every checkpoint holds a copy of it under checkpoints/STEP/config)."""
    d = read_json(path, what, f"copy it back from a checkpoint ({path.parent}/checkpoints/STEP/config/metadata) or "
                              f"start a new run_dir")
    if not isinstance(d, dict):
        raise ConfigError(f"{what}: {path} holds no config (a JSON object); restore it from a checkpoint's copy")
    return d


def adopt_parent_model(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """The model of a run started with init_from is its parent's; model.* overrides may change only the fields
    in INHERIT_MAY_CHANGE, and any other is refused naming it (it would change the parameters' shapes or what
    they mean). A child being resumed reads its own record of the model, so the parent may have moved."""
    run, _ = split_init_from(cfg.init_from)
    own = Path(cfg.run_dir) / "config.json" if cfg.run_dir else None
    stored = read_config(own, f"run_dir={cfg.run_dir}") if own is not None and own.is_file() else {}
    if stored.get("init_from") != cfg.init_from or stored.get("stage", "pretrain") != "pretrain":
        path = Path(run) / "config.json"
        if not path.is_file():
            raise ConfigError(f"init_from={cfg.init_from}: {run} holds no config.json; point init_from at a run "
                              f"directory written by train.py or convert.py from-hf")
        stored = read_config(path, f"init_from={cfg.init_from}")
        if stored.get("stage", "pretrain") != "pretrain":
            raise ConfigError(f"init_from={cfg.init_from} is a {stored['stage']} run (with a task head); pretraining "
                              f"continues from a language model: point init_from at a pretraining run")
    parent = stored_train_config(stored).model
    model_overrides = [o for o in overrides if o.split("=", 1)[0].strip().startswith("model.")]
    child = apply_overrides(dataclasses.replace(cfg, model=parent), model_overrides)
    changed = [f.name for f in dataclasses.fields(ModelConfig)
               if f.name not in INHERIT_MAY_CHANGE and getattr(child.model, f.name) != getattr(parent, f.name)]
    if changed:
        k = changed[0]
        raise ConfigError(f"model.{k}={getattr(child.model, k)!r} cannot be used with init_from={cfg.init_from}: the "
                          f"parent has model.{k}={getattr(parent, k)!r} and its parameters fix it; drop that override "
                          f"(with init_from only {', '.join('model.' + n for n in INHERIT_MAY_CHANGE)} may change)")
    return child


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file whole and rename it into place: a kill or a full disk leaves the old file or the new one,
    never half of one (another process never reads half of it either)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def save_json(cfg, path: Path, **records) -> None:
    """The resolved config as JSON, with record-only entries beside it (e.g. lineage=[...]), written atomically."""
    write_json(path, {**to_dict(cfg), **records})


def load_json(path: Path) -> TrainConfig:
    return stored_train_config(read_config(Path(path), str(Path(path).parent)))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out
