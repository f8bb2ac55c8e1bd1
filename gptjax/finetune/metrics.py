"""Fine-tuning metrics (GPT-1's GLUE set: acc, F1, MCC, Pearson, Spearman), each with a standard error, and
the trivial baselines a fine-tuned model has to beat. Degenerate inputs give finite numbers, never NaN.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from gptjax.finetune.task import FinetuneTask

METRICS = ("acc", "f1", "mcc", "pearson", "spearman")
CLASS_METRICS = ("acc", "f1", "mcc")
# acc's stderr is analytic; the others come from a bootstrap whose fixed seed makes them reproducible, and every
# metric of one score() call sees the same resamples.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 1234
# Resamples are drawn and scored in chunks of about this many gathered elements, so memory stays bounded
# (a few tens of MB) whatever the validation set's size.
_CHUNK_ELEMENTS = 1 << 22


def score(metrics: Sequence[str], predictions, golds, *, num_classes: int | None = None) -> dict[str, float]:
    """`metrics` of `predictions` against `golds`, each with `<name>_stderr`, plus `n`.

    Class indices for acc/f1/mcc, numbers for pearson/spearman. f1 is the binary F1 of class 1 with two
    classes and the macro-F1 (over the classes that occur in gold or prediction) with more; `num_classes`
    (default: inferred from the largest index seen, at least 2) decides which, so pass the task's label count.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; known: {', '.join(METRICS)}")
    pred, gold = np.asarray(predictions), np.asarray(golds)
    if pred.ndim != 1 or pred.shape != gold.shape:
        raise ValueError(f"predictions and golds must be 1-D and the same length, got {pred.shape} and {gold.shape}")
    n = len(gold)
    if n == 0:
        raise ValueError("no examples to score")
    out: dict[str, float] = {}
    if any(m in CLASS_METRICS for m in metrics):
        pc, gc = _classes(pred, "predictions"), _classes(gold, "golds")
        k = max(2, int(pc.max()) + 1, int(gc.max()) + 1)
        if num_classes is not None:
            if k > max(2, num_classes):
                raise ValueError(f"a class index is >= num_classes={num_classes}")
            k = max(2, num_classes)
    if any(m in ("pearson", "spearman") for m in metrics):
        px, gx = _numbers(pred, "predictions"), _numbers(gold, "golds")
    for m in metrics:
        if m == "acc":
            p = float(np.mean(pc == gc))
            # the sample stderr of a mean of 0/1 values: sqrt(p(1-p)/(n-1)), as lm-evaluation-harness reports
            out["acc"], out["acc_stderr"] = p, (math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0)
        elif m in ("f1", "mcc"):
            stat = _f1 if m == "f1" else _mcc
            out[m], out[f"{m}_stderr"] = _estimate(lambda p, g, stat=stat: stat(_confusion(g, p, k)), pc, gc)
        elif m == "pearson":
            out[m], out[f"{m}_stderr"] = _estimate(_pearson, px, gx)
        else:
            # Spearman is Pearson on average ranks. Rank dense value ids rather than values: a resample's ranks
            # then come from per-value counts (a bincount) instead of a sort of every resample.
            (xs, dx), (ys, dy) = np.unique(px, return_inverse=True), np.unique(gx, return_inverse=True)
            out[m], out[f"{m}_stderr"] = _estimate(
                lambda a, b: _pearson(_average_ranks(a, len(xs)), _average_ranks(b, len(ys))),
                dx.reshape(-1), dy.reshape(-1))
    out["n"] = n
    return out


def baseline(task: FinetuneTask) -> dict[str, float]:
    """A trivial predictor's metrics on `task.val`, with a "name" saying which predictor.

    Classification-like kinds: always the majority class of `task.train` (the lowest index on a tie).
    Multiple choice: a uniform random choice's expected accuracy, mean of 1/len(choices), stderr 0.
    Regression: always the train mean, whose pearson and spearman are 0 (a constant correlates with nothing).
    """
    if not task.val:
        raise ValueError(f"task {task.name!r} has no validation examples")
    n = len(task.val)
    if task.kind == "multiple_choice":
        if any(not ex.choices for ex in task.val):
            raise ValueError(f"task {task.name!r}: a multiple-choice example has no choices")
        return {"name": "chance", "acc": float(np.mean([1 / len(ex.choices) for ex in task.val])),
                "acc_stderr": 0.0, "n": n}
    if task.regression:
        return {"name": "train mean", "pearson": 0.0, "pearson_stderr": 0.0, "spearman": 0.0,
                "spearman_stderr": 0.0, "n": n}
    if not task.train:
        raise ValueError(f"task {task.name!r} has no training examples to take a majority class from")
    train = _classes(np.asarray([ex.label for ex in task.train]), "train labels")
    majority = int(np.argmax(np.bincount(train)))  # argmax takes the first maximum: the lowest index on a tie
    label = repr(task.labels[majority]) if majority < len(task.labels) else str(majority)
    golds = [ex.label for ex in task.val]
    out = score(task.metrics, [majority] * n, golds, num_classes=len(task.labels) or None)
    return {"name": f"majority class {label}", **out}


def _estimate(stat: Callable[..., np.ndarray], *columns: np.ndarray) -> tuple[float, float]:
    """`stat` on the data and the standard deviation of `stat` over bootstrap resamples (ddof=1).

    `stat` takes (resamples, n) arrays and returns one value per resample.
    """
    n = len(columns[0])
    value = float(stat(*(c[None] for c in columns))[0])
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    rows = max(1, _CHUNK_ELEMENTS // n)
    values = []
    for start in range(0, BOOTSTRAP_RESAMPLES, rows):
        idx = rng.integers(0, n, size=(min(rows, BOOTSTRAP_RESAMPLES - start), n))
        values.append(stat(*(c[idx] for c in columns)))
    return value, float(np.std(np.concatenate(values), ddof=1))


def _classes(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype.kind == "b":
        return a.astype(np.int64)
    if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
        a = a.astype(np.int64)
    if a.dtype.kind not in "iu" or (a.size and a.min() < 0):
        raise ValueError(f"{what} must be class indices (non-negative integers)")
    return a.astype(np.int64)


def _numbers(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{what} must be numbers")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} must be finite")
    return a


def _confusion(gold: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(resamples, k, k) confusion matrices, rows gold and columns predicted, by one bincount."""
    b = gold.shape[0]
    flat = (np.arange(b)[:, None] * k + gold) * k + pred
    return np.bincount(flat.ravel(), minlength=b * k * k).reshape(b, k, k).astype(np.float64)


def _f1(cm: np.ndarray) -> np.ndarray:
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    denom = 2 * tp + (cm.sum(-2) - tp) + (cm.sum(-1) - tp)  # 2tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)  # 0 for a class never gold nor predicted
    if cm.shape[-1] == 2:
        return f1[:, 1]
    return f1.sum(-1) / np.maximum((denom > 0).sum(-1), 1)


def _mcc(cm: np.ndarray) -> np.ndarray:
    """Gorodkin's multiclass MCC (equal to the binary formula for two classes); 0 when either side is constant."""
    t, p = cm.sum(-1), cm.sum(-2)  # gold and predicted counts per class
    c, s = np.trace(cm, axis1=-2, axis2=-1), cm.sum((-2, -1))
    cov = c * s - (t * p).sum(-1)
    denom = (s * s - (p * p).sum(-1)) * (s * s - (t * t).sum(-1))
    return np.divide(cov, np.sqrt(np.maximum(denom, 0)), out=np.zeros_like(cov), where=denom > 0)


def _pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Row-wise Pearson r; 0 where either row is constant."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    xc, yc = x - x.mean(-1, keepdims=True), y - y.mean(-1, keepdims=True)
    denom = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    # test constancy exactly: a constant row minus its floating-point mean need not be exactly zero
    varies = (x.max(-1) > x.min(-1)) & (y.max(-1) > y.min(-1)) & (denom > 0)
    r = np.divide((xc * yc).sum(-1), denom, out=np.zeros(x.shape[0]), where=varies)
    return np.clip(r, -1.0, 1.0)


def _average_ranks(ids: np.ndarray, levels: int) -> np.ndarray:
    """Row-wise 1-based ranks of dense value ids in [0, levels), ties given their average rank."""
    b = ids.shape[0]
    counts = np.bincount((np.arange(b)[:, None] * levels + ids).ravel(), minlength=b * levels).reshape(b, levels)
    below = np.cumsum(counts, axis=-1) - counts
    return np.take_along_axis(below + (counts + 1) / 2, ids, axis=-1)
