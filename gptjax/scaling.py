"""Scaling laws: sweep a ladder of model sizes and token budgets, fit L(N), L(C) and L(N, D), predict.

A sweep is a JSON file in `configs/sweeps/` (not `configs/`, whose files are training presets). It names a
base preset and overrides shared by every point (data, vocabulary, context, batch: the token cache is keyed
on data and vocabulary, so it is built once), a table of model sizes, and which points to train:

- `ladder`: every listed size at a fixed token count, or a fixed number of tokens per parameter;
- `isoflop`: for each compute budget C, every listed size at D = C / (6 N) tokens;
- `predict`: one larger configuration, trained only by `predict`, after its loss has been predicted from
  the points with at most a tenth of its compute (GPT-4 report, section 3).

Conventions. N is the non-embedding parameter count unless `n_count` says "total"; D counts training tokens;
C = 6 N D (Kaplan et al. 2020). The exact training FLOPs (attention and the output layer included,
`flops.flops_per_token`) are recorded beside C: they are what a run costs, and what the 10x rule of
`predict` is measured in. Losses are held-out nats per token (the vocabulary is the same for every point).

Every point is an ordinary run directory `SWEEP_DIR/<point>`; a point with a summary.json is finished and
skipped, so rerunning a sweep resumes it. `SWEEP_DIR/results.jsonl` holds one record per finished point.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gptjax import config as config_lib
from gptjax.config import ConfigError, TrainConfig

HUBER_DELTA = 1e-3
N_COUNTS = ("non_embedding", "total")


class SweepError(ValueError):
    """A sweep config, sweep directory or results file cannot be used; the message says how to fix it."""


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


def _build(cls, d: Any, where: str):
    """A frozen dataclass from a JSON mapping: unknown keys and wrong types are errors naming the key."""
    if not isinstance(d, dict):
        raise SweepError(f"'{where}' must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        if k not in hints:
            raise SweepError(f"unknown key '{where}.{k}'{_near(k, hints)} (valid: {', '.join(hints)})")
        t = hints[k]
        key = f"{where}.{k}"
        if dataclasses.is_dataclass(t):
            kwargs[k] = _build(t, v, key)
        elif t == tuple[SizeSpec, ...]:
            if not isinstance(v, list):
                raise SweepError(f"'{key}' must be a list of sizes")
            kwargs[k] = tuple(_build(SizeSpec, s, f"{key}[{i}]") for i, s in enumerate(v))
        else:
            try:
                kwargs[k] = config_lib.coerce(key, t, v)
            except ConfigError as e:
                raise SweepError(str(e)) from None
    return cls(**kwargs)


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
    return validate_sweep(_build(SweepConfig, d, "sweep"))


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


def plan(sw: SweepConfig, sweep_dir: str | Path, overrides: list[str] | None = None) -> tuple[list[Point], list[str]]:
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
    from gptjax import trainer

    return trainer.run(p.cfg, log=log)


def sweep(sw: SweepConfig, sweep_dir: str | Path, overrides: list[str] | None = None, *,
          log: Callable[[str], None] = print, train: Callable[[Point, Callable], dict] = train_point) -> list[dict]:
    """Train every unfinished ladder and isoFLOP point, in order; returns the results records.

    A point whose loss becomes non-finite is reported and skipped (its directory keeps the error); the others
    still run. The prediction point is left to `predict`."""
    from tqdm.auto import tqdm

    from gptjax.trainer import NonFiniteLoss

    sweep_dir = Path(sweep_dir)
    points, notes = plan(sw, sweep_dir, overrides)
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


# ----------------------------------------------------------------------------------------------
# Fitting: log L = logsumexp_k(a_k - alpha_k * log x_k [, e]) with a summed Huber loss (Hoffmann et al. App. D.2)
#
# Every law here is a sum of power laws plus an optional constant: L(N) = (N_c/N)^alpha [+ E] is one term
# (a = alpha log N_c), L(C) = a C^b + c likewise, L(N, D) = E + A/N^alpha + B/D^beta two. Parameters are
# (a_1, alpha_1, ..., a_k, alpha_k[, e]) with E = exp(e).


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _predict_log(theta: np.ndarray, logx: np.ndarray, const: bool) -> tuple[np.ndarray, np.ndarray]:
    """log L and the softmax weights of the terms, for parameter rows theta [G, P] and features logx [n, k]."""
    k = logx.shape[1]
    a, alpha = theta[:, 0:2 * k:2], theta[:, 1:2 * k:2]  # [G, k]
    terms = a[:, None, :] - alpha[:, None, :] * logx[None, :, :]  # [G, n, k]
    if const:
        terms = np.concatenate([terms, np.broadcast_to(theta[:, None, 2 * k:], terms.shape[:2] + (1,))], axis=-1)
    m = terms.max(axis=-1, keepdims=True)
    w = np.exp(terms - m)
    s = w.sum(axis=-1, keepdims=True)
    return (m + np.log(s))[..., 0], w / s


def _residuals_and_jacobian(theta: np.ndarray, logx: np.ndarray, logy: np.ndarray, const: bool):
    pred, w = _predict_log(theta[None], logx, const)
    w = w[0]
    k = logx.shape[1]
    J = np.empty((len(logy), theta.size))
    for j in range(k):
        J[:, 2 * j] = w[:, j]
        J[:, 2 * j + 1] = -w[:, j] * logx[:, j]
    if const:
        J[:, 2 * k] = w[:, k]
    return pred[0] - logy, J


def _grid(k: int, const: bool, intercepts, exponents, consts) -> np.ndarray:
    axes = []
    for _ in range(k):
        axes += [np.asarray(intercepts, float), np.asarray(exponents, float)]
    if const:
        axes.append(np.asarray(consts, float))
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=-1)


def fit_lse(logx: np.ndarray, logy: np.ndarray, *, const: bool, grid: np.ndarray, delta: float = HUBER_DELTA,
            n_starts: int = 8, extra_starts: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Minimise the summed Huber loss of the log-space residuals from the `n_starts` best points of `grid` (every
    grid point is scored first, vectorised) plus `extra_starts`, keeping the best; returns (parameters, loss).

    Hoffmann et al. ran L-BFGS from every grid point. The objective here is the same, but the Huber loss with
    delta = 1e-3 is almost L1 on these residuals and L-BFGS crawls along its kinks; SciPy's trust-region least
    squares with its robust "huber" loss (f_scale = delta: exactly this Huber function) converges several
    times faster to the same minimum, which is what makes bootstrap intervals cheap."""
    from scipy.optimize import least_squares

    logx = np.asarray(logx, float).reshape(len(logy), -1)
    logy = np.asarray(logy, float)
    k = logx.shape[1]
    pred, _ = _predict_log(grid, logx, const)
    scores = _huber(pred - logy[None], delta).sum(axis=1)
    starts = grid[np.argsort(scores)[:n_starts]]
    if extra_starts is not None:
        starts = np.concatenate([np.atleast_2d(extra_starts), starts])
    # exponents stay non-negative (losses fall with scale); the constant's log stays finite
    lower = np.array([-np.inf, 0.0] * k + ([-20.0] if const else []))
    upper = np.array([np.inf, 10.0] * k + ([20.0] if const else []))
    cache: dict = {}

    def fun(th):
        cache["key"], (cache["r"], cache["J"]) = th.tobytes(), _residuals_and_jacobian(th, logx, logy, const)
        return cache["r"]

    def jac(th):
        return cache["J"] if cache.get("key") == th.tobytes() else _residuals_and_jacobian(th, logx, logy, const)[1]

    best, best_f = None, math.inf
    for x0 in starts:
        res = least_squares(fun, np.clip(x0, lower, upper), jac=jac, bounds=(lower, upper), loss="huber",
                            f_scale=delta, method="trf", xtol=1e-9, ftol=1e-9, gtol=1e-9, max_nfev=500)
        f = float(_huber(res.fun, delta).sum())
        if f < best_f:
            best, best_f = res.x, f
    return best, best_f


# Starting grids. Chinchilla's (App. D.2): alpha, beta in {0, .5, ..., 2}, e in {-1, -.5, ..., 1},
# a, b in {0, 5, ..., 25}.
CHINCHILLA_GRID = dict(intercepts=np.arange(0, 26, 5), exponents=np.arange(0, 2.01, 0.5), consts=np.arange(-1, 1.01, 0.5))
POWER_GRID = dict(intercepts=np.arange(0, 30.1, 2.5), exponents=(0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 1.0, 2.0),
                  consts=np.arange(-1, 2.01, 0.5))


def _bootstrap(fit_one: Callable[[np.ndarray, np.ndarray | None], np.ndarray], n_points: int, best: np.ndarray,
               n: int, seed: int) -> np.ndarray:
    """Parameter vectors refitted on `n` resamples of the points (with replacement)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        idx = rng.integers(0, n_points, n_points)
        if len(np.unique(idx)) < max(3, len(best)):  # fewer distinct points than parameters: underdetermined
            continue
        out.append(fit_one(idx, best))
    return np.array(out)


def _ci(samples: np.ndarray, level: float = 0.95) -> list[float]:
    lo, hi = np.percentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def fit_power_law(x, L, *, offset: bool = True, bootstrap: int = 0, seed: int = 0, n_starts: int = 8) -> dict:
    """L(x) = (x_c / x)^alpha + E (E = 0 without `offset`), fitted in log space with the Huber loss.

    Returns alpha, x_c, E, a (= alpha log x_c) and, with `bootstrap` resamples, 95% intervals in `ci`."""
    x, L = np.asarray(x, float), np.asarray(L, float)
    if len(x) < (3 if offset else 2):
        raise SweepError(f"a power law{' with an offset' if offset else ''} needs at least {3 if offset else 2} "
                         f"points, got {len(x)}")
    grid = _grid(1, offset, **POWER_GRID)
    logx, logy = np.log(x)[:, None], np.log(L)

    def fit_one(idx, start):
        return fit_lse(logx[idx], logy[idx], const=offset, grid=grid, n_starts=1 if start is not None else n_starts,
                       extra_starts=start)[0]

    theta, obj = fit_lse(logx, logy, const=offset, grid=grid, n_starts=n_starts)
    out = _power_params(theta, offset)
    out.update(objective=obj, points=len(x))
    if bootstrap:
        samples = [_power_params(t, offset) for t in _bootstrap(fit_one, len(x), theta, bootstrap, seed)]
        out["ci"] = {k: _ci(np.array([s[k] for s in samples])) for k in ("alpha", "x_c", "E")}
        out["bootstrap"] = len(samples)
    return out


def _power_params(theta, offset) -> dict:
    a, alpha = float(theta[0]), float(theta[1])
    return {"a": a, "alpha": alpha, "x_c": math.exp(a / alpha) if alpha > 1e-12 else math.inf,
            "E": math.exp(float(theta[2])) if offset else 0.0}


def power_law(p: dict, x):
    return p["E"] + np.exp(p["a"] - p["alpha"] * np.log(np.asarray(x, float)))


def fit_chinchilla(N, D, L, *, bootstrap: int = 0, seed: int = 0, n_starts: int = 8) -> dict:
    """L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3), fitted in log space with the
    summed Huber loss (delta = 1e-3) by L-BFGS from the best points of their grid of starting values.

    Returns E, A, B, alpha, beta, the compute-optimal exponents a = beta / (alpha + beta) (N_opt ~ C^a) and
    b = alpha / (alpha + beta) (D_opt ~ C^b) and, with `bootstrap` resamples, 95% intervals in `ci`."""
    N, D, L = (np.asarray(v, float) for v in (N, D, L))
    if len(L) < 5:
        raise SweepError(f"the L(N, D) fit has 5 parameters and needs at least 5 points (6+ to mean anything), "
                         f"got {len(L)}")
    grid = _grid(2, True, **CHINCHILLA_GRID)
    logx, logy = np.stack([np.log(N), np.log(D)], axis=-1), np.log(L)

    def fit_one(idx, start):
        return fit_lse(logx[idx], logy[idx], const=True, grid=grid, n_starts=1 if start is not None else n_starts,
                       extra_starts=start)[0]

    theta, obj = fit_lse(logx, logy, const=True, grid=grid, n_starts=n_starts)
    out = _chinchilla_params(theta)
    out.update(objective=obj, points=len(L))
    if bootstrap:
        samples = [_chinchilla_params(t) for t in _bootstrap(fit_one, len(L), theta, bootstrap, seed)]
        out["ci"] = {k: _ci(np.array([s[k] for s in samples])) for k in ("E", "A", "B", "alpha", "beta", "a", "b")}
        out["samples"] = samples
        out["bootstrap"] = len(samples)
    return out


def _chinchilla_params(theta) -> dict:
    A, alpha, B, beta, E = math.exp(theta[0]), float(theta[1]), math.exp(theta[2]), float(theta[3]), math.exp(theta[4])
    s = alpha + beta
    return {"E": E, "A": A, "B": B, "alpha": alpha, "beta": beta,
            "a": beta / s if s > 0 else math.nan, "b": alpha / s if s > 0 else math.nan}


def chinchilla_loss(p: dict, N, D):
    N, D = np.asarray(N, float), np.asarray(D, float)
    return p["E"] + p["A"] / N ** p["alpha"] + p["B"] / D ** p["beta"]


def compute_optimal(p: dict, C):
    """N_opt(C), D_opt(C) minimising L(N, D) subject to 6 N D = C (Hoffmann et al. eq. 4):
    N_opt = G (C/6)^a, D_opt = (C/6)^b / G, G = (alpha A / (beta B))^(1 / (alpha + beta))."""
    C = np.asarray(C, float)
    s = p["alpha"] + p["beta"]
    G = (p["alpha"] * p["A"] / (p["beta"] * p["B"])) ** (1.0 / s)
    return G * (C / 6) ** (p["beta"] / s), (C / 6) ** (p["alpha"] / s) / G


def frontier(points: list[dict], key: str = "C") -> list[dict]:
    """The points no cheaper point beats: each has a lower loss than every point with less compute."""
    best, out = math.inf, []
    for r in sorted(points, key=lambda r: r[key]):
        if r["val_loss"] < best:
            out.append(r)
            best = r["val_loss"]
    return out


def isoflop_minima(points: list[dict]) -> list[dict]:
    """Per isoFLOP budget with 3+ sizes: a parabola in log N through the losses, and its minimum (Hoffmann et
    al. approach 2)."""
    out = []
    for budget in sorted({r["budget"] for r in points if r.get("budget")}):
        rs = sorted((r for r in points if r.get("budget") == budget), key=lambda r: r["N"])
        if len({r["N"] for r in rs}) < 3:
            continue
        x = np.log([r["N"] for r in rs])
        c2, c1, c0 = np.polyfit(x, [r["val_loss"] for r in rs], 2)
        inside = c2 > 0 and x.min() <= -c1 / (2 * c2) <= x.max()
        xm = -c1 / (2 * c2) if inside else x[int(np.argmin([r["val_loss"] for r in rs]))]
        out.append({"budget": budget, "N_opt": float(math.exp(xm)), "D_opt": float(budget / (6 * math.exp(xm))),
                    "loss": float(c0 + c1 * xm + c2 * xm * xm) if inside else float(min(r["val_loss"] for r in rs)),
                    "parabola": [float(c2), float(c1), float(c0)], "interior": bool(inside)})
    return out


def fit_all(recs: list[dict], *, bootstrap: int = 200, seed: int = 0, n_count: str | None = None) -> dict:
    """Every fit the records support: L(N) on the ladder, L(C) on the frontier, L(N, D) on everything,
    isoFLOP minima and compute-optimal allocations."""
    if n_count:
        recs = [dict(r, N=r[f"N_{n_count}"], C=6.0 * r[f"N_{n_count}"] * r["tokens"]) for r in recs]
    out: dict[str, Any] = {"points": len(recs), "n_count": n_count or "as recorded", "huber_delta": HUBER_DELTA,
                           "bootstrap": bootstrap}
    ladder = [r for r in recs if r["group"] == "ladder"]
    if len({r["N"] for r in ladder}) >= 3:
        out["L_N"] = fit_power_law([r["N"] for r in ladder], [r["val_loss"] for r in ladder], offset=True,
                                   bootstrap=bootstrap, seed=seed)
        out["L_N_no_offset"] = fit_power_law([r["N"] for r in ladder], [r["val_loss"] for r in ladder],
                                             offset=False, bootstrap=bootstrap, seed=seed)
        out["L_N"]["tokens"] = sorted({r["tokens"] for r in ladder})
    front = frontier(recs)
    if len(front) >= 4:
        out["L_C"] = fit_power_law([r["C"] for r in front], [r["val_loss"] for r in front], offset=True,
                                   bootstrap=bootstrap, seed=seed)
        out["L_C"]["frontier"] = [r["name"] for r in front]
        p = out["L_C"]
        p.update(a_coef=math.exp(p["a"]), b_exp=-p["alpha"], c=p["E"])  # L(C) = a C^b + c
    if len(recs) >= 5:
        ch = fit_chinchilla([r["N"] for r in recs], [r["tokens"] for r in recs], [r["val_loss"] for r in recs],
                            bootstrap=bootstrap, seed=seed)
        ch.pop("samples", None)
        Cs = sorted({r["C"] for r in recs})
        ch["compute_optimal"] = [{"C": c, "N_opt": float(n), "D_opt": float(d)}
                                 for c in (Cs[0], Cs[-1], 10 * Cs[-1]) for n, d in [compute_optimal(ch, c)]]
        out["L_ND"] = ch
    out["isoflop_minima"] = isoflop_minima(recs)
    return out


def summarize_fits(f: dict) -> str:
    lines = [f"{f['points']} points; Huber delta {f['huber_delta']}, {f['bootstrap']} bootstrap resamples "
             f"(95% intervals in brackets)"]

    def ci(p, k, fmt="{:.3g}"):
        c = p.get("ci", {}).get(k)
        return (fmt.format(p[k]) + (f" [{fmt.format(c[0])}, {fmt.format(c[1])}]" if c else ""))

    if "L_N" in f:
        p = f["L_N"]
        lines.append(f"L(N) = (N_c/N)^alpha_N + E on the ladder: alpha_N = {ci(p, 'alpha')}, "
                     f"N_c = {ci(p, 'x_c')}, E = {ci(p, 'E')}   (Kaplan et al.: alpha_N ~ 0.076, no E)")
        q = f["L_N_no_offset"]
        lines.append(f"L(N) = (N_c/N)^alpha_N:      alpha_N = {ci(q, 'alpha')}, N_c = {ci(q, 'x_c')}")
    if "L_C" in f:
        p = f["L_C"]
        lines.append(f"L(C) = a C^b + c on the {len(p['frontier'])}-point frontier: a = {p['a_coef']:.4g}, "
                     f"b = {-p['alpha']:.4g} [{-p['ci']['alpha'][1]:.3g}, {-p['ci']['alpha'][0]:.3g}]"
                     if "ci" in p else f"L(C) = a C^b + c: a = {p['a_coef']:.4g}, b = {-p['alpha']:.4g}")
        lines[-1] += f", c = {ci(p, 'E')}"
    if "L_ND" in f:
        p = f["L_ND"]
        lines.append(f"L(N, D) = E + A/N^alpha + B/D^beta: E = {ci(p, 'E')}, A = {ci(p, 'A')}, B = {ci(p, 'B')}, "
                     f"alpha = {ci(p, 'alpha')}, beta = {ci(p, 'beta')}   (Chinchilla: 1.69, 406.4, 410.7, 0.34, 0.28)")
        lines.append(f"compute-optimal: N_opt ~ C^{ci(p, 'a')}, D_opt ~ C^{ci(p, 'b')}   (Chinchilla: 0.46, 0.54)")
        for c in p["compute_optimal"]:
            lines.append(f"  C = {c['C']:.3g}: N_opt = {c['N_opt']:.3g}, D_opt = {c['D_opt']:.3g} "
                         f"({c['D_opt'] / c['N_opt']:.3g} tokens per parameter)")
    for m in f.get("isoflop_minima", []):
        lines.append(f"isoFLOP C = {m['budget']:.3g}: loss-minimising N ~ {m['N_opt']:.3g} "
                     f"(D ~ {m['D_opt']:.3g}){'' if m['interior'] else ', at the edge of the sizes tried'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Prediction, GPT-4 style


def predict(sw: SweepConfig, sweep_dir: str | Path, overrides: list[str] | None = None, *, train: bool = True,
            min_ratio: float = 10.0, bootstrap: int = 200, seed: int = 0, log: Callable[[str], None] = print,
            train_fn: Callable[[Point, Callable], dict] = train_point) -> dict:
    """Fit L(N, D) and L(C) on the finished points with at most a tenth of the prediction point's exact FLOPs,
    write the predicted loss to SWEEP_DIR/prediction.json, then (with `train`) train the point and add the
    measured loss and the error. A prediction already on disk for the same point is kept, never refitted."""
    sweep_dir = Path(sweep_dir)
    points, _ = plan(sw, sweep_dir, overrides)
    target = [p for p in points if p.group == "predict"]
    if not target:
        raise SweepError(f"sweep '{sw.name}' declares no prediction point: add \"predict\": {{\"size\": ..., "
                         f"\"tokens\": ...}} to its config")
    (p,) = target[:1]
    path = sweep_dir / "prediction.json"
    pred = json.loads(path.read_text()) if path.exists() else None
    if pred is not None and pred.get("point") != p.name:
        raise SweepError(f"{path} predicts another point ({pred.get('point')}, not {p.name}); move it away to "
                         f"predict again")
    if pred is None:
        if is_finished(p):
            raise SweepError(f"{p.cfg.run_dir} is already trained but no prediction was recorded before: a "
                             f"prediction made now would not be blind; delete that directory to predict and train it")
        threshold = sw.predict.threshold or p.flops / min_ratio
        recs = [r for r in load_results(sweep_dir, sw.name) if r["flops"] <= threshold]
        if len(recs) < 6:
            raise SweepError(f"only {len(recs)} finished points have at most {threshold:.3g} FLOPs (the prediction "
                             f"point's {p.flops:.3g} / {min_ratio:g}); the L(N, D) fit needs 6 or more: run "
                             f"`python scaling.py sweep {sw.name}` first")
        ratio = p.flops / max(r["flops"] for r in recs)
        if ratio < min_ratio:
            raise SweepError(f"the prediction point has only {ratio:.2f}x the FLOPs of the largest point fitted "
                             f"(need {min_ratio:g}x): lower predict.threshold or enlarge the point")
        n_count = sw.n_count
        N, D = p.n(n_count), p.tokens
        ch = fit_chinchilla([r["N"] for r in recs], [r["tokens"] for r in recs], [r["val_loss"] for r in recs],
                            bootstrap=bootstrap, seed=seed)
        samples = ch.pop("samples", [])
        loss_nd = float(chinchilla_loss(ch, N, D))
        pred = {"point": p.name, "size": p.size, "N": N, "N_non_embedding": p.n_non_embedding, "N_total": p.n_total,
                "tokens": D, "C": 6.0 * N * D, "flops": p.flops, "threshold_flops": threshold,
                "compute_ratio": ratio, "compute_ratio_6ND": 6.0 * N * D / max(r["C"] for r in recs),
                "fitted_points": [r["name"] for r in recs], "fit_L_ND": ch,
                "predicted_loss": loss_nd, "made_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        if samples:
            pred["predicted_loss_ci"] = _ci(np.array([float(chinchilla_loss(s, N, D)) for s in samples]))
        front = frontier(recs)
        if len(front) >= 4:
            lc = fit_power_law([r["C"] for r in front], [r["val_loss"] for r in front], offset=True)
            pred["fit_L_C"] = lc
            pred["predicted_loss_L_C"] = float(power_law(lc, 6.0 * N * D))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(pred, indent=2) + "\n")
        log(f"predicted before training {p.name} (N = {N:,}, D = {D:,}, {ratio:.1f}x the FLOPs of the largest of "
            f"{len(recs)} fitted points): loss {loss_nd:.4f}"
            + (f" [{pred['predicted_loss_ci'][0]:.4f}, {pred['predicted_loss_ci'][1]:.4f}]"
               if "predicted_loss_ci" in pred else "")
            + (f"; L(C) fit says {pred['predicted_loss_L_C']:.4f}" if "predicted_loss_L_C" in pred else "")
            + f"  -> {path}")
    else:
        log(f"prediction made at {pred['made_at']} kept: loss {pred['predicted_loss']:.4f}")
    if not train:
        return pred
    if not is_finished(p):
        log(f"training {p.name}: {p.cfg.steps} steps, {p.flops:.3g} FLOPs")
        train_fn(p, log)
    actual = record(p, sw.n_count)
    pred["actual_loss"] = actual["val_loss"]
    pred["actual_bits_per_byte"] = actual["val_bits_per_byte"]
    pred["train_seconds"] = actual["train_seconds"]
    pred["error"] = pred["predicted_loss"] - actual["val_loss"]
    pred["relative_error"] = pred["error"] / actual["val_loss"]
    if "predicted_loss_L_C" in pred:
        pred["error_L_C"] = pred["predicted_loss_L_C"] - actual["val_loss"]
    if "predicted_loss_ci" in pred:
        lo, hi = pred["predicted_loss_ci"]
        pred["actual_within_ci"] = bool(lo <= actual["val_loss"] <= hi)
    path.write_text(json.dumps(pred, indent=2) + "\n")
    log(f"{p.name}: predicted {pred['predicted_loss']:.4f}, measured {actual['val_loss']:.4f}: error "
        f"{pred['error']:+.4f} nats/token ({pred['relative_error']:+.2%})")
    return pred


# ----------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)


def _finish(fig, ax, xlabel: str, title: str, path: Path, *, log_y: bool = True) -> Path:
    """Log axes, labels, a legend where something is labelled; save the PNG and close the figure."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot(sweep_dir: str | Path, out_dir: str | Path | None = None, fits: dict | None = None) -> list[Path]:
    """loss_vs_compute.png, loss_vs_n.png and isoflop.png from results.jsonl (and fits.json, prediction.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir or sweep_dir / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    recs = load_results(sweep_dir)
    if fits is None:
        fp = sweep_dir / "fits.json"
        fits = json.loads(fp.read_text()) if fp.exists() else fit_all(recs, bootstrap=0)
    pred_path = sweep_dir / "prediction.json"
    pred = json.loads(pred_path.read_text()) if pred_path.exists() else None
    sizes = sorted({r["N"] for r in recs})
    cmap = plt.get_cmap("viridis")
    color = {n: cmap(i / max(len(sizes) - 1, 1)) for i, n in enumerate(sizes)}
    written = []

    # loss vs compute, with the L(C) fit and the L(N, D) compute-optimal frontier
    fig, ax = plt.subplots(figsize=(7, 5))
    for r in recs:
        ax.scatter(r["C"], r["val_loss"], color=color[r["N"]], marker="o" if r["group"] == "ladder" else "s", s=28)
    Cs = np.array([r["C"] for r in recs] + ([pred["C"]] if pred else []))
    grid = np.geomspace(Cs.min() / 1.5, Cs.max() * 1.5, 200)
    if "L_C" in fits:
        ax.plot(grid, power_law(fits["L_C"], grid), "k--", lw=1,
                label=f"L(C) = a C^{-fits['L_C']['alpha']:.3f} + {fits['L_C']['E']:.2f} (frontier fit)")
    if "L_ND" in fits:
        n, d = compute_optimal(fits["L_ND"], grid)
        ax.plot(grid, chinchilla_loss(fits["L_ND"], n, d), "r-", lw=1.2, label="compute-optimal L(N_opt, D_opt)")
    if pred:
        lo, hi = pred.get("predicted_loss_ci", [pred["predicted_loss"]] * 2)
        ax.errorbar(pred["C"], pred["predicted_loss"], yerr=[[pred["predicted_loss"] - lo], [hi - pred["predicted_loss"]]],
                    fmt="*", color="tab:orange", ms=12, capsize=3, label="predicted (fit on <= 1/10 compute)")
        if "actual_loss" in pred:
            ax.scatter(pred["C"], pred["actual_loss"], marker="x", color="tab:red", s=80, label="measured", zorder=5)
    written.append(_finish(fig, ax, "C = 6 N D (FLOPs)", "loss vs compute (circles: ladder, squares: isoFLOP; colour: N)",
                           out_dir / "loss_vs_compute.png"))

    # loss vs N on the ladder
    fig, ax = plt.subplots(figsize=(7, 5))
    ladder = [r for r in recs if r["group"] == "ladder"] or recs
    ax.scatter([r["N"] for r in ladder], [r["val_loss"] for r in ladder], color="k", zorder=3, label="ladder")
    ng = np.geomspace(min(r["N"] for r in ladder) / 1.5, max(r["N"] for r in ladder) * 1.5, 200)
    if "L_N" in fits:
        p = fits["L_N"]
        ax.plot(ng, power_law(p, ng), "b-", lw=1, label=f"(N_c/N)^{p['alpha']:.3f} + {p['E']:.2f}")
        q = fits["L_N_no_offset"]
        ax.plot(ng, power_law(q, ng), "b:", lw=1, label=f"(N_c/N)^{q['alpha']:.3f}")
    written.append(_finish(fig, ax, "N (parameters)", "loss vs model size", out_dir / "loss_vs_n.png"))

    # isoFLOP curves
    fig, ax = plt.subplots(figsize=(7, 5))
    budgets = sorted({r["budget"] for r in recs if r.get("budget")})
    bc = {b: plt.get_cmap("plasma")(i / max(len(budgets), 1)) for i, b in enumerate(budgets)}
    minima = {m["budget"]: m for m in fits.get("isoflop_minima", [])}
    for b in budgets:
        rs = sorted((r for r in recs if r.get("budget") == b), key=lambda r: r["N"])
        ax.plot([r["N"] for r in rs], [r["val_loss"] for r in rs], "o", color=bc[b], label=f"C = {b:.2g}")
        if b in minima:
            c2, c1, c0 = minima[b]["parabola"]
            x = np.linspace(math.log(rs[0]["N"]), math.log(rs[-1]["N"]), 100)
            ax.plot(np.exp(x), c0 + c1 * x + c2 * x * x, "-", color=bc[b], lw=1)
            ax.plot(minima[b]["N_opt"], minima[b]["loss"], "v", color=bc[b], ms=9)
        if "L_ND" in fits:
            x = np.geomspace(rs[0]["N"], rs[-1]["N"], 100)
            ax.plot(x, chinchilla_loss(fits["L_ND"], x, b / (6 * x)), "--", color=bc[b], lw=0.8)
    written.append(_finish(fig, ax, "N (parameters)", "isoFLOP curves (solid: parabola, dashed: L(N, D) fit, "
                           "triangle: minimum)", out_dir / "isoflop.png", log_y=False))
    return written
