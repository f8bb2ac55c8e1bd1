"""The pretrained model on a fine-tuning task with no fine-tuning, scored by likelihood as GPT-1 (section 5,
"zero-shot behaviours") and GPT-2 score tasks, so it can stand beside the fine-tuned score.

  multiple_choice  the choice with the highest mean token log-probability given the context (GPT-1's RACE rule)
  classification   generative: the label whose header line `# <label>\n` makes the text most likely
  entailment,      a single feature, the pointwise mutual information of the second segment with the first
  similarity       (mean log p(b | a) - mean log p(b)), cut into classes by thresholds chosen on training
                   items (GPT-1 thresholds its CoLA score the same way); the label order of the thresholds is
                   chosen on the training items too.
"""

from __future__ import annotations

import itertools

import numpy as np

from gptjax.eval.tasks import encode_pair
from gptjax.finetune import metrics as metrics_lib
from gptjax.finetune.task import Example, FinetuneTask


def _mean_ll(scorer, tok, pairs: list[tuple[str, str]], desc: str) -> np.ndarray:
    enc = [encode_pair(tok, c, x) for c, x in pairs]
    enc = [(c, x if x else [tok.eot_id]) for c, x in enc]
    ll = scorer.loglikelihood(enc, desc=desc)
    return np.asarray([v / len(x) for (v, _), (_, x) in zip(ll, enc)])


def _pmi(scorer, tok, items: list[Example], desc: str) -> np.ndarray:
    cond = _mean_ll(scorer, tok, [(e.segments[0] + "\n", e.segments[1]) for e in items], desc)
    prior = _mean_ll(scorer, tok, [("", e.segments[1]) for e in items], desc)
    return cond - prior


def _fit_thresholds(x: np.ndarray, y: np.ndarray, k: int) -> tuple[tuple[int, ...], np.ndarray]:
    """The label order and k-1 cut points on x that classify the training items best (accuracy)."""
    qs = np.quantile(x, np.linspace(0.02, 0.98, 49))
    best = (-1.0, None, None)
    for order in itertools.permutations(range(k)):
        for cuts in itertools.combinations(qs, k - 1):
            pred = np.asarray(order)[np.searchsorted(np.asarray(cuts), x)]
            acc = float((pred == y).mean())
            if acc > best[0]:
                best = (acc, order, np.asarray(cuts))
    return best[1], best[2]


def zero_shot(task: FinetuneTask, scorer, tok, *, n_calibrate: int = 300) -> dict:
    """Metrics of the pretrained model on task.val, with how it was scored."""
    val = task.val
    golds = np.asarray([e.label for e in val])
    if task.kind == "multiple_choice":
        pairs = [((e.segments[0] + ("\n" + e.segments[1] if e.segments[1] else "")).rstrip() + "\n", c)
                 for e in val for c in e.choices]
        ll = _mean_ll(scorer, tok, pairs, f"{task.name} zero-shot")
        preds, i = [], 0
        for e in val:
            preds.append(int(np.argmax(ll[i:i + len(e.choices)])))
            i += len(e.choices)
        how = "choice with the highest mean token log-probability"
    elif task.kind == "classification":
        pairs = [(f"# {lab}\n", e.segments[0]) for e in val for lab in task.labels]
        ll = _mean_ll(scorer, tok, pairs, f"{task.name} zero-shot").reshape(len(val), len(task.labels))
        preds = list(np.argmax(ll, axis=1))
        how = "label whose '# <label>' header makes the text most likely"
    else:
        if task.regression:
            raise NotImplementedError("zero-shot scoring of a regression task")
        cal = task.train[:n_calibrate]
        order, cuts = _fit_thresholds(_pmi(scorer, tok, cal, f"{task.name} calibrate"),
                                      np.asarray([e.label for e in cal]), len(task.labels))
        x = _pmi(scorer, tok, val, f"{task.name} zero-shot")
        preds = list(np.asarray(order)[np.searchsorted(cuts, x)])
        how = f"PMI of the second segment with the first, {len(task.labels) - 1} threshold(s) fit on {len(cal)} train items"
    m = metrics_lib.score(task.metrics, np.asarray(preds), golds, num_classes=len(task.labels) or None)
    m["how"] = how
    return m
