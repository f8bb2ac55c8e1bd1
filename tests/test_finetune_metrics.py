"""gptjax.finetune.metrics: each metric against a hand computation, the bootstrap's behaviour, the baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats

from gptjax.finetune.metrics import METRICS, baseline, score
from gptjax.finetune.task import Example, FinetuneTask


def _from_confusion(cm):
    """gold and predicted lists whose confusion matrix (rows gold, columns predicted) is `cm`."""
    gold, pred = [], []
    for g, row in enumerate(cm):
        for p, count in enumerate(row):
            gold += [g] * count
            pred += [p] * count
    return pred, gold


def test_acc_and_its_stderr_match_hand_computation():
    out = score(["acc"], [1, 0, 1, 1, 0], [1, 1, 1, 0, 0])  # right on 3 of 5
    assert out["acc"] == pytest.approx(0.6)
    assert out["acc_stderr"] == pytest.approx(math.sqrt(0.6 * 0.4 / 4))
    assert out["n"] == 5


def test_binary_f1_and_mcc_match_confusion_matrix():
    # tp=3 (0,1,6), fp=1 (2), fn=1 (5), tn=3 (3,4,7)
    pred = [1, 1, 1, 0, 0, 0, 1, 0]
    gold = [1, 1, 0, 0, 0, 1, 1, 0]
    out = score(["f1", "mcc"], pred, gold)
    tp, fp, fn, tn = 3, 1, 1, 3
    assert out["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))  # 0.75
    assert out["mcc"] == pytest.approx((tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert out["mcc"] == pytest.approx(0.5)


def test_three_class_mcc_is_gorodkin_formula_and_f1_is_macro():
    cm = [[3, 1, 0],
          [2, 2, 1],
          [0, 0, 2]]
    pred, gold = _from_confusion(cm)
    out = score(["f1", "mcc"], pred, gold)
    # gold counts t = (4, 5, 2), predicted counts p = (5, 3, 3), correct c = 7, total s = 11
    cov = 7 * 11 - (4 * 5 + 5 * 3 + 2 * 3)
    denom = math.sqrt((11 ** 2 - (5 ** 2 + 3 ** 2 + 3 ** 2)) * (11 ** 2 - (4 ** 2 + 5 ** 2 + 2 ** 2)))
    assert out["mcc"] == pytest.approx(cov / denom)  # 36 / sqrt(78 * 76)
    # per class 2tp / (2tp + fp + fn): (6/9, 4/8, 4/5)
    assert out["f1"] == pytest.approx((6 / 9 + 4 / 8 + 4 / 5) / 3)


def test_num_classes_above_two_selects_macro_f1_even_if_only_two_classes_seen():
    pred, gold = [1, 1, 0, 0], [1, 0, 0, 0]
    assert score(["f1"], pred, gold)["f1"] == pytest.approx(2 / 3)  # binary: tp=1, fp=1, fn=0
    # macro over the classes seen: class 0 tp=2 fp=0 fn=1 -> 4/5, class 1 -> 2/3
    assert score(["f1"], pred, gold, num_classes=3)["f1"] == pytest.approx((4 / 5 + 2 / 3) / 2)


def test_pearson_and_spearman_match_scipy_on_random_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200)
    out = score(["pearson", "spearman"], x, y)
    assert out["pearson"] == pytest.approx(scipy.stats.pearsonr(x, y)[0])
    assert out["spearman"] == pytest.approx(scipy.stats.spearmanr(x, y)[0])
    # with many ties: average ranks, as scipy
    xi, yi = np.round(x), np.round(y)
    assert score(["spearman"], xi, yi)["spearman"] == pytest.approx(scipy.stats.spearmanr(xi, yi)[0])


def test_monotone_nonlinear_has_spearman_one_and_pearson_below_one():
    x = np.arange(1.0, 21.0)
    out = score(["pearson", "spearman"], x, np.exp(x / 2))
    assert out["spearman"] == pytest.approx(1.0)
    assert out["pearson"] < 0.9
    assert out["pearson"] == pytest.approx(scipy.stats.pearsonr(x, np.exp(x / 2))[0])


def test_degenerate_inputs_give_finite_documented_values():
    # a constant prediction: mcc and the correlations are 0
    out = score(["acc", "f1", "mcc"], [1, 1, 1, 1], [0, 1, 0, 1])
    assert out["mcc"] == 0.0 and out["mcc_stderr"] == 0.0
    out = score(["pearson", "spearman"], [0.5] * 6, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0])
    assert out["pearson"] == 0.0 and out["spearman"] == 0.0
    # no positives predicted and none gold: f1 0
    out = score(["acc", "f1", "mcc"], [0, 0, 0], [0, 0, 0])
    assert out["f1"] == 0.0 and out["mcc"] == 0.0 and out["acc"] == 1.0 and out["acc_stderr"] == 0.0
    # a single example
    out = score(METRICS, [1], [1])
    assert out["acc"] == 1.0 and out["acc_stderr"] == 0.0
    # a constant-within-resample case for every bootstrap statistic (n=2 resamples often repeat one item)
    for pred, gold in [([1], [1]), ([0, 1], [1, 0]), ([2, 2, 2], [2, 2, 2])]:
        out = score(METRICS, pred, gold)
        assert all(math.isfinite(v) for v in out.values()), out


def test_unknown_metric_and_bad_inputs_raise():
    with pytest.raises(ValueError, match="unknown metric"):
        score(["acc", "bleu"], [0], [0])
    with pytest.raises(ValueError):
        score(["acc"], [0, 1], [0])
    with pytest.raises(ValueError):
        score(["acc"], [0.5], [0])
    with pytest.raises(ValueError):
        score(["acc"], [], [])


def test_bootstrap_stderr_is_deterministic_and_shrinks_like_inverse_sqrt_n():
    def sample(n, seed):
        rng = np.random.default_rng(seed)
        gold = rng.integers(0, 2, n)
        pred = np.where(rng.random(n) < 0.75, gold, 1 - gold)
        x = rng.normal(size=n)
        return pred, gold, x, x + rng.normal(size=n)

    def stderrs(n, seed):
        pred, gold, x, y = sample(n, seed)
        out = score(["f1", "mcc"], pred, gold) | score(["pearson", "spearman"], x, y)
        return {m: out[f"{m}_stderr"] for m in ("f1", "mcc", "pearson", "spearman")}

    assert stderrs(100, 5) == stderrs(100, 5)
    small, large = stderrs(100, 5), stderrs(1600, 6)
    for m in small:
        assert 2.5 < small[m] / large[m] < 6, (m, small[m], large[m])


def _task(kind, train, val, **kw):
    return FinetuneTask(name="t", kind=kind, train=train, val=val, **kw)


def test_baseline_majority_class():
    ex = lambda label: Example(segments=("text",), label=label)  # noqa: E731
    task = _task("classification", [ex(1), ex(1), ex(0)], [ex(0), ex(1), ex(1), ex(1)],
                 labels=("neg", "pos"), metrics=("acc", "f1", "mcc"))
    out = baseline(task)
    assert out["name"] == "majority class 'pos'"
    assert out["acc"] == pytest.approx(0.75)
    assert out["acc_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert out["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1 + 0))  # tp=3, fp=1, fn=0
    assert out["mcc"] == 0.0  # constant prediction
    assert out["n"] == 4


def test_baseline_chance_for_multiple_choice():
    def ex(k):
        return Example(segments=("ctx", ""), label=0, choices=tuple(f"c{i}" for i in range(k)))
    four = baseline(_task("multiple_choice", [], [ex(4)] * 3))
    assert four["name"] == "chance" and four["acc"] == pytest.approx(0.25) and four["acc_stderr"] == 0.0
    assert baseline(_task("multiple_choice", [], [ex(2)] * 5))["acc"] == pytest.approx(0.5)
    assert baseline(_task("multiple_choice", [], [ex(4), ex(2)]))["acc"] == pytest.approx(0.375)


def test_baseline_regression_train_mean_has_zero_correlations():
    ex = lambda y: Example(segments=("a", "b"), label=y)  # noqa: E731
    out = baseline(_task("similarity", [ex(1.0), ex(3.0)], [ex(0.5), ex(4.0), ex(2.0)], regression=True,
                         metrics=("pearson", "spearman")))
    assert out["name"] == "train mean"
    assert out["pearson"] == out["spearman"] == out["pearson_stderr"] == out["spearman_stderr"] == 0.0
    # what score() gives for that constant prediction agrees
    same = score(["pearson", "spearman"], [2.0] * 3, [0.5, 4.0, 2.0])
    assert same["pearson"] == same["spearman"] == same["pearson_stderr"] == 0.0
