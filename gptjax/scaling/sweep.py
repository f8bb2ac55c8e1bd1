"""Sweep configs, the points they plan (each an ordinary TrainConfig), training them, and their results."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gptjax import config as config_lib
from gptjax.config import ConfigError, TrainConfig
from gptjax.errors import SweepError

N_COUNTS = ("non_embedding", "total")
MEASURES = ("6ND", "flops")  # what an isoFLOP budget counts: C = 6 N D (N per n_count), or the exact FLOPs


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
    lr: float = 0.0  # 0 means the learning rate tuned by lr_sweep (when the sweep has one), else the base's optim.lr


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
    measure: str = "6ND"  # "6ND": budgets are C = 6 N D; "flops": budgets are exact training FLOPs
    # per-budget size lists (a window around each budget's optimum), overriding `sizes`; keys as in "budgets"
    sizes_by_budget: tuple[tuple[str, ...], ...] = ()


@dataclass(frozen=True)
class LrSweepSpec:
    """Learning rates tried per size at one compute budget (exact FLOPs). The tuned rate of every size is the
    power law lr(N_total) = c N^-p fitted through each size's best rate (a parabola in log lr around the best
    grid point), so noise in one size's sweep does not pick its rate, and sizes not swept (the prediction
    point) get the law's rate."""
    lrs: tuple[float, ...] = ()
    budget: float = 0.0
    sizes: tuple[str, ...] = ()  # () means every size except the prediction point's


@dataclass(frozen=True)
class ExtraSeedsSpec:
    seeds: tuple[int, ...] = ()
    points: tuple[str, ...] = ()  # point names (as planned with the first seed) to train again with each seed


@dataclass(frozen=True)
class CapabilitySpec:
    """A task metric measured on every finished point: the mean negative log-probability of the correct choice
    (-E[log p(correct)], softmax over the choices' likelihoods) on a built-in multiple-choice task, the
    quantity GPT-4's report (section 3.2) fitted as a power law in compute. On code-cloze p(correct) is the
    model's probability of the target identifier's tokens (the chance that a sample starts with exactly those
    tokens, the analogue of a pass rate); on code-nextline it is the softmax over the four choices'
    log-likelihoods."""
    task: str = ""  # "" means none; "code-cloze" or "code-nextline"
    items: int = 400


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
    lr_sweep: LrSweepSpec = field(default_factory=LrSweepSpec)
    extra_seeds: ExtraSeedsSpec = field(default_factory=ExtraSeedsSpec)
    capability: CapabilitySpec = field(default_factory=CapabilitySpec)


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
    by_budget = [n for ns in sw.isoflop.sizes_by_budget for n in ns]
    for where, sizes in (("ladder", sw.ladder.sizes), ("isoflop", tuple(sw.isoflop.sizes) + tuple(by_budget)),
                         ("predict", (sw.predict.size,)), ("lr_sweep", sw.lr_sweep.sizes)):
        for n in sizes:
            need(not n or n in names, f"{where} names an unknown size '{n}'{_near(n, names)}")
    need(not (sw.ladder.tokens and sw.ladder.tokens_per_param), "ladder: give tokens or tokens_per_param, not both")
    need(not (sw.predict.tokens and sw.predict.tokens_per_param), "predict: give tokens or tokens_per_param, not both")
    need(all(b > 0 for b in sw.isoflop.budgets), "isoflop budgets must be positive")
    need(sw.isoflop.measure in MEASURES, f"isoflop.measure must be one of {MEASURES}, got '{sw.isoflop.measure}'")
    need(not sw.isoflop.sizes_by_budget or len(sw.isoflop.sizes_by_budget) == len(sw.isoflop.budgets),
         f"isoflop.sizes_by_budget lists {len(sw.isoflop.sizes_by_budget)} size lists for "
         f"{len(sw.isoflop.budgets)} budgets: give one list per budget")
    lr = sw.lr_sweep
    need(not lr.lrs or (lr.budget > 0 and len(lr.lrs) >= 3 and all(x > 0 for x in lr.lrs)),
         "lr_sweep needs 3 or more positive 'lrs' and a positive 'budget' (exact FLOPs)")
    need(sw.capability.task in ("", "code-cloze", "code-nextline"),
         f"capability.task must be '', 'code-cloze' or 'code-nextline', got '{sw.capability.task}'")
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
    budget: float | None  # the isoFLOP budget (C = 6ND or exact FLOPs, per isoflop.measure), None elsewhere
    cfg: TrainConfig
    n_non_embedding: int
    n_total: int
    flops_per_token: float
    lr_pending: bool = False  # its rate comes from the lr sweep, which has not finished yet

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


def _budget_name(budget: float) -> str:
    """iso1e11, iso1.5e11, iso3e12: the budget to two significant digits."""
    return "iso" + f"{budget:.2g}".replace("+", "").replace("e0", "e")


def plan_points(sw: SweepConfig, sweep_dir: str | Path, overrides: list[str] | None = None,
                tuned: dict[str, float] | None = None) -> tuple[list[Point], list[str]]:
    """Every point of the sweep (learning-rate points first, the prediction point last), and notes on points
    left out. Sizes whose rate the lr sweep tunes take it from `tuned` (default: SWEEP_DIR/lr.json when the lr
    sweep has finished); until then they are planned with the base rate and marked `lr_pending`."""
    from gptjax import flops as flops_lib

    sweep_dir = Path(sweep_dir)
    sizes = {size_name(s): s for s in sw.sizes}
    try:
        base = config_lib.resolve(sw.base, list(sw.overrides) + list(overrides or []))
    except ConfigError as e:
        raise SweepError(f"sweep '{sw.name}': {e}") from None
    tps = base.tokens_per_step
    counts_cache: dict[str, tuple[TrainConfig, dict, float]] = {}
    if tuned is None and sw.lr_sweep.lrs:
        path = sweep_dir / "lr.json"
        if path.exists():
            saved = json.loads(path.read_text())
            # tuned by another lr sweep (its rates, budget or sizes changed): tune again
            tuned = saved["tuned"] if saved.get("spec") == _lr_spec(sw) else None

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
    left_out: dict[str, str] = {}

    def add(group: str, name: str, size: str, tokens: float, budget: float | None, *, lr: float = 0.0,
            seeds=None):
        cfg0, counts, fpt = sized(size)
        steps = max(int(round(tokens / tps)), 1)
        if steps < sw.min_steps:
            notes.append(f"left out {name}: {_fmt_tokens(tokens)} tokens is {steps} steps of {tps} tokens "
                         f"(min_steps={sw.min_steps})")
            left_out[name] = f"min_steps={sw.min_steps}"
            return
        s = sizes[size]
        pending = False
        if not lr:
            lr = s.lr
        if not lr and sw.lr_sweep.lrs:
            pending = tuned is None
            if tuned and size not in tuned:  # ({} plans the lr points alone, without tuned rates)
                raise SweepError(f"sweep '{sw.name}': {sweep_dir / 'lr.json'} has no tuned rate for size '{size}' "
                                 f"(added since the lr sweep ran?): delete lr.json to tune again, or give the "
                                 f"size an explicit lr")
            lr = 0.0 if pending else tuned.get(size, 0.0)
        for seed in seeds or sw.seeds:
            pname = name + (f"-s{seed}" if seeds or len(sw.seeds) > 1 else "")
            ov = [f"steps={steps}", f"seed={seed}", f"run_dir={sweep_dir / pname}",
                  f"optim.warmup_steps={max(1, int(round(sw.warmup_fraction * steps)))}"]
            if lr:
                ov.append(f"optim.lr={lr:.6g}")
            cfg = config_lib.apply_overrides(cfg0, ov)
            points.append(Point(pname, group, size, seed, budget, cfg, counts["non_embedding"], counts["total"], fpt,
                                lr_pending=pending))

    default_sizes = [n for n in sizes if n != sw.predict.size]
    lrs = sw.lr_sweep
    for n in (lrs.sizes or default_sizes) if lrs.lrs else ():
        for lr in lrs.lrs:
            add("lr", f"lr{lr:g}-{n}", n, lrs.budget / sized(n)[2], lrs.budget, lr=lr)
    lad = sw.ladder
    if lad.tokens or lad.tokens_per_param:
        for n in lad.sizes or default_sizes:
            tokens = lad.tokens or lad.tokens_per_param * sized(n)[1][sw.n_count]
            add("ladder", f"ladder-{n}", n, tokens, None)
    iso = sw.isoflop
    for i, budget in enumerate(iso.budgets):
        for n in (iso.sizes_by_budget[i] if iso.sizes_by_budget else iso.sizes or default_sizes):
            per_token = sized(n)[2] if iso.measure == "flops" else 6 * sized(n)[1][sw.n_count]
            tokens = budget / per_token
            if iso.max_tokens and tokens > iso.max_tokens:
                left_out[f"{_budget_name(budget)}-{n}"] = f"isoflop.max_tokens={iso.max_tokens}"
                notes.append(f"left out {_budget_name(budget)}-{n}: {_fmt_tokens(tokens)} tokens is more than "
                             f"isoflop.max_tokens={iso.max_tokens}")
                continue
            add("isoflop", f"{_budget_name(budget)}-{n}", n, tokens, budget)
    extra = sw.extra_seeds
    if extra.seeds:
        by_name = {p.name: p for p in points}
        for name in extra.points:
            if name in left_out:
                raise SweepError(f"sweep '{sw.name}': extra_seeds names {name}, which the sweep leaves out "
                                 f"({left_out[name]}): name a point the sweep trains (see --dry-run)")
            if name not in by_name:
                raise SweepError(f"sweep '{sw.name}': extra_seeds names an unknown point '{name}'"
                                 f"{_near(name, by_name)}")
            q = by_name[name]
            if q.group == "lr":
                raise SweepError(f"sweep '{sw.name}': extra_seeds names the lr-sweep point {name}; the lr sweep "
                                 f"takes one seed per rate: name isoFLOP or ladder points")
            more = [s for s in extra.seeds if s not in sw.seeds]  # seeds the sweep already trains are not extra
            if more:
                add(q.group, name, q.size, q.tokens, q.budget, seeds=more)
    p = sw.predict
    if p.size:
        tokens = p.tokens or p.tokens_per_param * sized(p.size)[1][sw.n_count]
        if not tokens:
            raise SweepError(f"sweep '{sw.name}': predict needs tokens or tokens_per_param")
        add("predict", f"predict-{p.size}", p.size, tokens, None)
    return points, notes


def tune_lrs(sw: SweepConfig, points: list[Point]) -> dict:
    """The lr sweep's result from its finished points: each size's best rate (a parabola in log lr through the
    best grid point and its neighbours, when the best is not at the grid's edge) and the power law
    lr(N_total) = c N^-p through them, which gives every size its tuned rate."""

    import numpy as np

    lr_points = [p for p in points if p.group == "lr"]
    by_size: dict[str, list[tuple[float, float]]] = {}
    n_total = {}
    for p in lr_points:
        s = json.loads((Path(p.cfg.run_dir) / "summary.json").read_text())
        loss = s["val_loss"] if math.isfinite(s.get("val_loss", math.nan)) else math.inf
        by_size.setdefault(p.size, []).append((p.cfg.optim.lr, loss))
        n_total[p.size] = p.n_total
    if not by_size:
        raise SweepError(f"sweep '{sw.name}': the lr sweep plans no points (every one is left out: raise "
                         f"lr_sweep.budget or lower min_steps)")
    best = {}
    for size, rows in by_size.items():
        rows.sort()
        i = int(np.argmin([r[1] for r in rows]))
        lr = rows[i][0]
        if 0 < i < len(rows) - 1 and all(math.isfinite(r[1]) for r in rows[i - 1:i + 2]):
            x = np.log([r[0] for r in rows[i - 1:i + 2]])
            c2, c1, _ = np.polyfit(x, [r[1] for r in rows[i - 1:i + 2]], 2)
            if c2 > 0:
                lr = float(math.exp(min(max(-c1 / (2 * c2), x[0]), x[-1])))
        best[size] = {"lr": float(lr), "grid_best": rows[i][0], "edge": i in (0, len(rows) - 1),
                      "losses": {f"{a:g}": b for a, b in rows}, "N_total": n_total[size]}
    sizes = sorted(best, key=lambda k: n_total[k])
    if len(sizes) >= 2:
        slope, icpt = np.polyfit(np.log([n_total[k] for k in sizes]), np.log([best[k]["lr"] for k in sizes]), 1)
    else:
        slope, icpt = 0.0, math.log(best[sizes[0]]["lr"])
    all_sizes = {p.size: p.n_total for p in points}
    tuned = {k: float(math.exp(icpt + slope * math.log(n))) for k, n in all_sizes.items()}
    return {"spec": _lr_spec(sw), "budget": sw.lr_sweep.budget, "lrs": list(sw.lr_sweep.lrs), "per_size": best,
            "edge_sizes": [k for k in sizes if best[k]["edge"]],
            "law": {"c": float(math.exp(icpt)), "p": float(-slope)}, "tuned": tuned}


def _lr_spec(sw: SweepConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(sw.lr_sweep)))


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


PINNED_SPEED = 0.65  # a point's speed on one pinned core / on two cores (measured: docs/scaling.md, --jobs)


def describe(points: list[Point], n_count: str = "non_embedding", tflops: float = 0.0, overhead_s: float = 0.0,
             jobs: int = 1) -> str:
    """A table of the planned points; with `tflops` (effective FLOP/s / 1e12 on every core), an estimated time
    each (plus `overhead_s` per point for compilation, evaluation, checkpoints and capability scoring). With
    `jobs` > 1 each sweep point runs on one core, at PINNED_SPEED of the every-core rate, `jobs` at a time; the
    prediction point (`predict` trains it alone, after the sweep) at the every-core rate."""
    rows = [f"{'point':<28} {'N':>9} {'steps':>6} {'D':>7} {'C=6ND':>9} {'FLOPs':>9} {'lr':>8}"
            + ("  est." if tflops else "")]
    pool = alone = 0.0
    for p in points:
        speed = tflops * (PINNED_SPEED if jobs > 1 and p.group != "predict" else 1.0)
        est = p.flops / (speed * 1e12) + overhead_s if tflops else 0.0
        if p.group == "predict":
            alone += est
        else:
            pool += est / max(jobs, 1)
        lr = "tuned" if p.lr_pending else f"{p.cfg.optim.lr:.3g}"
        rows.append(f"{p.name:<28} {_fmt_tokens(p.n(n_count)):>9} {p.cfg.steps:>6} {_fmt_tokens(p.tokens):>7} "
                    f"{6 * p.n(n_count) * p.tokens:>9.2e} {p.flops:>9.2e} {lr:>8}"
                    + (f"  {est / 60:5.1f} min" if tflops else ""))
    line = f"{len(points)} points, {sum(p.flops for p in points):.2e} training FLOPs"
    if tflops:
        par = f", {jobs} at a time on one core each" if jobs > 1 else ""
        line += (f", about {(pool + alone) / 60:.0f} min at {tflops} TFLOP/s + {overhead_s:g} s per point: "
                 f"{pool / 60:.0f} min for the sweep{par}"
                 + (f", {alone / 60:.0f} min for the prediction point (`predict`, alone)" if alone else ""))
    rows.append(line)
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
            "tokens_per_s": s.get("tokens_per_s"), "run_dir": str(p.cfg.run_dir),
            **_capability_fields(Path(p.cfg.run_dir))}


def _capability_fields(run_dir: Path) -> dict:
    path = run_dir / "capability.json"
    if not path.exists():
        return {}
    c = json.loads(path.read_text())
    return {"capability": c["nll_correct"], "capability_se": c["nll_correct_stderr"], "capability_acc": c["acc"],
            "capability_task": c["task"]}


def measure_capability(sw: SweepConfig, p: Point) -> dict | None:
    """-E[log p(correct)] (and accuracy) of a finished point on the sweep's capability task, cached in
    RUN_DIR/capability.json; None when the sweep measures none."""
    cap = sw.capability
    if not cap.task:
        return None
    path = Path(p.cfg.run_dir) / "capability.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("task") == cap.task and old.get("items_requested", cap.items) == cap.items:
            return old
    if not is_finished(p):
        return None
    from gptjax.eval import tasks as tasks_lib
    from gptjax.eval.scoring import Scorer, load_run

    run = load_run(p.cfg.run_dir)
    task = tasks_lib.resolve(cap.task, run.cfg.data, n=cap.items, seed=0)
    m = tasks_lib.score_task(task, Scorer(run, progress=False), run.tokenizer)
    out = {"task": cap.task, "items": m["n"], "items_requested": cap.items, "shots": 0, **{k: m[k] for k in (
        "nll_correct", "nll_correct_stderr", "acc", "acc_stderr")}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    return out


def write_results(sw: SweepConfig, points: list[Point], sweep_dir: Path) -> list[dict]:
    recs = [record(p, sw.n_count) for p in points if p.group not in ("predict", "lr") and not p.lr_pending
            and is_finished(p)]
    tmp = sweep_dir / "results.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tmp.replace(sweep_dir / "results.jsonl")
    return recs


def train_point(p: Point, log: Callable[[str], None]) -> dict:
    from gptjax.train.pretrain import pretrain

    return pretrain(p.cfg, log=log)


def _train_one(sw: SweepConfig, p: Point, train: Callable[[Point, Callable], dict],
               log: Callable[[str], None]) -> bool:
    """Train one point and score its capability; False when its loss became non-finite (reported, and recorded
    in its directory: failed.txt, and for an lr-sweep point an infinite loss, which is a result of the lr sweep)."""
    from gptjax.errors import NonFiniteLoss

    (Path(p.cfg.run_dir) / "failed.txt").unlink(missing_ok=True)
    try:
        train(p, log)
    except NonFiniteLoss as e:
        log(f"point {p.name} failed: {e}")
        Path(p.cfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(p.cfg.run_dir) / "failed.txt").write_text(str(e) + "\n")
        if p.group == "lr":  # a rate that diverges is a result of the lr sweep: the worst loss
            (Path(p.cfg.run_dir) / "summary.json").write_text(json.dumps({"val_loss": math.inf}))
        return False
    if p.group != "lr":
        measure_capability(sw, p)
    return True


def _child_main(argv: list[str]) -> None:
    """A `sweep --jobs N` child: SWEEP_DIR/sweep.json and one point's JSON -> the point trained and scored."""
    sw = load_sweep(argv[0])
    d = json.loads(Path(argv[1]).read_text())
    p = Point(**{**d, "cfg": config_lib.from_dict(TrainConfig, d["cfg"])})
    _train_one(sw, p, train_point, print)


def _point_job(p: Point, sweep_dir: Path):
    from gptjax.procpool import Job

    path = sweep_dir / "jobs" / f"{p.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, {**dataclasses.asdict(p), "cfg": config_lib.to_dict(p.cfg)})
    return Job(p.name, "from gptjax.scaling.sweep import _child_main; _child_main(sys.argv[1:])",
               [str(sweep_dir / "sweep.json"), str(path)], sweep_dir / "logs" / f"{p.name}.log",
               env={"TQDM_MININTERVAL": "10"})  # a progress line every 10 s in the point's log, not every step


def sweep(sw: SweepConfig, sweep_dir: str | Path, overrides: list[str] | None = None, *,
          log: Callable[[str], None] = print, train: Callable[[Point, Callable], dict] = train_point,
          jobs: int = 1) -> list[dict]:
    """Train every unfinished point: the lr sweep first (its result, SWEEP_DIR/lr.json, sets the tuned rates),
    then the ladder, isoFLOP and extra-seed points; returns the results records.

    With `jobs` > 1 the points train in child processes, `jobs` at a time, each pinned to a core of its own
    (gptjax.procpool; logs in SWEEP_DIR/logs/), the most expensive first; the results do not depend on the
    order. A point whose loss becomes non-finite is reported and skipped (its directory keeps the error); the
    others still run (a diverged lr-sweep point counts as an infinite loss). The prediction point is left to
    `predict`."""
    from gptjax.errors import NonFiniteLoss
    from tqdm.auto import tqdm

    sweep_dir = Path(sweep_dir)
    points, notes = plan_points(sw, sweep_dir, overrides)
    for n in notes:
        log(f"note: {n}")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "sweep.json").write_text(json.dumps(dataclasses.asdict(sw), indent=2) + "\n")
    points = [p for p in points if p.group != "predict"]
    lr_points = [p for p in points if p.group == "lr"]
    todo = [p for p in points if p.lr_pending or not is_finished(p)]
    log(f"sweep {sw.name}: {len(points)} points, {len(points) - len(todo)} already finished, {len(todo)} to train "
        f"in {sweep_dir}" + (f", {jobs} at a time (one core each; logs in {sweep_dir / 'logs'})" if jobs > 1 else ""))
    total = sum(p.flops for p in points) / 1e12
    bar = tqdm(total=total, initial=total - sum(p.flops for p in todo) / 1e12, unit="TFLOP", unit_scale=False,
               bar_format="{l_bar}{bar}| {n:.3g}/{total:.3g} TFLOP [{elapsed}<{remaining}{postfix}]",
               desc=f"sweep {sw.name}", dynamic_ncols=True, position=0)
    failed: list[str] = []
    started = [0]

    def finished(p: Point, ok: bool, seconds: float | None = None) -> None:
        if not ok and p.group != "lr":
            failed.append(p.name)
        bar.update(min(p.flops / 1e12, bar.total - bar.n))  # float sums: never past the total (tqdm warns)
        write_results(sw, points, sweep_dir)
        if seconds is not None:
            s = json.loads((Path(p.cfg.run_dir) / "summary.json").read_text()) if ok else {}
            bar.write(f"{p.name}: " + (f"held-out loss {s['val_loss']:.4f}, {seconds:.0f} s" if ok else "failed"))

    def run_all(ps: list[Point]) -> None:
        if jobs <= 1:
            for p in ps:
                started[0] += 1
                bar.set_postfix_str(f"{started[0]}/{len(todo)} {p.name}", refresh=True)
                finished(p, _train_one(sw, p, train, lambda s: bar.write(s)))
            return
        from gptjax.procpool import run_pool

        by_name = {p.name: p for p in ps}
        order = sorted(ps, key=lambda p: -p.flops)  # longest first: the pool ends with short points to balance

        def done(job, seconds: float) -> None:
            p = by_name[job.name]
            failed_txt = Path(p.cfg.run_dir) / "failed.txt"
            if failed_txt.exists():
                bar.write(f"point {p.name} failed: {failed_txt.read_text().strip()}")
            finished(p, not failed_txt.exists(), seconds)

        run_pool([_point_job(p, sweep_dir) for p in order], jobs, on_done=done, what="sweep point",
                 error=SweepError)

    try:
        run_all([p for p in todo if p.group == "lr"])  # the lr sweep first: the other points' rates wait for it
        if lr_points and (any(p.lr_pending for p in todo) or not (sweep_dir / "lr.json").exists()):
            result = tune_lrs(sw, plan_points(sw, sweep_dir, overrides, tuned={})[0])
            _write_json(sweep_dir / "lr.json", result)
            law = result["law"]
            bar.write(f"lr sweep: tuned lr(N_total) = {law['c']:.3g} N^-{law['p']:.3f}: "
                      + ", ".join(f"{k} {v:.3g}" for k, v in result["tuned"].items()))
            if result["edge_sizes"]:
                bar.write(f"note: the best rate of {', '.join(result['edge_sizes'])} is at an edge of "
                          f"lr_sweep.lrs (a bound, not an optimum); widen the grid to pin it down")
            points = [p for p in plan_points(sw, sweep_dir, overrides)[0] if p.group != "predict"]
        run_all([p for p in points if p.group != "lr" and not is_finished(p)])
    finally:
        bar.close()
    # points finished before (an interrupted sweep, or capability added to the sweep since) get scored too
    for q in points:
        if q.group != "lr" and q.name not in failed and is_finished(q):
            measure_capability(sw, q)
    recs = write_results(sw, points, sweep_dir)
    if failed:
        raise NonFiniteLoss(f"{len(failed)} point(s) diverged: {', '.join(failed)}; give their sizes a lower "
                            f"explicit lr (sizes[].lr in the sweep config: every point of that size trains again), "
                            f"delete their directories and rerun (finished points are kept)")
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
