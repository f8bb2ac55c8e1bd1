"""Markdown tables of a finished sweep: the lr sweep, the isoFLOP minima in both parameter counts, the fits,
the seed noise, the prediction and every point (`python scaling.py report NAME --out FILE`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from gptjax.scaling.fit import backtest_lines
from gptjax.scaling.sweep import load_results


def _k(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}K"


def _ci(p: dict, k: str, fmt: str = "{:.3g}") -> str:
    c = p.get("ci", {}).get(k)
    return fmt.format(p[k]) + (f" [{fmt.format(c[0])}, {fmt.format(c[1])}]" if c else "")


def report(sweep_dir: str | Path) -> str:
    sweep_dir = Path(sweep_dir)
    recs = load_results(sweep_dir)
    fits_path = sweep_dir / "fits.json"
    fits = json.loads(fits_path.read_text()) if fits_path.exists() else {}
    out = []

    lr_path = sweep_dir / "lr.json"
    if lr_path.exists():
        lr = json.loads(lr_path.read_text())
        grid = [f"{x:g}" for x in lr["lrs"]]
        out += [f"### Learning-rate sweep ({lr['budget']:.2g} training FLOPs per point; held-out loss)", "",
                "| size | N (all) | " + " | ".join(f"lr {g}" for g in grid) + " | best (parabola) | tuned (law) |",
                "|---|---|" + "---|" * len(grid) + "---|---|"]
        for size, row in sorted(lr["per_size"].items(), key=lambda kv: kv[1]["N_total"]):
            cells = [f"{row['losses'][g]:.3f}" if math.isfinite(row["losses"][g]) else "diverged" for g in grid]
            out.append(f"| {size} | {_k(row['N_total'])} | " + " | ".join(cells)
                       + f" | {row['lr']:.3g}{' (edge)' if row['edge'] else ''} | {lr['tuned'][size]:.3g} |")
        law = lr["law"]
        out += ["", f"Tuned rate for every size: lr(N) = {law['c']:.3g} N^-{law['p']:.3f} (N = all parameters): "
                + ", ".join(f"{k} {v:.3g}" for k, v in lr["tuned"].items()), ""]

    for f in [fits] + ([fits["alt"]] if "alt" in fits else []):
        if not f.get("isoflop_minima"):
            continue
        count = f.get("n_count", "")
        out += [f"### isoFLOP minima, N = {count.replace('_', '-')} parameters", "",
                "| budget (FLOPs) | sizes | N_opt | D_opt | tokens / parameter | loss at N_opt | sizes below / above | "
                "interior |", "|---|---|---|---|---|---|---|---|"]
        for m in f["isoflop_minima"]:
            out.append(f"| {m['budget']:.2g} | {m['sizes_below'] + m['sizes_above']} | {_k(m['N_opt'])} | "
                       f"{_k(m['D_opt'])} | {m['D_opt'] / m['N_opt']:.1f} | {m['loss']:.3f} | "
                       f"{m['sizes_below']} / {m['sizes_above']} | "
                       f"{'yes, 2+ each side' if m.get('strict') else ('yes' if m['interior'] else 'no (edge)')} |")
        a2 = f.get("approach2", {})
        if "a" in a2:
            out += ["", f"Approach 2: N_opt ~ C^{_ci(a2, 'a', '{:.3f}')}, D_opt ~ C^{_ci(a2, 'b', '{:.3f}')} over "
                    f"{a2['budgets_used']} budgets; rms of log N_opt about the line {a2['log_N_opt_rms']:.3f}."]
        p = f.get("L_ND")
        if p:
            out += [f"Approach 3: L(N, D) = E + A/N^alpha + B/D^beta on {p['points']} points: "
                    f"E = {_ci(p, 'E')}, A = {_ci(p, 'A')}, B = {_ci(p, 'B')}, alpha = {_ci(p, 'alpha')}, "
                    f"beta = {_ci(p, 'beta')}; N_opt ~ C^{_ci(p, 'a')}."]
        out.append("")

    if fits.get("backtest"):
        out += ["### Backtest: each loss law fitted without the last budget(s), predicting them", ""]
        out += [f"- {line}" for line in backtest_lines(fits)] + [""]

    by_point: dict[tuple, list[dict]] = {}
    for r in recs:
        by_point.setdefault((r["budget"], r["size"], r["tokens"]), []).append(r)
    multi = {k: v for k, v in by_point.items() if len(v) > 1}
    if multi:
        out += ["### Seed noise", "", "| point | seeds | held-out loss per seed | spread (max - min) | std |",
                "|---|---|---|---|---|"]
        for v in multi.values():
            ls = [r["val_loss"] for r in sorted(v, key=lambda r: r["seed"])]
            out.append(f"| {v[0]['name']} | {len(v)} | {', '.join(f'{x:.4f}' for x in ls)} | {max(ls) - min(ls):.4f} | "
                       f"{np.std(ls, ddof=1):.4f} |")
        out.append("")

    pred_path = sweep_dir / "prediction.json"
    if pred_path.exists():
        p = json.loads(pred_path.read_text())
        out += [f"### Prediction of {p['point']} ({_k(p['N_total'])} parameters, {_k(p['tokens'])} tokens, "
                f"{p['flops']:.3g} FLOPs = {p['compute_ratio']:.1f}x the largest fitted point), written at "
                f"{p['made_at']} before it trained", "", "| quantity | predicted | 95% interval | measured | error |",
                "|---|---|---|---|---|"]
        ci = p.get("predicted_loss_ci", [math.nan] * 2)
        act = p.get("actual_loss")
        out.append(f"| held-out loss, L(N, D) fit (nats/token) | {p['predicted_loss']:.4f} | {ci[0]:.4f} - {ci[1]:.4f} | "
                   + (f"{act:.4f} | {p['error']:+.4f} ({p['relative_error']:+.2%}) |" if act is not None else "- | - |"))
        if "predicted_loss_L_C" in p:
            out.append(f"| held-out loss, L(C) frontier fit | {p['predicted_loss_L_C']:.4f} | - | "
                       + (f"{act:.4f} | {p['error_L_C']:+.4f} ({p['error_L_C'] / act:+.2%}) |" if act is not None else "- | - |"))
        if "predicted_loss_Cmin" in p:
            c = p.get("predicted_loss_Cmin_ci", [math.nan] * 2)
            out.append(f"| held-out loss, (C_c/C)^alpha on the isoFLOP minima | {p['predicted_loss_Cmin']:.4f} | "
                       f"{c[0]:.4f} - {c[1]:.4f} | " + (f"{act:.4f} | {p['error_loss_Cmin']:+.4f} "
                                                      f"({p['error_loss_Cmin'] / act:+.2%}) |" if act is not None else "- | - |"))
        if "predicted_capability" in p:
            c = p.get("predicted_capability_ci", [math.nan] * 2)
            a = p.get("actual_capability")
            out.append(f"| -E[log p(correct)] on {p['capability_task']} (nats) | {p['predicted_capability']:.3f} | "
                       f"{c[0]:.3f} - {c[1]:.3f} | "
                       + (f"{a:.3f} +- {p['actual_capability_se']:.3f} | {p['capability_error']:+.3f} "
                          f"({p['capability_error'] / a:+.2%}) |" if a is not None else "- | - |"))
        if "predicted_capability_Cmin" in p:
            c = p.get("predicted_capability_Cmin_ci", [math.nan] * 2)
            a = p.get("actual_capability")
            out.append(f"| -E[log p(correct)], (C_c/C)^alpha on the isoFLOP minima | {p['predicted_capability_Cmin']:.3f} | "
                       f"{c[0]:.3f} - {c[1]:.3f} | " + (f"{a:.3f} | {p['error_capability_Cmin']:+.3f} "
                                                      f"({p['error_capability_Cmin'] / a:+.2%}) |" if a is not None else "- | - |"))
        out.append("")

    out += ["### Every point", "", "| point | N (all) | N (non-emb.) | lr | steps | D | FLOPs | held-out loss | bits/byte | "
            "-E[log p(correct)] | train s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        cap = f"{r['capability']:.3f}" if r.get("capability") is not None else "-"
        out.append(f"| {r['name']} | {_k(r['N_total'])} | {_k(r['N_non_embedding'])} | {r['lr']:.3g} | {r['steps']} | "
                   f"{_k(r['tokens'])} | {r['flops']:.3g} | {r['val_loss']:.4f} | {r['val_bits_per_byte']:.3f} | {cap} | "
                   f"{r['train_seconds'] or 0:.0f} |")
    return "\n".join(out) + "\n"
