"""Fitting scaling laws: sums of power laws in log space with a Huber loss from a grid of starts
(Hoffmann et al. 2022, App. D.2), bootstrap intervals, frontiers and isoFLOP minima."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from gptjax.errors import SweepError

HUBER_DELTA = 1e-3

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
    # the relative residuals' rms: against the seed noise it says whether the form fits (bootstrap intervals
    # measure only how the points scatter around it)
    rms = float(np.sqrt(np.mean(np.square(chinchilla_loss(out, N, D) / L - 1))))
    out.update(objective=obj, points=len(L), in_sample_rms=rms)
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


def frontier(points: list[dict], key: str = "C", metric: str = "val_loss") -> list[dict]:
    """The points no cheaper point beats: each has a lower `metric` than every point with less `key`."""
    best, out = math.inf, []
    for r in sorted(points, key=lambda r: r[key]):
        if r[metric] < best:
            out.append(r)
            best = r[metric]
    return out


def isoflop_minima(points: list[dict], n_key: str = "N") -> list[dict]:
    """Per isoFLOP budget with 3+ sizes: a parabola in log N through the losses, and its minimum (Hoffmann et
    al. approach 2). `interior`: the parabola's minimum lies inside the sizes tried; `strict`: it has at least
    two sizes on each side and the best measured point is not at either end. D_opt is interpolated in log-log
    between the measured token counts (C = 6ND or the exact FLOPs, whichever the budget counts)."""
    out = []
    for budget in sorted({r["budget"] for r in points if r.get("budget")}):
        rs = sorted((r for r in points if r.get("budget") == budget), key=lambda r: r[n_key])
        ns = sorted({r[n_key] for r in rs})
        if len(ns) < 3:
            continue
        x = np.log([r[n_key] for r in rs])
        losses = [r["val_loss"] for r in rs]
        c2, c1, c0 = np.polyfit(x, losses, 2)
        inside = c2 > 0 and x.min() <= -c1 / (2 * c2) <= x.max()
        xm = -c1 / (2 * c2) if inside else x[int(np.argmin(losses))]
        if all("tokens" in r for r in rs):
            lx = np.log(ns)
            ld = np.log([np.mean([r["tokens"] for r in rs if r[n_key] == n]) for n in ns])
            d_opt = float(math.exp(np.interp(xm, lx, ld, left=ld[0] - (lx[0] - xm), right=ld[-1] - (xm - lx[-1]))))
        else:
            d_opt = float(budget / (6 * math.exp(xm)))
        below = sum(n < math.exp(xm) for n in ns)
        best_at = ns.index(rs[int(np.argmin(losses))][n_key])
        out.append({"budget": budget, "N_opt": float(math.exp(xm)), "D_opt": d_opt,
                    "loss": float(c0 + c1 * xm + c2 * xm * xm) if inside else float(min(losses)),
                    "parabola": [float(c2), float(c1), float(c0)], "interior": bool(inside),
                    "sizes_below": below, "sizes_above": len(ns) - below,
                    "strict": bool(inside and below >= 2 and len(ns) - below >= 2 and 0 < best_at < len(ns) - 1)})
    return out


def fit_approach2(points: list[dict], *, n_key: str = "N", bootstrap: int = 0, seed: int = 0) -> dict:
    """Hoffmann et al.'s approach 2: the isoFLOP parabolas' minima N_opt(C), D_opt(C), and the power laws
    N_opt = k_N C^a, D_opt = k_D C^b through the budgets whose minimum is interior (least squares in log-log).
    Intervals: `bootstrap` resamples of the points within each budget (parabolas and lines refitted)."""
    minima = [m for m in isoflop_minima(points, n_key) if m["interior"]]
    out: dict[str, Any] = {"n_key": n_key, "minima": isoflop_minima(points, n_key), "budgets_used": len(minima)}
    if len(minima) < 2:
        return out

    def lines(ms):
        lc = np.log([m["budget"] for m in ms])
        a, ka = np.polyfit(lc, np.log([m["N_opt"] for m in ms]), 1)
        b, kb = np.polyfit(lc, np.log([m["D_opt"] for m in ms]), 1)
        return float(a), float(ka), float(b), float(kb)

    a, ka, b, kb = lines(minima)
    lc = np.log([m["budget"] for m in minima])
    resid = np.log([m["N_opt"] for m in minima]) - (ka + a * lc)
    out.update(a=a, b=b, k_N=math.exp(ka), k_D=math.exp(kb), log_N_opt_rms=float(np.sqrt(np.mean(resid ** 2))),
               C_range=[float(min(m["budget"] for m in minima)), float(max(m["budget"] for m in minima))])
    if bootstrap:
        rng = np.random.default_rng(seed)
        groups = {}
        for r in points:
            if r.get("budget"):
                groups.setdefault(r["budget"], []).append(r)
        samples = []
        for _ in range(bootstrap):
            res = [g[i] for g in groups.values() for i in rng.integers(0, len(g), len(g))]
            ms = [m for m in isoflop_minima(res, n_key) if m["interior"]]
            if len(ms) >= 2:
                samples.append(lines(ms))
        if samples:
            arr = np.array(samples)
            out["ci"] = {"a": _ci(arr[:, 0]), "b": _ci(arr[:, 2])}
            out["bootstrap"] = len(samples)
    return out


def approach2_n_opt(fit: dict, C):
    """N_opt(C) and D_opt(C) from an approach-2 fit."""
    C = np.asarray(C, float)
    return fit["k_N"] * C ** fit["a"], fit["k_D"] * C ** fit["b"]


def minima_frontier(points: list[dict], metric: str = "val_loss", n_key: str = "N") -> list[dict]:
    """The compute-efficient frontier of an isoFLOP sweep: per budget with 3+ sizes whose parabola in log N through
    `metric` has its minimum inside them, that minimum (every seed is a point; other budgets are left out). Kaplan et al.'s C_min
    frontier, measured rather than enveloped: equal-budget points differ by rounding in FLOPs only, so the plain
    envelope (`frontier`) would pick a budget's cheapest point, not its best."""
    out = []
    for budget in sorted({r["budget"] for r in points if r.get("budget")}):
        rs = sorted((r for r in points if r.get("budget") == budget and r.get(metric) is not None), key=lambda r: r[n_key])
        if not rs:
            continue
        if len({r[n_key] for r in rs}) < 3:
            continue
        x = np.log([r[n_key] for r in rs])
        c2, c1, c0 = np.polyfit(x, [r[metric] for r in rs], 2)
        if not (c2 > 0 and x.min() <= -c1 / (2 * c2) <= x.max()):
            continue  # no minimum inside the sizes tried: the budget's best point would only bound it
        xm = -c1 / (2 * c2)
        out.append({"budget": float(budget), metric: float(c0 + c1 * xm + c2 * xm * xm), "name": f"min@{budget:.2g}"})
    return out


def fit_minima_law(points: list[dict], metric: str = "val_loss", *, bootstrap: int = 0, seed: int = 0) -> dict:
    """metric_min(C) = (C_c / C)^alpha on the isoFLOP minima: Kaplan et al.'s L(C_min) form, no irreducible
    term (over a 10-20x range of compute an irreducible term is not identified, and a wrong one bends the
    extrapolation), fitted in log space; `bootstrap` resamples the points within each budget."""
    mins = minima_frontier(points, metric)
    if len(mins) < 3:
        raise SweepError(f"the minima law needs 3 or more isoFLOP budgets with an interior minimum, got "
                         f"{len(mins)}: widen the budgets' size windows")
    p = fit_power_law([m["budget"] for m in mins], [m[metric] for m in mins], offset=False)
    p.update(metric=metric, minima=mins, C_range=[mins[0]["budget"], mins[-1]["budget"]])
    if bootstrap:
        rng = np.random.default_rng(seed)
        groups: dict = {}
        for r in points:
            if r.get("budget") and r.get(metric) is not None:
                groups.setdefault(r["budget"], []).append(r)
        samples = []
        for _ in range(bootstrap):
            res = [g[i] for g in groups.values() for i in rng.integers(0, len(g), len(g))]
            ms = minima_frontier(res, metric)
            if len(ms) < 3:
                continue
            q = fit_power_law([m["budget"] for m in ms], [m[metric] for m in ms], offset=False, n_starts=2)
            samples.append(q)
        p["ci"] = {k: _ci(np.array([q[k] for q in samples])) for k in ("alpha", "x_c")}
        p["samples"] = [{"a": q["a"], "alpha": q["alpha"], "E": 0.0} for q in samples]
        p["bootstrap"] = len(samples)
    return p


def fit_capability(points: list[dict], *, key: str = "flops", metric: str = "capability", bootstrap: int = 0,
                   seed: int = 0) -> dict:
    """GPT-4 (section 3.2): -E[log p(correct)] = alpha_c * C^-k, a power law without offset fitted (in log space,
    Huber loss) on the compute frontier of the metric (each point better than every cheaper one)."""
    have = [r for r in points if r.get(metric) is not None and math.isfinite(r[metric])]
    front = frontier(have, key=key, metric=metric)
    if len(front) < 3:
        raise SweepError(f"the capability fit needs 3 or more frontier points with '{metric}', got {len(front)}")
    p = fit_power_law([r[key] for r in front], [r[metric] for r in front], offset=False, bootstrap=bootstrap,
                      seed=seed)
    p.update(frontier=[r["name"] for r in front], key=key, metric=metric, k=p["alpha"],
             alpha_c=math.exp(p["a"]), C_range=[float(front[0][key]), float(front[-1][key])])
    return p


def seed_noise(points: list[dict], metric: str = "val_loss") -> float | None:
    """The pooled relative standard deviation of `metric` over points trained more than once (same budget, size
    and tokens, other seeds): the noise floor any law's residuals are measured against; None without repeats."""
    groups: dict = {}
    for r in points:
        groups.setdefault((r.get("budget"), r.get("size"), r["tokens"]), []).append(r[metric])
    sq, dof = 0.0, 0
    for v in groups.values():
        if len(v) > 1:
            m = float(np.mean(v))
            sq += float(sum(((x - m) / m) ** 2 for x in v))
            dof += len(v) - 1
    return math.sqrt(sq / dof) if dof else None


def backtest(points: list[dict], *, n_key: str = "N", held: int = 1) -> dict | None:
    """How each loss law extrapolates inside the sweep: fitted on every isoFLOP budget but the last `held`, it
    predicts those budgets. For L(N, D) (approach 3): the relative error at each held-out point, their mean
    absolute error, and the error at each held-out budget's best measured point (the kind of point a prediction
    targets). For the minima law: the relative error at each held-out budget's parabola minimum. A law that
    misses budgets inside the sweep will not hold 10x beyond it."""
    iso = [r for r in points if r.get("budget")]
    budgets = sorted({r["budget"] for r in iso})
    if len(budgets) < held + 3:
        return None
    out_budgets = budgets[-held:]
    fit_pts = [r for r in iso if r["budget"] not in out_budgets]
    test = [r for r in iso if r["budget"] in out_budgets]
    out: dict[str, Any] = {"held_out": [float(b) for b in out_budgets], "fitted_budgets": len(budgets) - held}

    def rel(pred, actual):
        return float((pred - actual) / actual)

    if len(fit_pts) >= 6:
        ch = fit_chinchilla([r[n_key] for r in fit_pts], [r["tokens"] for r in fit_pts],
                            [r["val_loss"] for r in fit_pts])
        errs = {r["name"]: rel(float(chinchilla_loss(ch, r[n_key], r["tokens"])), r["val_loss"]) for r in test}
        best = [min((r for r in test if r["budget"] == b), key=lambda r: r["val_loss"]) for b in out_budgets]
        out["L_ND"] = {"E": ch["E"], "alpha": ch["alpha"], "beta": ch["beta"], "in_sample_rms": ch["in_sample_rms"],
                       "errors": errs, "mean_abs_error": float(np.mean(np.abs(list(errs.values())))),
                       "best_point_errors": {r["name"]: errs[r["name"]] for r in best}}
    mins = minima_frontier(fit_pts)
    if len(mins) >= 3:
        law = fit_power_law([m["budget"] for m in mins], [m["val_loss"] for m in mins], offset=False)
        held_mins = [m for m in minima_frontier(iso) if m["budget"] in out_budgets]
        out["L_Cmin"] = {"alpha": law["alpha"],
                         "errors": {m["name"]: rel(float(power_law(law, m["budget"])), m["val_loss"])
                                    for m in held_mins}}
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
    if out["isoflop_minima"]:
        out["approach2"] = fit_approach2(recs, bootstrap=bootstrap, seed=seed)
    if sum(r.get("capability") is not None for r in recs) >= 3:
        try:
            out["capability"] = fit_capability(recs, bootstrap=bootstrap, seed=seed)
        except SweepError:
            pass
    if len(out["isoflop_minima"]) >= 3:
        for metric, key in (("val_loss", "L_Cmin"), ("capability", "capability_Cmin")):
            if metric == "val_loss" or all(r.get("capability") is not None for r in recs if r.get("budget")):
                law = fit_minima_law(recs, metric, bootstrap=bootstrap, seed=seed)
                law.pop("samples", None)
                out[key] = law
    tests = [t for t in (backtest(recs, held=h) for h in (1, 2)) if t]
    if tests:
        out["backtest"] = tests
    out["seed_noise"] = seed_noise(recs)
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
        where = ("" if m.get("strict") else ", inside but with fewer than two sizes on a side") if m["interior"] \
            else ", at the edge of the sizes tried"
        lines.append(f"isoFLOP C = {m['budget']:.3g}: loss-minimising N ~ {m['N_opt']:.3g} "
                     f"(D ~ {m['D_opt']:.3g}, {m['D_opt'] / m['N_opt']:.3g} tokens per parameter){where}")
    a2 = f.get("approach2", {})
    if "a" in a2:
        lines.append(f"approach 2 ({a2['budgets_used']} interior budgets): N_opt ~ C^{ci(a2, 'a')}, "
                     f"D_opt ~ C^{ci(a2, 'b')}; rms of log N_opt about the line {a2['log_N_opt_rms']:.3f}   "
                     f"(Chinchilla: 0.49 / 0.51; Kaplan: 0.73 / 0.27)")
    for key, what in (("L_Cmin", "loss"), ("capability_Cmin", "-E[log p(correct)]")):
        if key in f:
            p = f[key]
            lines.append(f"{what} at the isoFLOP minima = (C_c/C)^alpha: alpha = {ci(p, 'alpha')}, C_c = "
                         f"{p['x_c']:.3g} ({len(p['minima'])} budgets; C = the budget)")
    if "capability" in f:
        p = f["capability"]
        lines.append(f"capability: -E[log p(correct)] = {p['alpha_c']:.4g} C^-{ci(p, 'alpha')} on the "
                     f"{len(p['frontier'])}-point frontier (C = exact training FLOPs)")
    lines += backtest_lines(f)
    return "\n".join(lines)


def backtest_lines(f: dict) -> list[str]:
    """One line per backtest: each law fitted without the last budget(s), its error on them."""
    lines = []
    for t in f.get("backtest", []):
        held = ", ".join(f"{b:.2g}" for b in t["held_out"])
        parts = []
        if "L_ND" in t:
            p = t["L_ND"]
            parts.append(f"L(N, D) (E = {p['E']:.3g}) mean |error| {p['mean_abs_error']:.1%} over the held-out points, "
                         + ", ".join(f"{e:+.1%} at {n}" for n, e in p["best_point_errors"].items()))
        if "L_Cmin" in t:
            parts.append("minima law " + ", ".join(f"{e:+.1%} at {n}" for n, e in t["L_Cmin"]["errors"].items()))
        lines.append(f"backtest, fitted on {t['fitted_budgets']} budgets, predicting {held}: " + "; ".join(parts))
    if "in_sample_rms" in f.get("L_ND", {}):
        noise = f.get("seed_noise")
        lines.append(f"L(N, D) in-sample residuals: rms {f['L_ND']['in_sample_rms']:.2%} of the loss"
                     + (f", against a seed noise of {noise:.2%}" if noise is not None else ""))
    return lines
