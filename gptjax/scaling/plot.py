"""Plots of a sweep (matplotlib, Agg): loss against compute, isoFLOP curves in both parameter counts, the
compute-optimal size against compute, the capability metric against compute, the learning-rate sweep, and
loss against N on a fixed-token ladder.

A fitted law is drawn solid only across the compute range of the points it was fitted to; beyond that range
it is dashed and labelled as an extrapolation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from gptjax.scaling.fit import (approach2_n_opt, chinchilla_loss, compute_optimal, fit_all, frontier,
                                isoflop_minima, power_law)
from gptjax.scaling.sweep import load_results

# ----------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg)


def _finish(fig, ax, xlabel: str, title: str, path: Path | None, *, log_y: bool = True,
            ylabel: str = "held-out loss (nats/token)") -> Path | None:
    """Log axes, labels, a legend where something is labelled; save the PNG and close the figure (or, with no
    path, leave it open for the caller)."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    if path is None:
        return None
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def split_range(lo: float, hi: float, x_min: float, x_max: float, n: int = 200):
    """Grids for drawing a law fitted on [lo, hi] over [x_min, x_max]: (inside, below, above); the parts
    outside the fitted range (possibly empty) are what gets dashed."""
    inside = np.geomspace(lo, hi, n)
    below = np.geomspace(x_min, lo, n // 4) if x_min < lo else np.empty(0)
    above = np.geomspace(hi, x_max, n // 2) if x_max > hi else np.empty(0)
    return inside, below, above


def draw_law(ax, f, lo: float, hi: float, x_min: float, x_max: float, *, color: str, label: str, lw: float = 1.2):
    """f drawn solid on [lo, hi] (the fitted range) and dashed outside it, the dashed part labelled
    'extrapolated'. Returns the line artists (solid first)."""
    inside, below, above = split_range(lo, hi, x_min, x_max)
    lines = ax.plot(inside, f(inside), "-", color=color, lw=lw, label=label)
    first = True
    for part in (below, above):
        if part.size:
            lines += ax.plot(part, f(part), "--", color=color, lw=lw * 0.8,
                             label=f"{label.split(' (')[0]}, extrapolated" if first else None)
            first = False
    return lines


def plot(sweep_dir: str | Path, out_dir: str | Path | None = None, fits: dict | None = None) -> list[Path]:
    """The PNGs of a sweep from results.jsonl (and fits.json, prediction.json, lr.json)."""
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
        ax.scatter(r["C"], r["val_loss"], color=color[r["N"]], marker="o" if r["group"] == "ladder" else "s", s=22)
    Cs = [r["C"] for r in recs]
    lo, hi = min(Cs), max(Cs)
    x_max = max(hi, pred["C"]) * 1.3 if pred else hi
    if "L_C" in fits:
        front = [r["C"] for r in recs if r["name"] in set(fits["L_C"]["frontier"])] or Cs
        draw_law(ax, lambda c: power_law(fits["L_C"], c), min(front), max(front), lo, x_max, color="k", lw=1,
                 label=f"L(C) = a C^{-fits['L_C']['alpha']:.3f} + {fits['L_C']['E']:.2f} (frontier fit)")
    if "L_ND" in fits:
        p = fits["L_ND"]
        draw_law(ax, lambda c: chinchilla_loss(p, *compute_optimal(p, c)), lo, hi, lo, x_max, color="r",
                 label="compute-optimal L(N_opt(C), D_opt(C)) of the L(N, D) fit")
    if pred:
        plo, phi = pred.get("predicted_loss_ci", [pred["predicted_loss"]] * 2)
        ax.errorbar(pred["C"], pred["predicted_loss"], yerr=[[pred["predicted_loss"] - plo], [phi - pred["predicted_loss"]]],
                    fmt="*", color="tab:orange", ms=12, capsize=3, label="predicted by L(N, D) (fit on <= 1/10 compute)")
        if "predicted_loss_Cmin" in pred:  # the offset-free law on the isoFLOP minima (fitted in training FLOPs)
            y = pred["predicted_loss_Cmin"]
            mlo, mhi = pred.get("predicted_loss_Cmin_ci", [y, y])
            ax.errorbar(pred["C"] * 1.12, y, yerr=[[y - mlo], [mhi - y]], fmt="D", color="tab:green", ms=7,
                        capsize=3, label="predicted by (C_c/C)^alpha on the isoFLOP minima")
        if "actual_loss" in pred:
            ax.scatter(pred["C"], pred["actual_loss"], marker="x", color="tab:red", s=80, label="measured", zorder=5)
    ax.axvspan(lo, hi, color="0.93", zorder=0, label="measured compute range")
    written.append(_finish(fig, ax, "C = 6 N D (FLOPs)", "loss vs compute (squares: isoFLOP points, colour: N)",
                           out_dir / "loss_vs_compute.png"))

    # loss vs N on a fixed-token ladder
    ladder = [r for r in recs if r["group"] == "ladder"]
    if ladder:
        fig, ax = plt.subplots(figsize=(7, 5))
        ax.scatter([r["N"] for r in ladder], [r["val_loss"] for r in ladder], color="k", zorder=3, label="ladder")
        ng = np.geomspace(min(r["N"] for r in ladder) / 1.5, max(r["N"] for r in ladder) * 1.5, 200)
        if "L_N" in fits:
            p = fits["L_N"]
            ax.plot(ng, power_law(p, ng), "b-", lw=1, label=f"(N_c/N)^{p['alpha']:.3f} + {p['E']:.2f}")
            q = fits["L_N_no_offset"]
            ax.plot(ng, power_law(q, ng), "b:", lw=1, label=f"(N_c/N)^{q['alpha']:.3f}")
        written.append(_finish(fig, ax, "N (parameters)", "loss vs model size", out_dir / "loss_vs_n.png"))

    # isoFLOP curves, in both parameter counts
    budgets = sorted({r["budget"] for r in recs if r.get("budget")})
    if budgets:
        bc = {b: plt.get_cmap("plasma")(i / max(len(budgets), 1)) for i, b in enumerate(budgets)}
        fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
        for ax, key, label in ((axes[0], "N_total", "N, all parameters (Chinchilla)"),
                               (axes[1], "N_non_embedding", "N, non-embedding parameters (Kaplan)")):
            minima = {m["budget"]: m for m in isoflop_minima(recs, key)}
            for b in budgets:
                rs = sorted((r for r in recs if r.get("budget") == b), key=lambda r: r[key])
                ax.plot([r[key] for r in rs], [r["val_loss"] for r in rs], "o", color=bc[b], ms=4,
                        label=f"C = {b:.2g}")
                m = minima.get(b)
                if m:
                    c2, c1, c0 = m["parabola"]
                    x = np.linspace(math.log(rs[0][key]), math.log(rs[-1][key]), 100)
                    ax.plot(np.exp(x), c0 + c1 * x + c2 * x * x, "-", color=bc[b], lw=1)
                    ax.plot(m["N_opt"], m["loss"], "v", color=bc[b], ms=9,
                            mfc=bc[b] if m.get("strict") else "none")
            _finish(fig, ax, label, "isoFLOP curves; triangle: parabola minimum (filled: 2+ sizes each side)", None,
                    log_y=False)
        fig.tight_layout()
        fig.savefig(out_dir / "isoflop.png", dpi=120)
        plt.close(fig)
        written.append(out_dir / "isoflop.png")

    # the compute-optimal size against compute (approach 2), both counts
    a2s = [(fits.get("approach2"), fits.get("n_count")), ((fits.get("alt") or {}).get("approach2"),
                                                           (fits.get("alt") or {}).get("n_count"))]
    a2s = [(a, c) for a, c in a2s if a and "a" in a]
    if a2s:
        fig, ax = plt.subplots(figsize=(7, 5))
        x_max = pred["flops"] * 1.3 if pred else None
        for (a2, count), col in zip(a2s, ("tab:blue", "tab:green")):
            ms = [m for m in a2["minima"] if m["interior"]]
            ax.scatter([m["budget"] for m in ms], [m["N_opt"] for m in ms], color=col, zorder=3)
            lo, hi = a2["C_range"]
            ci = a2.get("ci", {}).get("a")
            draw_law(ax, lambda c, a2=a2: approach2_n_opt(a2, c)[0], lo, hi, lo, x_max or hi, color=col,
                     label=f"N_opt ({count}) ~ C^{a2['a']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
        if pred:
            ax.scatter(pred["flops"], pred.get("N_total", pred["N"]), marker="*", s=120, color="tab:orange",
                       label="prediction point (N all)", zorder=4)
        written.append(_finish(fig, ax, "isoFLOP budget (FLOPs)", "compute-optimal N from the isoFLOP minima "
                               "(approach 2)", out_dir / "n_opt.png", ylabel="N_opt (parameters)"))

    # the capability metric against compute
    cap = fits.get("capability")
    have = [r for r in recs if r.get("capability") is not None]
    if have:
        fig, ax = plt.subplots(figsize=(7, 5))
        ax.scatter([r["flops"] for r in have], [r["capability"] for r in have], s=14, color="0.6", label="every point")
        front = frontier(have, key="flops", metric="capability")
        ax.scatter([r["flops"] for r in front], [r["capability"] for r in front], s=26, color="k",
                   label="frontier (fitted)")
        fit = (pred or {}).get("fit_capability", cap)
        if fit:  # the prediction's own fit (on <= 1/10 of its compute) when there is one, else the sweep's
            lo, hi = fit["C_range"]
            x_max = max(hi, pred["flops"] * 1.3) if pred else hi
            draw_law(ax, lambda c: power_law(fit, c), lo, hi, lo, x_max, color="tab:blue",
                     label=f"-E[log p] = {fit['alpha_c']:.3g} C^-{fit['alpha']:.3f} (power law)")
        if pred and "predicted_capability" in pred:
            v = pred["predicted_capability"]
            plo, phi = pred.get("predicted_capability_ci", [v, v])
            ax.errorbar(pred["flops"], v, yerr=[[v - plo], [phi - v]], fmt="*", color="tab:orange", ms=12, capsize=3,
                        label="predicted before training")
            if "actual_capability" in pred:
                ax.errorbar(pred["flops"], pred["actual_capability"], yerr=pred.get("actual_capability_se", 0),
                            fmt="x", color="tab:red", ms=9, capsize=3, label="measured (+- s.e.)", zorder=5)
        written.append(_finish(fig, ax, "training FLOPs", f"capability: -E[log p(correct)] on "
                               f"{have[0].get('capability_task', 'the task')}", out_dir / "capability.png",
                               ylabel="-E[log p(correct)] (nats)"))

    # the learning-rate sweep
    lr_path = sweep_dir / "lr.json"
    if lr_path.exists():
        lr = json.loads(lr_path.read_text())
        fig, ax = plt.subplots(figsize=(7, 5))
        for i, (size, row) in enumerate(sorted(lr["per_size"].items(), key=lambda kv: kv[1]["N_total"])):
            xs = sorted(row["losses"], key=float)
            col = plt.get_cmap("viridis")(i / max(len(lr["per_size"]) - 1, 1))
            ax.plot([float(x) for x in xs], [row["losses"][x] for x in xs], "o-", color=col,
                    label=f"{size} (N {row['N_total'] / 1e3:.0f}K): best {row['lr']:.3g}")
            ax.axvline(lr["tuned"][size], color=col, ls=":", lw=1)
        written.append(_finish(fig, ax, "peak learning rate", f"learning-rate sweep at {lr['budget']:.2g} FLOPs "
                               f"(dotted: tuned lr = {lr['law']['c']:.3g} N^-{lr['law']['p']:.3f})",
                               out_dir / "lr.png", log_y=False))
    return written
