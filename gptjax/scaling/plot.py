"""Plots of a sweep (matplotlib, Agg): loss against compute, loss against N, isoFLOP curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from gptjax.scaling.fit import chinchilla_loss, compute_optimal, fit_all, power_law
from gptjax.scaling.sweep import load_results

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
