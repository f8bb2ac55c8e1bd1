"""Typed, frozen configuration: dataclasses, named presets, dotted overrides.

A run is described by one `TrainConfig`. Presets are JSON files in `configs/` holding a nested dict of
the fields that differ from the defaults below; `key.sub=value` overrides go on top, each parsed to the
field's type. Unknown keys and bad values raise `ConfigError` naming the nearest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration the user wrote cannot be used; the message says how to fix it."""


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


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"  # "stdlib" (this interpreter's standard library), "text" or "jsonl"
    paths: tuple[str, ...] = ()  # files or globs for "text" / "jsonl"
    text_field: str = "text"  # JSONL field holding a document
    cache_dir: str = ""  # "" means $GPTJAX_CACHE or ~/.cache/gptjax
    val_fraction: float = 0.02  # share of documents held out (chosen by a hash of the document)
    tokenizer_sample_bytes: int = 6_000_000  # training text fed to SentencePiece
    shard_tokens: int = 1 << 24
    num_task_tokens: int = 16  # reserved control tokens for later task formats


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
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
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preset: str = "tiny"
    run_dir: str = ""  # "" means runs/<preset>
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
            v = list(v)
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


def _unknown(key: str, cls) -> ConfigError:
    keys = _all_keys(TrainConfig)
    near = difflib.get_close_matches(key, keys, n=1, cutoff=0.5)
    if not near:  # try matching the last component alone ("n_layers" -> "model.n_layer")
        tails = {k.split(".")[-1]: k for k in keys}
        m = difflib.get_close_matches(key.split(".")[-1], list(tails), n=1, cutoff=0.6)
        near = [tails[m[0]]] if m else []
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return ConfigError(f"unknown config key '{key}'{hint} (valid keys: python train.py --list-keys)")


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


def from_dict(cls, d: dict, prefix: str = ""):
    """Build dataclass `cls` from a (partial) nested dict, filling defaults and checking types."""
    if not isinstance(d, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            raise _unknown(prefix + k, cls)
        t = hints[k]
        kwargs[k] = from_dict(t, v, prefix + k + ".") if dataclasses.is_dataclass(t) else coerce(prefix + k, t, v)
    return cls(**kwargs)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    d = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value (e.g. model.n_layer=6)")
        key, value = item.split("=", 1)
        key = key.strip()
        node, cls = d, TrainConfig
        parts = key.split(".")
        for p in parts[:-1]:
            hints = typing.get_type_hints(cls)
            if p not in hints or not dataclasses.is_dataclass(hints[p]):
                raise _unknown(key, TrainConfig)
            node, cls = node[p], hints[p]
        hints = typing.get_type_hints(cls)
        last = parts[-1]
        if last not in hints or dataclasses.is_dataclass(hints[last]):
            raise _unknown(key, TrainConfig)
        node[last] = coerce(key, hints[last], value)
    return validate(from_dict(TrainConfig, d))


def validate(cfg: TrainConfig) -> TrainConfig:
    m = cfg.model

    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)

    need(m.vocab_size > 0 and m.block_size > 0 and m.n_layer > 0, "model sizes must be positive")
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
    need(cfg.data.source in ("stdlib", "text", "jsonl"),
         f"data.source must be 'stdlib', 'text' or 'jsonl', got '{cfg.data.source}'")
    need(cfg.data.source == "stdlib" or cfg.data.paths,
         f"data.source={cfg.data.source} needs files: add data.paths='corpus/*.txt'")
    need(0.0 < cfg.data.val_fraction < 0.5, "data.val_fraction must be in (0, 0.5)")
    need(cfg.mesh.rules in RULE_SETS, f"mesh.rules must be one of {RULE_SETS}, got '{cfg.mesh.rules}'")
    need(cfg.steps > 0, "steps must be positive")
    need(cfg.micro_batches > 0 and cfg.batch_size % cfg.micro_batches == 0,
         f"batch_size={cfg.batch_size} must be divisible by micro_batches={cfg.micro_batches}")
    need(cfg.checkpoint.every > 0 and cfg.checkpoint.keep > 0, "checkpoint.every and checkpoint.keep must be positive")
    return cfg


# ----------------------------------------------------------------------------------------------
# Presets


def configs_dir() -> Path:
    return Path(os.environ.get("GPTJAX_CONFIGS", Path(__file__).resolve().parents[1] / "configs"))


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
    cfg = apply_overrides(load_preset(preset), list(overrides or []))
    if not cfg.run_dir:
        cfg = dataclasses.replace(cfg, run_dir=str(Path("runs") / cfg.preset))
    return cfg


def save_json(cfg: TrainConfig, path: Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def load_json(path: Path) -> TrainConfig:
    return validate(from_dict(TrainConfig, json.loads(Path(path).read_text())))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out
