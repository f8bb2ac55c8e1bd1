"""Predicting a bigger run from cheaper ones, GPT-4 style (OpenAI 2023, section 3)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from gptjax.errors import SweepError
from gptjax.scaling.fit import (_ci, chinchilla_loss, fit_capability, fit_chinchilla, fit_minima_law, fit_power_law,
                                frontier, power_law)
from gptjax.scaling.sweep import (Point, SweepConfig, is_finished, load_results, measure_capability, plan_points, record,
                                  train_point)

# ----------------------------------------------------------------------------------------------
# Prediction, GPT-4 style


def predict(sw: SweepConfig, sweep_dir: str | Path, overrides: list[str] | None = None, *, train: bool = True,
            min_ratio: float = 10.0, bootstrap: int = 200, seed: int = 0, log: Callable[[str], None] = print,
            train_fn: Callable[[Point, Callable], dict] = train_point) -> dict:
    """Fit L(N, D) and L(C) on the finished points with at most a tenth of the prediction point's exact FLOPs,
    write the predicted loss to SWEEP_DIR/prediction.json, then (with `train`) train the point and add the
    measured loss and the error. A prediction already on disk for the same point is kept, never refitted."""
    sweep_dir = Path(sweep_dir)
    points, _ = plan_points(sw, sweep_dir, overrides)
    target = [p for p in points if p.group == "predict"]
    if not target:
        raise SweepError(f"sweep '{sw.name}' declares no prediction point: add \"predict\": {{\"size\": ..., "
                         f"\"tokens\": ...}} to its config")
    (p,) = target[:1]
    if p.lr_pending:
        raise SweepError(f"the prediction point's learning rate comes from the lr sweep, which has not finished "
                         f"({sweep_dir / 'lr.json'} is missing or from another lr sweep): run "
                         f"`python scaling.py sweep {sw.name}` first")
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
        # Kaplan's L(C_min) on the isoFLOP minima, in the budgets' own measure of compute
        c_budget = p.flops if sw.isoflop.measure == "flops" else 6.0 * N * D
        for metric, key in (("val_loss", "loss_Cmin"), ("capability", "capability_Cmin")):
            if metric == "capability" and not (sw.capability.task and all(
                    r.get("capability") is not None for r in recs if r.get("budget"))):
                continue
            try:
                law = fit_minima_law(recs, metric, bootstrap=bootstrap, seed=seed)
            except SweepError as e:
                log(f"note: no {key} prediction: {e}")
                continue
            samples = law.pop("samples", [])
            pred[f"fit_{key}"] = law
            pred[f"predicted_{key}"] = float(power_law(law, c_budget))
            if samples:
                pred[f"predicted_{key}_ci"] = _ci(np.array([float(power_law(q, c_budget)) for q in samples]))
        if sw.capability.task and sum(r.get("capability") is not None for r in recs) >= 3:
            try:
                cap = fit_capability(recs, bootstrap=bootstrap, seed=seed)
            except SweepError as e:  # e.g. a metric too flat for a frontier: the loss prediction still stands
                log(f"note: no capability prediction: {e}")
                cap = None
            if cap is not None:
                pred["fit_capability"] = cap
                pred["capability_task"] = sw.capability.task
                pred["predicted_capability"] = float(power_law(cap, p.flops))
                if "ci" in cap:  # the interval of the power law's value at the point, over the bootstrap refits
                    pred["predicted_capability_ci"] = _capability_ci(recs, p.flops, bootstrap, seed)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(pred, indent=2) + "\n")
        log(f"predicted before training {p.name} (N = {N:,}, D = {D:,}, {ratio:.1f}x the FLOPs of the largest of "
            f"{len(recs)} fitted points): loss {loss_nd:.4f}"
            + (f" [{pred['predicted_loss_ci'][0]:.4f}, {pred['predicted_loss_ci'][1]:.4f}]"
               if "predicted_loss_ci" in pred else "")
            + (f"; L(C) fit says {pred['predicted_loss_L_C']:.4f}" if "predicted_loss_L_C" in pred else "")
            + (f"; -E[log p(correct)] on {pred['capability_task']} {pred['predicted_capability']:.3f}"
               if "predicted_capability" in pred else "")
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
    if "predicted_loss_Cmin" in pred:
        pred["error_loss_Cmin"] = pred["predicted_loss_Cmin"] - actual["val_loss"]
    if "predicted_capability" in pred:
        cap = measure_capability(sw, p)
        if "predicted_capability_Cmin" in pred:
            pred["error_capability_Cmin"] = pred["predicted_capability_Cmin"] - cap["nll_correct"]
        pred["actual_capability"] = cap["nll_correct"]
        pred["actual_capability_se"] = cap["nll_correct_stderr"]
        pred["capability_error"] = pred["predicted_capability"] - cap["nll_correct"]
        if "predicted_capability_ci" in pred:
            lo, hi = pred["predicted_capability_ci"]
            pred["actual_capability_within_ci"] = bool(lo <= cap["nll_correct"] <= hi)
    path.write_text(json.dumps(pred, indent=2) + "\n")
    log(f"{p.name}: predicted {pred['predicted_loss']:.4f}, measured {actual['val_loss']:.4f}: error "
        f"{pred['error']:+.4f} nats/token ({pred['relative_error']:+.2%})"
        + (f"; -E[log p(correct)] predicted {pred['predicted_capability']:.3f}, measured "
           f"{pred['actual_capability']:.3f}" if "actual_capability" in pred else ""))
    return pred


def _capability_ci(recs: list[dict], flops: float, bootstrap: int, seed: int) -> list[float]:
    """95% interval of the capability law's value at `flops`: the frontier's points resampled, the law
    refitted, evaluated at the point."""
    front = frontier([r for r in recs if r.get("capability") is not None], key="flops", metric="capability")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(front), len(front))
        if len(set(idx.tolist())) < 2:
            continue
        sub = [front[i] for i in idx]
        q = fit_power_law([r["flops"] for r in sub], [r["capability"] for r in sub], offset=False, n_starts=2)
        vals.append(float(power_law(q, flops)))
    return _ci(np.array(vals))
