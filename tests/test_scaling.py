"""Scaling laws: the fits recover the constants that generated synthetic data, the compute-optimal allocation
matches a brute-force optimum, a sweep of three tiny points trains end to end and resumes, and `predict`
predicts before it trains."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
from conftest import REPO, run_script

from gptjax import scaling
from gptjax.scaling import SweepError
from gptjax.scaling.sweep import PINNED_SPEED

CHINCHILLA = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def cli():
    spec = importlib.util.spec_from_file_location("scaling_cli", REPO / "scaling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------
# Fits on synthetic data


def test_chinchilla_fit_recovers_constants_and_intervals_cover_them():
    rng = np.random.default_rng(0)
    n = 40
    N = np.exp(rng.uniform(math.log(1e6), math.log(1e9), n))
    D = np.exp(rng.uniform(math.log(1e8), math.log(1e11), n))
    L = scaling.chinchilla_loss(CHINCHILLA, N, D) * np.exp(rng.normal(0, 0.005, n))
    fit = scaling.fit_chinchilla(N, D, L, bootstrap=25, seed=1)
    assert abs(fit["alpha"] - 0.34) < 0.03 and abs(fit["beta"] - 0.28) < 0.03
    assert abs(fit["E"] - 1.69) < 0.05
    assert 0.7 < fit["A"] / 406.4 < 1.4 and 0.7 < fit["B"] / 410.7 < 1.4
    assert abs(fit["a"] - 0.28 / 0.62) < 0.03
    for k in ("E", "A", "B", "alpha", "beta"):
        lo, hi = fit["ci"][k]
        assert lo <= CHINCHILLA[k] <= hi, (k, lo, hi)
        assert lo < fit[k] < hi
    assert fit["bootstrap"] >= 20
    # without noise the fit is exact
    exact = scaling.fit_chinchilla(N, D, scaling.chinchilla_loss(CHINCHILLA, N, D))
    for k, v in CHINCHILLA.items():
        assert exact[k] == pytest.approx(v, rel=2e-3), k


def test_power_law_fits_recover_kaplan_and_offset_forms():
    rng = np.random.default_rng(2)
    N = np.geomspace(1e5, 1e9, 12)
    # Kaplan et al.'s L(N) = (N_c / N)^0.076, N_c = 8.8e13, with 0.3% noise
    L = (8.8e13 / N) ** 0.076 * np.exp(rng.normal(0, 0.003, N.size))
    fit = scaling.fit_power_law(N, L, offset=False, bootstrap=30)
    assert fit["alpha"] == pytest.approx(0.076, abs=0.003)
    assert math.log(fit["x_c"]) == pytest.approx(math.log(8.8e13), abs=0.5)
    assert fit["E"] == 0.0 and fit["ci"]["alpha"][0] <= 0.076 <= fit["ci"]["alpha"][1]
    # L(C) = a C^b + c with a = 30, b = -0.1, c = 1.5
    C = np.geomspace(1e11, 1e16, 15)
    L = (30 * C ** -0.1 + 1.5) * np.exp(rng.normal(0, 0.002, C.size))
    fit = scaling.fit_power_law(C, L, offset=True, bootstrap=30)
    assert fit["alpha"] == pytest.approx(0.1, abs=0.015)
    assert fit["E"] == pytest.approx(1.5, abs=0.1)
    assert math.exp(fit["a"]) == pytest.approx(30, rel=0.35)
    assert fit["ci"]["alpha"][0] <= 0.1 <= fit["ci"]["alpha"][1]
    assert fit["ci"]["E"][0] <= 1.5 <= fit["ci"]["E"][1]
    np.testing.assert_allclose(scaling.power_law(fit, C), 30 * C ** -0.1 + 1.5, rtol=0.01)


def test_huber_fit_shrugs_off_an_outlier():
    """The point of the Huber loss: one bad run barely moves the exponent (least squares would)."""
    N = np.geomspace(1e5, 1e8, 10)
    L = (1e10 / N) ** 0.2
    L[3] *= 1.3
    fit = scaling.fit_power_law(N, L, offset=False)
    assert fit["alpha"] == pytest.approx(0.2, abs=0.002)


def test_compute_optimal_matches_brute_force_and_closed_form():
    from scipy.optimize import minimize_scalar

    rng = np.random.default_rng(3)
    for p in [CHINCHILLA] + [dict(E=rng.uniform(0.5, 2), A=rng.uniform(10, 1000), B=rng.uniform(10, 1000),
                                  alpha=rng.uniform(0.1, 0.6), beta=rng.uniform(0.1, 0.6)) for _ in range(4)]:
        for C in (1e15, 1e19, 1e23):
            n_opt, d_opt = scaling.compute_optimal(p, C)
            assert 6 * n_opt * d_opt == pytest.approx(C, rel=1e-9)
            res = minimize_scalar(lambda x: float(scaling.chinchilla_loss(p, math.exp(x), C / (6 * math.exp(x)))),
                                  bounds=(0, 60), method="bounded", options={"xatol": 1e-10})
            assert math.log(n_opt) == pytest.approx(res.x, abs=1e-3)
        # N_opt ~ C^(beta / (alpha + beta)), D_opt ~ C^(alpha / (alpha + beta))
        (n1, d1), (n2, d2) = scaling.compute_optimal(p, 1e18), scaling.compute_optimal(p, 1e22)
        s = p["alpha"] + p["beta"]
        assert math.log(n2 / n1) / math.log(1e4) == pytest.approx(p["beta"] / s)
        assert math.log(d2 / d1) / math.log(1e4) == pytest.approx(p["alpha"] / s)
    # Chinchilla's published L(N, D) at Gopher's budget: N_opt ~ 32B and ~90 tokens per parameter, not the
    # ~20 of their approaches 1 and 2 -- the inconsistency Besiroglu et al. (2024) traced to that fit
    n, d = scaling.compute_optimal(CHINCHILLA, 5.76e23)
    assert 30e9 < n < 35e9 and 80 < d / n < 100


def test_frontier_and_isoflop_parabola():
    recs = [{"name": f"p{i}", "C": c, "val_loss": l} for i, (c, l) in enumerate([(1, 5), (2, 4), (3, 4.5), (4, 3), (5, 3.5)])]
    assert [r["name"] for r in scaling.frontier(recs)] == ["p0", "p1", "p3"]
    # a parabola in log N with its minimum at N = 1e5
    iso = [{"budget": 1e12, "N": n, "val_loss": 3 + 0.1 * (math.log(n) - math.log(1e5)) ** 2}
           for n in (1e4, 3e4, 1e5, 3e5, 1e6)]
    (m,) = scaling.isoflop_minima(iso)
    assert m["interior"] and m["N_opt"] == pytest.approx(1e5, rel=1e-6) and m["loss"] == pytest.approx(3)
    assert m["D_opt"] == pytest.approx(1e12 / 6e5, rel=1e-6)


def isoflop_points(law, budgets, per_budget=7, noise=0.0, seed=0):
    """Records on isoFLOP budgets (C = 6ND) around the law's optimum, losses from the law (times log-normal noise)."""
    rng = np.random.default_rng(seed)
    recs = []
    for b in budgets:
        n_opt, _ = scaling.compute_optimal(law, b)
        for j, n in enumerate(n_opt * np.geomspace(1 / 8, 8, per_budget)):
            d = b / (6 * n)
            loss = float(scaling.chinchilla_loss(law, n, d)) * math.exp(rng.normal(0, noise))
            recs.append({"name": f"{b:g}-{j}", "budget": b, "N": n, "tokens": d, "C": b, "flops": b, "val_loss": loss})
    return recs


def test_approach2_recovers_a_known_compute_optimal_exponent():
    budgets = [1e17, 1e18, 1e19, 1e20, 1e21]
    exact = scaling.fit_approach2(isoflop_points(CHINCHILLA, budgets), n_key="N")
    want = CHINCHILLA["beta"] / (CHINCHILLA["alpha"] + CHINCHILLA["beta"])
    assert exact["budgets_used"] == 5 and exact["a"] == pytest.approx(want, abs=0.02)
    assert exact["b"] == pytest.approx(1 - want, abs=0.02)
    for m in exact["minima"]:
        n_opt, d_opt = scaling.compute_optimal(CHINCHILLA, m["budget"])
        assert m["strict"] and m["sizes_below"] >= 2 and m["sizes_above"] >= 2
        assert math.log(m["N_opt"]) == pytest.approx(math.log(n_opt), abs=0.15)
        assert m["D_opt"] * m["N_opt"] * 6 == pytest.approx(m["budget"], rel=0.05)  # interpolated D_opt
    noisy = scaling.fit_approach2(isoflop_points(CHINCHILLA, budgets, noise=0.003, seed=4), bootstrap=40)
    lo, hi = noisy["ci"]["a"]
    assert lo <= want <= hi and hi - lo < 0.3 and noisy["bootstrap"] >= 30
    # sizes all on one side of the optimum: the minimum is at the edge, not interior, and not used
    one_sided = [r for r in isoflop_points(CHINCHILLA, budgets) if r["name"].endswith(("-0", "-1", "-2"))]
    assert not any(m["interior"] for m in scaling.isoflop_minima(one_sided))
    assert "a" not in scaling.fit_approach2(one_sided)


def test_capability_fit_recovers_a_power_law_on_the_frontier_and_extrapolates():
    rng = np.random.default_rng(5)
    C = np.geomspace(1e11, 3e12, 8)
    recs = [{"name": f"p{i}", "flops": c, "capability": 40 * c ** -0.06 * math.exp(rng.normal(0, 0.004))}
            for i, c in enumerate(C)]
    # points off the frontier (worse than a cheaper point) are left out of the fit
    recs += [{"name": "bad", "flops": 2e12, "capability": 100.0}, {"name": "none", "flops": 1e12, "capability": None}]
    fit = scaling.fit_capability(recs, bootstrap=30)
    assert "bad" not in fit["frontier"] and "none" not in fit["frontier"]
    assert fit["alpha"] == pytest.approx(0.06, abs=0.01) and fit["ci"]["alpha"][0] <= 0.06 <= fit["ci"]["alpha"][1]
    assert float(scaling.power_law(fit, 3e13)) == pytest.approx(40 * 3e13 ** -0.06, rel=0.02)
    with pytest.raises(SweepError, match="capability fit needs 3 or more"):
        scaling.fit_capability(recs[:2])


def test_minima_law_recovers_the_compute_optimal_loss_exponent():
    """With no irreducible loss, L at the isoFLOP minimum is a pure power law in C with exponent
    alpha beta / (alpha + beta); the parabola minima per budget recover it, and ignore a budget's cheapest point."""
    law = dict(CHINCHILLA, E=1e-12)
    recs = isoflop_points(law, [1e17, 1e18, 1e19, 1e20], per_budget=7)
    for r in recs:  # equal-budget points differ by rounding in FLOPs; the worst one is the cheapest
        r["flops"] = r["budget"] * (0.99 if r["name"].endswith("-0") else 1.0)
    fit = scaling.fit_minima_law(recs, "val_loss", bootstrap=20)
    want = law["alpha"] * law["beta"] / (law["alpha"] + law["beta"])
    assert fit["alpha"] == pytest.approx(want, rel=0.03) and len(fit["minima"]) == 4
    lo, hi = fit["ci"]["alpha"]
    assert lo <= fit["alpha"] <= hi
    n, d = scaling.compute_optimal(law, 1e21)
    assert float(scaling.power_law(fit, 1e21)) == pytest.approx(float(scaling.chinchilla_loss(law, n, d)), rel=0.02)
    assert [m["budget"] for m in scaling.minima_frontier(recs)] == [1e17, 1e18, 1e19, 1e20]
    envelope = scaling.frontier(recs, key="flops")
    assert envelope[0]["name"].endswith("-0")  # the envelope starts at a budget's worst (cheapest) point


def test_backtest_holds_out_the_last_budgets_and_measures_the_seed_noise():
    """On points drawn from a Chinchilla law, L(N, D) fitted without the last budget(s) predicts them to well
    under 1% and its residuals sit at the noise; the offset-free minima law, wrong for a law with E > 0, misses
    the held-out minima by more; the seed noise is the pooled relative std of the repeated points."""
    budgets = [1e17, 1e18, 1e19, 1e20, 1e21]
    recs = isoflop_points(CHINCHILLA, budgets, noise=0.002, seed=3)
    for r in recs:
        r["size"], r["group"] = f"n{r['name'].split('-')[-1]}", "isoflop"
    rng = np.random.default_rng(9)
    repeats = [dict(r, val_loss=r["val_loss"] * math.exp(rng.normal(0, 0.002)), name=r["name"] + "-s1")
               for r in recs if r["name"].endswith("-3")]
    noise = scaling.seed_noise(recs + repeats)
    groups = [(r["val_loss"], q["val_loss"]) for r in recs for q in repeats if q["name"] == r["name"] + "-s1"]
    want = math.sqrt(sum(((a - (a + b) / 2) ** 2 + (b - (a + b) / 2) ** 2) / ((a + b) / 2) ** 2 for a, b in groups)
                     / len(groups))
    assert noise == pytest.approx(want, rel=1e-9) and 0.0005 < noise < 0.006
    assert scaling.seed_noise(recs) is None
    one, two = (scaling.backtest(recs, held=h) for h in (1, 2))
    assert one["held_out"] == [1e21] and two["held_out"] == [1e20, 1e21] and two["fitted_budgets"] == 3
    for t in (one, two):
        p = t["L_ND"]
        assert len(p["errors"]) == 7 * len(t["held_out"]) and p["mean_abs_error"] < 0.01
        assert all(abs(e) < 0.01 for e in p["best_point_errors"].values())
        assert p["in_sample_rms"] < 0.005
    assert set(one["L_Cmin"]["errors"]) == {"min@1e+21"}
    assert abs(one["L_Cmin"]["errors"]["min@1e+21"]) > one["L_ND"]["mean_abs_error"]
    fits = scaling.fit_all(recs + repeats, bootstrap=0)
    assert fits["backtest"][0]["held_out"] == [1e21] and fits["seed_noise"] == pytest.approx(noise, rel=1e-12)
    assert fits["L_ND"]["in_sample_rms"] < 0.005
    lines = scaling.summarize_fits(fits)
    assert "backtest, fitted on 4 budgets, predicting 1e+21" in lines and "in-sample residuals" in lines
    assert f"against a seed noise of {noise:.2%}" in lines
    assert scaling.backtest([r for r in recs if r["budget"] < 1e19], held=1) is None  # 2 budgets: too few


def test_fitted_laws_are_drawn_solid_only_inside_their_range():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gptjax.scaling.plot import draw_law

    fig, ax = plt.subplots()
    lines = draw_law(ax, lambda c: c ** -0.1, 1e11, 1e12, 5e10, 2e13, color="k", label="law (fit)")
    solid, dashed = [ln for ln in lines if ln.get_linestyle() == "-"], [ln for ln in lines if ln.get_linestyle() == "--"]
    assert len(solid) == 1 and len(dashed) == 2
    xs = solid[0].get_xdata()
    assert xs.min() == pytest.approx(1e11) and xs.max() == pytest.approx(1e12)
    assert all(ln.get_xdata().min() >= 5e10 * 0.999 and ln.get_xdata().max() <= 2e13 * 1.001 for ln in dashed)
    assert any("extrapolated" in (ln.get_label() or "") for ln in dashed)
    inside_only = draw_law(ax, lambda c: c, 1e11, 1e12, 1e11, 1e12, color="k", label="x")
    assert [ln.get_linestyle() for ln in inside_only] == ["-"]
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Sweep configs


def test_shipped_sweeps_plan_within_their_promises(tmp_path):
    assert {"cpu-ladder", "gpu-ladder"} <= set(scaling.list_sweeps())
    for name in ("cpu-ladder", "gpu-ladder"):
        sw = scaling.load_sweep(name)
        points, _ = scaling.plan_points(sw, tmp_path / name)
        fitted = [p for p in points if p.group not in ("predict", "lr")]
        (pred,) = [p for p in points if p.group == "predict"]
        assert pred.flops >= 10 * max(p.flops for p in fitted), name
        assert len({p.cfg.model.vocab_size for p in points}) == 1  # one token cache for the whole sweep
        assert len({p.name for p in points}) == len(points)
        for p in points:
            assert p.cfg.run_dir == str(tmp_path / name / p.name)
            if p.budget and p.group == "isoflop":
                spent = p.flops if sw.isoflop.measure == "flops" else 6 * p.n(sw.n_count) * p.tokens
                assert spent == pytest.approx(p.budget, rel=0.02), p.name
    gpu, _ = scaling.plan_points(scaling.load_sweep("gpu-ladder"), tmp_path)
    ns = sorted({p.n_non_embedding for p in gpu if p.group == "ladder"})
    assert len(ns) >= 5 and ns[-1] / ns[0] >= 30
    # the CPU sweep: >= 4 budgets of exact FLOPs, each with >= 5 sizes (room for two on each side of a minimum),
    # an lr sweep before everything else whose rates the other points wait for, and extra seeds
    sw = scaling.load_sweep("cpu-ladder")
    cpu, _ = scaling.plan_points(sw, tmp_path / "cpu")
    budgets = sorted({p.budget for p in cpu if p.group == "isoflop"})
    assert len(budgets) >= 4 and sw.isoflop.measure == "flops" and sw.n_count == "total"
    for b in budgets:
        assert len({p.size for p in cpu if p.group == "isoflop" and p.budget == b}) >= 5, b
    groups = [p.group for p in cpu]
    assert groups[0] == "lr" and groups.index("isoflop") > max(i for i, g in enumerate(groups) if g == "lr")
    assert all(p.lr_pending for p in cpu if p.group not in ("lr",)) and not any(p.lr_pending for p in cpu if p.group == "lr")
    assert {p.seed for p in cpu} == {0, 1, 2} and sw.capability.task == "code-cloze"
    # the dry run's estimate: the sweep's points on one core each, two at a time; the prediction point alone
    (pred,) = [p for p in cpu if p.group == "predict"]
    last = scaling.describe(cpu, sw.n_count, 0.04, 8.0, 2).splitlines()[-1]
    pool = sum(p.flops / (0.04 * PINNED_SPEED * 1e12) + 8.0 for p in cpu if p.group != "predict") / 2
    alone = pred.flops / (0.04 * 1e12) + 8.0
    assert f"{pool / 60:.0f} min for the sweep, 2 at a time" in last and f"{alone / 60:.0f} min for the prediction" in last
    assert f"about {(pool + alone) / 60:.0f} min" in last


def test_sweep_config_errors_are_clear(tmp_path):
    with pytest.raises(SweepError, match="unknown sweep config 'cpu-ladr'.*did you mean 'cpu-ladder'"):
        scaling.load_sweep("cpu-ladr")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sizes": [{"n_layer": 2, "d_model": 64}], "ladder": {"tokns": 5}}))
    with pytest.raises(SweepError, match="unknown key 'sweep.ladder.tokns'; did you mean 'tokens'"):
        scaling.load_sweep(str(bad))
    bad.write_text(json.dumps({"sizes": [{"n_layer": 2, "d_model": 64}], "predict": {"size": "L2-d46"}}))
    with pytest.raises(SweepError, match="unknown size 'L2-d46'; did you mean 'L2-d64'"):
        scaling.load_sweep(str(bad))
    bad.write_text(json.dumps({"sizes": [{"n_layer": 3, "d_model": 64}], "overrides": ["model.n_layers=2"]}))
    with pytest.raises(SweepError, match="did you mean 'model.n_layer'"):
        scaling.plan_points(scaling.load_sweep(str(bad)), tmp_path)


# ----------------------------------------------------------------------------------------------
# predict, with a stand-in trainer whose losses follow a known law: fast, and exact enough to check the
# 10x extrapolation and that the prediction is written before the point trains.

LAW = dict(E=1.2, A=60.0, B=300.0, alpha=0.35, beta=0.4)


def fake_sweep(tmp_path, overrides) -> scaling.SweepConfig:
    path = tmp_path / "fake.json"
    path.write_text(json.dumps({
        "base": "tiny", "overrides": overrides + ["checkpoint.every=1000"], "head_dim": 16, "min_steps": 4,
        "sizes": [{"n_layer": 1, "d_model": 16}, {"n_layer": 1, "d_model": 32}, {"n_layer": 2, "d_model": 32},
                  {"n_layer": 2, "d_model": 48}, {"n_layer": 2, "d_model": 64}, {"n_layer": 3, "d_model": 96},
                  {"name": "big", "n_layer": 4, "d_model": 192, "lr": 1e-3}],
        "ladder": {"tokens": 20000},
        "isoflop": {"budgets": [3e10, 1e11], "sizes": ["L1-d32", "L2-d48", "L2-d64"]},
        "predict": {"size": "big", "tokens": 150000}}))
    return scaling.load_sweep(str(path))


def fake_train(trained: list, prediction_path=None):
    def train(p, log):
        if p.group == "predict":
            assert prediction_path.exists(), "the prediction must be on disk before the point trains"
        trained.append(p.name)
        run_dir = __import__("pathlib").Path(p.cfg.run_dir)
        run_dir.mkdir(parents=True)
        from gptjax import config as config_lib

        config_lib.save_json(p.cfg, run_dir / "config.json")
        loss = float(scaling.chinchilla_loss(LAW, p.n_non_embedding, p.tokens))
        (run_dir / "summary.json").write_text(json.dumps({"val_loss": loss, "val_bits_per_byte": loss / 2}))
        return {"val_loss": loss}
    return train


def test_sweep_resumes_and_predict_extrapolates_10x(tmp_path, tiny_overrides):
    sw = fake_sweep(tmp_path, tiny_overrides)
    out = tmp_path / "sweep"
    trained: list[str] = []
    recs = scaling.sweep(sw, out, train=fake_train(trained), log=lambda _: None)
    assert len(recs) == len(trained) >= 9 and not any(n.startswith("predict") for n in trained)
    assert [json.loads(x)["name"] for x in (out / "results.jsonl").read_text().splitlines()] == trained
    for r in recs:
        assert r["C"] == pytest.approx(6 * r["N_non_embedding"] * r["tokens"])
        assert r["flops"] > r["C"] and r["N_total"] > r["N_non_embedding"]
    again: list[str] = []
    assert scaling.sweep(sw, out, train=fake_train(again), log=lambda _: None) == recs and again == []

    pred = scaling.predict(sw, out, train=True, bootstrap=10, log=lambda _: None,
                           train_fn=fake_train(trained, out / "prediction.json"))
    assert pred["compute_ratio"] >= 10 and pred["N"] > 3 * max(r["N"] for r in recs)
    truth = float(scaling.chinchilla_loss(LAW, pred["N"], pred["tokens"]))
    assert pred["actual_loss"] == pytest.approx(truth)
    assert abs(pred["relative_error"]) < 0.01
    assert pred["error"] == pytest.approx(pred["predicted_loss"] - truth)
    saved = json.loads((out / "prediction.json").read_text())
    assert saved["made_at"] == pred["made_at"] and saved["actual_loss"] == pred["actual_loss"]
    # a second predict keeps the recorded prediction instead of refitting on hindsight
    assert scaling.predict(sw, out, log=lambda _: None, train_fn=fake_train([]))["made_at"] == pred["made_at"]

    # a changed sweep config is refused for a finished point rather than silently mixed in
    changed = scaling.load_sweep(str(tmp_path / "fake.json"))
    with pytest.raises(SweepError, match="trained with another config.*optim.lr"):
        scaling.sweep(changed, out, ["optim.lr=1e-2"], train=fake_train([]), log=lambda _: None)


def test_lr_sweep_tunes_every_size_before_the_points_that_use_it(tmp_path, tiny_overrides):
    """The lr points train first; their best rates (losses quadratic in log lr around lr*(N) = 0.2 N^-0.3) give
    the power law that every other point, the prediction point and the extra seeds train with."""
    path = tmp_path / "lr.json"
    path.write_text(json.dumps({
        "base": "tiny", "overrides": tiny_overrides + ["checkpoint.every=1000"], "head_dim": 16, "min_steps": 4,
        "n_count": "total",
        "sizes": [{"name": "s", "n_layer": 1, "d_model": 16}, {"name": "m", "n_layer": 1, "d_model": 32},
                  {"name": "l", "n_layer": 2, "d_model": 48}, {"name": "fixed", "n_layer": 2, "d_model": 64, "lr": 3e-3},
                  {"name": "big", "n_layer": 3, "d_model": 96}],
        "lr_sweep": {"lrs": [0.002, 0.004, 0.008, 0.016, 0.032], "budget": 5e10, "sizes": ["s", "m", "l"]},
        "isoflop": {"measure": "flops", "budgets": [3e10, 6e10], "sizes": ["s", "m", "l", "fixed"]},
        "extra_seeds": {"seeds": [0, 1], "points": ["iso3e10-m"]},
        "predict": {"size": "big", "tokens": 200000}}))
    sw = scaling.load_sweep(str(path))
    planned, _ = scaling.plan_points(sw, tmp_path / "out")
    assert [p.group for p in planned[:15]] == ["lr"] * 15
    assert {p.name for p in planned if p.lr_pending} == {p.name for p in planned if p.group != "lr" and p.size != "fixed"}
    law = lambda n: 0.2 * n ** -0.3  # noqa: E731
    trained: list = []

    def train(p, log):
        assert not p.lr_pending
        trained.append((p.name, p.cfg.optim.lr))
        run_dir = __import__("pathlib").Path(p.cfg.run_dir)
        run_dir.mkdir(parents=True)
        from gptjax import config as config_lib

        config_lib.save_json(p.cfg, run_dir / "config.json")
        loss = 3.0 + 0.2 * math.log(p.cfg.optim.lr / law(p.n_total)) ** 2 + 1e-6 * p.seed
        (run_dir / "summary.json").write_text(json.dumps({"val_loss": loss, "val_bits_per_byte": loss / 2}))

    recs = scaling.sweep(sw, tmp_path / "out", train=train, log=lambda _: None)
    tuned = json.loads((tmp_path / "out" / "lr.json").read_text())
    assert tuned["law"]["p"] == pytest.approx(0.3, abs=0.01) and tuned["law"]["c"] == pytest.approx(0.2, rel=0.05)
    names = [n for n, _ in trained]
    assert all(n.startswith("lr") for n in names[:15]) and not any(n.startswith("lr") for n in names[15:])
    n_total = {p.size: p.n_total for p in planned}
    for name, lr in trained[15:]:
        size = next(r["size"] for r in recs if r["name"] == name)
        assert lr == pytest.approx(3e-3 if size == "fixed" else law(n_total[size]), rel=0.03), name
    assert "iso3e10-m-s1" in names and "iso3e10-m-s0" not in names  # the first seed is the point itself
    assert not any(r["group"] == "lr" for r in recs) and len(recs) == len(names) - 15
    big = [p for p in scaling.plan_points(sw, tmp_path / "out")[0] if p.group == "predict"][0]
    assert not big.lr_pending and big.cfg.optim.lr == pytest.approx(law(big.n_total), rel=0.03)
    for p in scaling.plan_points(sw, tmp_path / "out")[0]:
        if p.group == "isoflop":
            assert p.flops == pytest.approx(p.budget, rel=0.05)
    again: list = []
    scaling.sweep(sw, tmp_path / "out", train=lambda p, log: again.append(p.name), log=lambda _: None)
    assert again == []
    # the report's tables: the lr sweep's rows (one per swept size, every rate), the seed-noise row, every point
    from gptjax.scaling.report import report

    text = report(tmp_path / "out")
    lr_rows = [ln for ln in text.splitlines() if ln.startswith(("| s |", "| m |", "| l |"))]
    assert len(lr_rows) == 3 and all(ln.count("|") == 2 + 5 + 3 for ln in lr_rows)
    assert "| iso3e10-m | 2 |" in text and all(f"| {r['name']} |" in text for r in recs)

    # a changed lr sweep makes lr.json stale: its sizes wait for a new tuning, and predict refuses to train
    d = json.loads(path.read_text())
    d["lr_sweep"]["lrs"] = [0.003, 0.006, 0.012]
    path.write_text(json.dumps(d))
    changed = scaling.load_sweep(str(path))
    replanned, _ = scaling.plan_points(changed, tmp_path / "out")
    assert all(p.lr_pending for p in replanned if p.group != "lr" and p.size != "fixed")
    with pytest.raises(SweepError, match="lr sweep, which has not finished.*scaling.py sweep"):
        scaling.predict(changed, tmp_path / "out", train=False, log=lambda _: None)
    # extra seeds: not on lr points, not on left-out points, and never a seed the sweep already trains
    for extra, match in ((["lr0.003-s"], "lr-sweep point lr0.003-s"), (["iso3e10-big"], "unknown point")):
        d["extra_seeds"]["points"] = extra
        path.write_text(json.dumps(d))
        with pytest.raises(SweepError, match=match):
            scaling.plan_points(scaling.load_sweep(str(path)), tmp_path / "x")
    d["extra_seeds"] = {"seeds": [0], "points": ["iso3e10-m"]}
    path.write_text(json.dumps(d))
    names = [p.name for p in scaling.plan_points(scaling.load_sweep(str(path)), tmp_path / "x")[0]]
    assert len(names) == len(set(names)) and "iso3e10-m-s0" not in names
    d["min_steps"] = 10 ** 6  # every point left out
    d["extra_seeds"] = {"seeds": [1], "points": ["iso3e10-m"]}
    path.write_text(json.dumps(d))
    with pytest.raises(SweepError, match="leaves out \\(min_steps=1000000\\)"):
        scaling.plan_points(scaling.load_sweep(str(path)), tmp_path / "x")


# ----------------------------------------------------------------------------------------------
# The command, for real: three tiny points train, a rerun skips them, fit and plot write their files.


def test_scaling_command_end_to_end(tmp_path, tiny_overrides, prepared):
    sweep_json = tmp_path / "mini.json"
    sweep_json.write_text(json.dumps({
        "base": "tiny", "overrides": tiny_overrides + ["checkpoint.every=1000", "log_every=2"], "head_dim": 16,
        "min_steps": 2, "warmup_fraction": 0.25,
        "sizes": [{"n_layer": 1, "d_model": 16, "lr": 0.01}, {"n_layer": 1, "d_model": 32, "lr": 0.01},
                  {"n_layer": 2, "d_model": 64, "lr": 0.005}],
        "ladder": {"tokens": 2048}, "capability": {"task": "code-cloze", "items": 24}}))
    out = tmp_path / "sweep"
    proc = run_script("scaling.py", "sweep", sweep_json, "--dir", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in recs] == ["ladder-L1-d16", "ladder-L1-d32", "ladder-L2-d64"]
    for r in recs:
        summary = json.loads((out / r["name"] / "summary.json").read_text())
        assert r["val_loss"] == summary["val_loss"] and math.isfinite(r["val_loss"])
        assert r["tokens"] == 2048 and summary["step"] == 8 and r["C"] == 6 * r["N"] * 2048
        assert r["N"] == summary["parameters"]["non_embedding"] and r["N_total"] == summary["parameters"]["total"]
    assert recs[0]["N"] < recs[1]["N"] < recs[2]["N"]
    for r in recs:  # the capability metric, measured on the trained checkpoint: -log p(target), in nats
        cap = json.loads((out / r["name"] / "capability.json").read_text())
        assert r["capability"] == cap["nll_correct"] > 0 and r["capability_task"] == "code-cloze"
        assert 0 < cap["items"] <= 24 and cap["nll_correct_stderr"] > 0 and 0 <= r["capability_acc"] <= 1
    stamps = [(out / r["name"] / "summary.json").stat().st_mtime_ns for r in recs]

    # --jobs 2: the same points in two child processes pinned to a core each give the same results (up to the
    # summation order of one thread against two) and the same files
    par = tmp_path / "sweep2"
    proc = run_script("scaling.py", "sweep", sweep_json, "--dir", par, "--jobs", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 at a time" in proc.stdout
    recs2 = {json.loads(x)["name"]: json.loads(x) for x in (par / "results.jsonl").read_text().splitlines()}
    assert sorted(recs2) == [r["name"] for r in recs]
    for r in recs:
        r2 = recs2[r["name"]]
        assert r2["val_loss"] == pytest.approx(r["val_loss"], rel=1e-4)
        assert r2["capability"] == pytest.approx(r["capability"], rel=1e-3)
        assert (r2["tokens"], r2["N"], r2["flops"]) == (r["tokens"], r["N"], r["flops"])
        assert "held-out" in (par / "logs" / f"{r['name']}.log").read_text()

    proc = run_script("scaling.py", "sweep", sweep_json, "--dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 already finished, 0 to train" in proc.stdout
    assert [(out / r["name"] / "summary.json").stat().st_mtime_ns for r in recs] == stamps

    main = cli().main
    assert main(["fit", str(sweep_json), "--dir", str(out), "--bootstrap", "10"]) == 0
    fits = json.loads((out / "fits.json").read_text())
    assert fits["points"] == 3 and fits["L_N"]["points"] == 3 and fits["L_N"]["alpha"] >= 0
    assert fits["n_count"] == "non_embedding" and fits["alt"]["n_count"] == "total"
    assert fits["alt"]["L_N"]["points"] == 3
    front = scaling.frontier(recs, key="flops", metric="capability")
    assert ("capability" in fits) == (len(front) >= 3)
    assert main(["plot", str(sweep_json), "--dir", str(out), "--out", str(tmp_path / "png")]) == 0
    for name in ("loss_vs_compute.png", "loss_vs_n.png", "capability.png"):
        data = (tmp_path / "png" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_command_errors_are_one_line(tmp_path, capsys):
    main = cli().main
    assert main(["sweep", "no-such-sweep", "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown sweep config 'no-such-sweep'")
    assert main(["fit", "cpu-ladder", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results.jsonl is missing" in err[0]
    assert main(["predict", "cpu-ladder", "--dir", str(tmp_path), "--no-train"]) == 2
    assert "run `python scaling.py sweep cpu-ladder` first" in capsys.readouterr().err
    assert main(["sweep", "cpu-ladder", "--dry-run", "model.n_layers=3"]) == 2
    assert "did you mean 'model.n_layer'" in capsys.readouterr().err
    assert main(["sweep", "cpu-ladder", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "predict-d64-L4" in out
    minutes = lambda text: float(text.split(", about ")[1].split(" min")[0])  # noqa: E731
    assert main(["sweep", "cpu-ladder", "--dry-run", "--jobs", "2"]) == 0
    out2 = capsys.readouterr().out
    assert "2 at a time on one core each" in out2
    assert minutes(out) / 2 < minutes(out2) < minutes(out)  # two at a time, each on one core: slower per point
    assert main(["sweep", "cpu-ladder", "--jobs", "0", "--dir", str(tmp_path / "j")]) == 2
    assert "--jobs 0: give 1 to" in capsys.readouterr().err


def test_sweep_jobs_a_failing_point_stops_the_pool_with_its_log(tmp_path, tiny_overrides, capsys):
    """A point whose child process fails (here: its corpus does not exist) stops `sweep --jobs 2` with one line
    that names the point and its log; the log holds the child's own error."""
    sweep_json = tmp_path / "bad.json"
    sweep_json.write_text(json.dumps({
        "base": "tiny", "overrides": tiny_overrides + ["data.source=jsonl", f"data.paths={tmp_path}/none/*.jsonl"],
        "head_dim": 16, "min_steps": 2,
        "sizes": [{"n_layer": 1, "d_model": 16, "lr": 0.01}, {"n_layer": 1, "d_model": 32, "lr": 0.01}],
        "ladder": {"tokens": 2048}}))
    assert cli().main(["sweep", str(sweep_json), "--dir", str(tmp_path / "out"), "--jobs", "2"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]  # the rest: the progress bar
    assert len(err) == 1 and err[0].startswith("error: sweep point ladder-L1-d") and "failed (exit 1)" in err[0]
    log = err[0].split("its log: ")[1]
    assert "matches no file" in open(log).read()
    results = tmp_path / "out" / "results.jsonl"
    assert not results.exists() or not results.read_text().strip()
