"""Sweep configs, the points they plan (each an ordinary TrainConfig), training them, and their results."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gptjax import config as config_lib
from gptjax.config import ConfigError, TrainConfig
from gptjax.errors import SweepError

N_COUNTS = ("non_embedding", "total")




# ----------------------------------------------------------------------------------------------
# Sweep configuration


@dataclass(frozen=True)
class SizeSpec:
    name: str = ""  # "" means L<n_layer>-d<d_model>
    preset: str = ""  # take n_layer, d_model, n_head, d_ff from this preset (vocabulary and context stay the base's)
    n_layer: int = 0
    d_model: int = 0
    n_head: int = 0  # 0 means d_model // head_dim
    d_ff: int = 0  # 0 means 4 * d_model
    lr: float = 0.0  # 0 means the base config's optim.lr


@dataclass(frozen=True)
class LadderSpec:
    sizes: tuple[str, ...] = ()  # () means every size except the prediction point's
    tokens: int = 0  # the same token count for every size, or
    tokens_per_param: float = 0.0  # D = tokens_per_param * N


@dataclass(frozen=True)
class IsoflopSpec:
    budgets: tuple[float, ...] = ()  # C = 6 N D
    sizes: tuple[str, ...] = ()  # () means every size except the prediction point's
    max_tokens: int = 0  # leave out points that would train on more tokens (0: no limit)


@dataclass(frozen=True)
class PredictSpec:
    size: str = ""
    tokens: int = 0
    tokens_per_param: float = 0.0
    threshold: float = 0.0  # fit on points with at most this many exact FLOPs; 0 means a tenth of the point's


@dataclass(frozen=True)
class SweepConfig:
    name: str = ""
    description: str = ""
    base: str = "tiny"  # a preset name or JSON path
    overrides: tuple[str, ...] = ()  # key.sub=value, applied to every point
    head_dim: int = 64
    n_count: str = "non_embedding"  # which N the token budgets, C and the fits use
    warmup_fraction: float = 0.05  # warmup steps as a share of each point's steps
    min_steps: int = 20  # points with fewer steps are left out (noted by --dry-run)
    seeds: tuple[int, ...] = (0,)
    sizes: tuple[SizeSpec, ...] = ()
    ladder: LadderSpec = field(default_factory=LadderSpec)
    isoflop: IsoflopSpec = field(default_factory=IsoflopSpec)
    predict: PredictSpec = field(default_factory=PredictSpec)


def _near(key: str, names) -> str:
    m = difflib.get_close_matches(key, list(names), n=1, cutoff=0.5)
    return f"; did you mean '{m[0]}'?" if m else ""


def sweeps_dir() -> Path:
    return config_lib.configs_dir() / "sweeps"


def list_sweeps() -> list[str]:
    return sorted(p.stem for p in sweeps_dir().glob("*.json"))


def load_sweep(name: str) -> SweepConfig:
    """A sweep by name (configs/sweeps/NAME.json) or a path to a JSON file; checked before anything runs."""
    path = Path(name)
    if not (path.suffix == ".json" and path.exists()):
        path = sweeps_dir() / f"{name}.json"
    if not path.exists():
        raise SweepError(f"unknown sweep config '{name}'{_near(name, list_sweeps())} "
                         f"(sweeps in {sweeps_dir()}: {', '.join(list_sweeps()) or 'none'})")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SweepError(f"sweep file {path} is not valid JSON: {e}") from None
    if isinstance(d, dict):
        d.setdefault("name", path.stem)
    return validate_sweep(config_lib.from_dict(SweepConfig, d, "sweep.", error=SweepError))


def validate_sweep(sw: SweepConfig) -> SweepConfig:
    def need(ok, msg):
        if not ok:
            raise SweepError(f"sweep '{sw.name}': {msg}")

    need(sw.sizes, "declare at least one model size in 'sizes'")
    need(sw.n_count in N_COUNTS, f"n_count must be one of {N_COUNTS}, got '{sw.n_count}'")
    need(0 <= sw.warmup_fraction < 1, "warmup_fraction must be in [0, 1)")
    need(sw.seeds, "'seeds' must list at least one seed")
    names = [size_name(s) for s in sw.sizes]
    dup = sorted({n for n in names if names.count(n) > 1})
    need(not dup, f"size names must be unique; repeated: {', '.join(dup)}")
    for s in sw.sizes:
        need(s.preset or (s.n_layer > 0 and s.d_model > 0),
             f"size '{size_name(s)}' needs n_layer and d_model (or a preset)")
    for where, sizes in (("ladder", sw.ladder.sizes), ("isoflop", sw.isoflop.sizes), ("predict", (sw.predict.size,))):
        for n in sizes:
            need(not n or n in names, f"{where} names an unknown size '{n}'{_near(n, names)}")
    need(not (sw.ladder.tokens and sw.ladder.tokens_per_param), "ladder: give tokens or tokens_per_param, not both")
    need(not (sw.predict.tokens and sw.predict.tokens_per_param), "predict: give tokens or tokens_per_param, not both")
    need(all(b > 0 for b in sw.isoflop.budgets), "isoflop budgets must be positive")
    return sw


def size_name(s: SizeSpec) -> str:
    return s.name or s.preset or f"L{s.n_layer}-d{s.d_model}"


# ----------------------------------------------------------------------------------------------
# Planning: sweep config -> points (each a TrainConfig)


@dataclass(frozen=True)
class Point:
    name: str
    group: str  # "ladder", "isoflop" or "predict"
    size: str
    seed: int
    budget: float | None  # the isoFLOP budget (C = 6ND), None elsewhere
    cfg: TrainConfig
    n_non_embedding: int
    n_total: int
    flops_per_token: float

    @property
    def tokens(self) -> int:
        return self.cfg.steps * self.cfg.tokens_per_step

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens

    def n(self, n_count: str) -> int:
        return self.n_total if n_count == "total" else self.n_non_embedding


def _fmt_tokens(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if x >= div:
            return f"{x / div:.3g}{unit}"
    return f"{int(x)}"


def _model_overrides(sw: SweepConfig, s: SizeSpec) -> list[str]:
    if s.preset:
        m = config_lib.load_preset(s.preset).model
        L, D, H, F = s.n_layer or m.n_layer, s.d_model or m.d_model, s.n_head or m.n_head, s.d_ff or m.d_ff
    else:
        L, D, H, F = s.n_layer, s.d_model, s.n_head or max(1, s.d_model // sw.head_dim), s.d_ff
    return [f"model.name={size_name(s)}", f"model.n_layer={L}", f"model.d_model={D}", f"model.n_head={H}",
            f"model.d_ff={F}"]


def plan_points(sw: SweepConfig, sweep_dir: str | Path, overrides: list[str] | None = None) -> tuple[list[Point], list[str]]:
    """Every point of the sweep (the prediction point last), and notes on points left out."""
    from gptjax import flops as flops_lib

    sweep_dir = Path(sweep_dir)
    sizes = {size_name(s): s for s in sw.sizes}
    try:
        base = config_lib.resolve(sw.base, list(sw.overrides) + list(overrides or []))
    except ConfigError as e:
        raise SweepError(f"sweep '{sw.name}': {e}") from None
    tps = base.tokens_per_step
    counts_cache: dict[str, tuple[TrainConfig, dict, float]] = {}

    def sized(name: str):
        if name not in counts_cache:
            try:
                cfg = config_lib.apply_overrides(base, _model_overrides(sw, sizes[name]))
            except ConfigError as e:
                raise SweepError(f"sweep '{sw.name}', size '{name}': {e}") from None
            counts_cache[name] = (cfg, flops_lib.param_counts(cfg.model), flops_lib.flops_per_token(cfg.model))
        return counts_cache[name]

    points: list[Point] = []
    notes: list[str] = []

    def add(group: str, name: str, size: str, tokens: float, budget: float | None):
        cfg0, counts, fpt = sized(size)
        steps = max(int(round(tokens / tps)), 1)
        if steps < sw.min_steps:
            notes.append(f"left out {name}: {_fmt_tokens(tokens)} tokens is {steps} steps of {tps} tokens "
                         f"(min_steps={sw.min_steps})")
            return
        s = sizes[size]
        for seed in sw.seeds:
            pname = name + (f"-s{seed}" if len(sw.seeds) > 1 else "")
            ov = [f"steps={steps}", f"seed={seed}", f"run_dir={sweep_dir / pname}",
                  f"optim.warmup_steps={max(1, int(round(sw.warmup_fraction * steps)))}"]
            if s.lr:
                ov.append(f"optim.lr={s.lr}")
            cfg = config_lib.apply_overrides(cfg0, ov)
            points.append(Point(pname, group, size, seed, budget, cfg, counts["non_embedding"], counts["total"], fpt))

    default_sizes = [n for n in sizes if n != sw.predict.size]
    lad = sw.ladder
    if lad.tokens or lad.tokens_per_param:
        for n in lad.sizes or default_sizes:
            tokens = lad.tokens or lad.tokens_per_param * sized(n)[1][sw.n_count]
            add("ladder", f"ladder-{n}", n, tokens, None)
    for budget in sw.isoflop.budgets:
        for n in sw.isoflop.sizes or default_sizes:
            tokens = budget / (6 * sized(n)[1][sw.n_count])
            if sw.isoflop.max_tokens and tokens > sw.isoflop.max_tokens:
                notes.append(f"left out {f'iso{budget:.0e}'.replace('+', '')}-{n}: {_fmt_tokens(tokens)} tokens is more than "
                             f"isoflop.max_tokens={sw.isoflop.max_tokens}")
                continue
            add("isoflop", f"iso{budget:.0e}-{n}".replace("+", ""), n, tokens, budget)
    p = sw.predict
    if p.size:
        tokens = p.tokens or p.tokens_per_param * sized(p.size)[1][sw.n_count]
        if not tokens:
            raise SweepError(f"sweep '{sw.name}': predict needs tokens or tokens_per_param")
        add("predict", f"predict-{p.size}", p.size, tokens, None)
    return points, notes


def describe(points: list[Point], n_count: str = "non_embedding", tflops: float = 0.0) -> str:
    """A table of the planned points; with `tflops` (effective FLOP/s / 1e12), an estimated time each."""
    rows = [f"{'point':<28} {'N':>9} {'steps':>6} {'D':>7} {'C=6ND':>9} {'FLOPs':>9}" + ("  est." if tflops else "")]
    total = 0.0
    for p in points:
        est = p.flops / (tflops * 1e12) if tflops else 0.0
        total += est
        rows.append(f"{p.name:<28} {_fmt_tokens(p.n(n_count)):>9} {p.cfg.steps:>6} {_fmt_tokens(p.tokens):>7} "
                    f"{6 * p.n(n_count) * p.tokens:>9.2e} {p.flops:>9.2e}" + (f"  {est / 60:5.1f} min" if tflops else ""))
    rows.append(f"{len(points)} points, {sum(p.flops for p in points):.2e} training FLOPs"
                + (f", about {total / 60:.0f} min at {tflops} TFLOP/s (training only)" if tflops else ""))
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------
# Running


def _config_diff(a: dict, b: dict) -> list[str]:
    fa, fb = config_lib.flatten(a), config_lib.flatten(b)
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb))
            if k != "run_dir" and fa.get(k) != fb.get(k)]


def is_finished(p: Point) -> bool:
    """A point with a summary.json is done, if it was trained with this config; otherwise an error."""
    run_dir = Path(p.cfg.run_dir)
    if not (run_dir / "summary.json").exists():
        return False
    old = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    diff = _config_diff(old, config_lib.to_dict(p.cfg))
    if diff:
        raise SweepError(f"{run_dir} was trained with another config ({'; '.join(diff[:3])}); the sweep config "
                         f"changed since: delete that directory, or sweep into a new --dir")
    return True


def record(p: Point, n_count: str = "non_embedding") -> dict:
    """The results record of a finished point."""
    s = json.loads((Path(p.cfg.run_dir) / "summary.json").read_text())
    D = p.tokens
    return {"name": p.name, "group": p.group, "size": p.size, "seed": p.seed, "budget": p.budget,
            "n_layer": p.cfg.model.n_layer, "d_model": p.cfg.model.d_model, "n_head": p.cfg.model.n_head,
            "lr": p.cfg.optim.lr, "steps": p.cfg.steps, "tokens": D,
            "N_non_embedding": p.n_non_embedding, "N_total": p.n_total, "N": p.n(n_count),
            "C": 6.0 * p.n(n_count) * D, "C_6ND_non_embedding": 6.0 * p.n_non_embedding * D,
            "C_6ND_total": 6.0 * p.n_total * D, "flops": p.flops,
            "val_loss": s["val_loss"], "val_bits_per_byte": s["val_bits_per_byte"],
            "train_seconds": s.get("train_seconds"), "total_seconds": s.get("total_seconds"),
            "tokens_per_s": s.get("tokens_per_s"), "run_dir": str(p.cfg.run_dir)}


def write_results(sw: SweepConfig, points: list[Point], sweep_dir: Path) -> list[dict]:
    recs = [record(p, sw.n_count) for p in points if p.group != "predict" and is_finished(p)]
    tmp = sweep_dir / "results.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tmp.replace(sweep_dir / "results.jsonl")
    return recs


def train_point(p: Point, log: Callable[[str], None]) -> dict:
    from gptjax.train.pretrain import pretrain

    return pretrain(p.cfg, log=log)


def sweep(sw: SweepConfig, sweep_dir: str | Path, overrides: list[str] | None = None, *,
          log: Callable[[str], None] = print, train: Callable[[Point, Callable], dict] = train_point) -> list[dict]:
    """Train every unfinished ladder and isoFLOP point, in order; returns the results records.

    A point whose loss becomes non-finite is reported and skipped (its directory keeps the error); the others
    still run. The prediction point is left to `predict`."""
    from gptjax.errors import NonFiniteLoss
    from tqdm.auto import tqdm

    sweep_dir = Path(sweep_dir)
    points, notes = plan_points(sw, sweep_dir, overrides)
    points = [p for p in points if p.group != "predict"]
    for n in notes:
        log(f"note: {n}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(json.dumps(dataclasses.asdict(sw), indent=2) + "\n")
    todo = [p for p in points if not is_finished(p)]
    log(f"sweep {sw.name}: {len(points)} points, {len(points) - len(todo)} already finished, {len(todo)} to train "
        f"in {sweep_dir}")
    total = sum(p.flops for p in points) / 1e12
    bar = tqdm(total=total, initial=total - sum(p.flops for p in todo) / 1e12, unit="TFLOP", unit_scale=False,
               bar_format="{l_bar}{bar}| {n:.3g}/{total:.3g} TFLOP [{elapsed}<{remaining}{postfix}]",
               desc=f"sweep {sw.name}", dynamic_ncols=True, position=0)
    failed = []
    try:
        for i, p in enumerate(todo):
            bar.set_postfix_str(f"{i + 1}/{len(todo)} {p.name}", refresh=True)
            try:
                train(p, lambda s: bar.write(s))
            except NonFiniteLoss as e:
                bar.write(f"point {p.name} failed: {e}")
                (Path(p.cfg.run_dir) / "failed.txt").write_text(str(e) + "\n")
                failed.append(p.name)
            bar.update(p.flops / 1e12)
            write_results(sw, points, sweep_dir)
    finally:
        bar.close()
    recs = write_results(sw, points, sweep_dir)
    if failed:
        raise NonFiniteLoss(f"{len(failed)} point(s) diverged: {', '.join(failed)}; lower their lr in the sweep "
                            f"config, delete their directories and rerun (finished points are kept)")
    log(f"sweep {sw.name}: {len(recs)} points in {sweep_dir / 'results.jsonl'}")
    return recs


def load_results(sweep_dir: str | Path, name: str = "NAME") -> list[dict]:
    path = Path(sweep_dir) / "results.jsonl"
    if not path.exists():
        raise SweepError(f"no results in {sweep_dir} ({path.name} is missing): run `python scaling.py sweep {name}` "
                         f"first, or pass the sweep's --dir")
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not recs:
        raise SweepError(f"{path} holds no finished points yet: run the sweep first")
    return recs
