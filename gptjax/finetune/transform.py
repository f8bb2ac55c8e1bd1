"""GPT-1's input transformations (Radford et al. 2018, Figure 1): every task becomes token sequences with a
start token, a delimiter between segments and an extract token whose final state the head reads.

  classification   [start; text; extract]                                   1 row
  entailment       [start; premise; delim; hypothesis; extract]             1 row
  similarity       [start; a; delim; b; extract] and [start; b; delim; a; extract]   2 rows, states summed
  multiple choice  [start; context question; delim; answer_k; extract]      1 row per choice

The three control tokens are the tokenizer's reserved task tokens (`<|task0|>`, `<|task1|>`, `<|task2|>` in
gptjax's SentencePiece models). A tokenizer without them (GPT-2's BPE) gets three new ids just past its
vocabulary: new embedding rows, which with the padded vocabulary usually already exist as unused padding.

Truncation to the context cuts the longest segment that may be cut (two equally long ones shrink together), and
never the hypothesis, the question or an answer: a premise or a multiple-choice context loses its beginning (its
end is nearest to what follows), any other segment its end. An input whose protected parts alone do not fit is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gptjax.errors import TaskError
from gptjax.finetune.task import Example, FinetuneTask

TASK_TOKENS = ("<|task0|>", "<|task1|>", "<|task2|>")  # start, delimiter, extract


@dataclass(frozen=True)
class SpecialIds:
    start: int
    delim: int
    extract: int
    pad: int
    added: int  # how many of the three are new ids past the tokenizer's vocabulary


def special_ids(tokenizer, vocab_size: int) -> SpecialIds:
    """The start, delimiter and extract ids: the tokenizer's reserved task tokens, or three new ids just past both
    the tokenizer's and the model's vocabulary (`vocab_size`)."""
    ids = [tokenizer.token_id(t) for t in TASK_TOKENS]
    if all(i is not None for i in ids):
        return SpecialIds(*ids, pad=tokenizer.pad_id, added=0)
    base = max(tokenizer.vocab_size, vocab_size)
    return SpecialIds(base, base + 1, base + 2, pad=tokenizer.pad_id, added=3)


def _fit(segs: list[list[int]], protected: list[bool], budget: int, where: str, context: int | None = None
         ) -> list[list[int]]:
    """Cut the longest cuttable segment until all fit `budget` (segments of equal length then shrink together).
    Segment `context` loses its beginning, any other its end."""
    segs = [list(s) for s in segs]
    fixed = sum(len(s) for s, p in zip(segs, protected) if p)
    if fixed > budget:
        raise TaskError(f"{where} does not fit the {budget}-token budget even with its other segments cut "
                        f"({fixed} tokens in its hypothesis / question / answer); shorten it or raise max_len")
    while sum(map(len, segs)) > budget:
        cuttable = sorted((j for j in range(len(segs)) if not protected[j]), key=lambda j: -len(segs[j]))
        i = cuttable[0]
        runner_up = len(segs[cuttable[1]]) if len(cuttable) > 1 else 0
        cut = max(1, min(sum(map(len, segs)) - budget, len(segs[i]) - runner_up))
        segs[i] = segs[i][cut:] if i == context else segs[i][:-cut]
    return segs


def example_rows(task: FinetuneTask, ex: Example, tok, ids: SpecialIds, max_len: int, where: str = "an example"
                 ) -> list[list[int]]:
    """The token rows of one example (each ending with the extract token), each at most max_len long."""
    enc = tok.encode
    if task.kind == "classification":
        (text,) = _fit([enc(ex.segments[0])], [False], max_len - 2, where)
        return [[ids.start] + text + [ids.extract]]
    if task.kind == "entailment":
        p, h = _fit([enc(ex.segments[0]), enc(ex.segments[1])], [False, True], max_len - 3, where, context=0)
        return [[ids.start] + p + [ids.delim] + h + [ids.extract]]
    if task.kind == "similarity":
        a, b = _fit([enc(ex.segments[0]), enc(ex.segments[1])], [False, False], max_len - 3, where)
        return [[ids.start] + a + [ids.delim] + b + [ids.extract], [ids.start] + b + [ids.delim] + a + [ids.extract]]
    # multiple choice: the context and the question share the row before the delimiter
    context = enc(ex.segments[0])
    question = enc(ex.segments[1]) if len(ex.segments) > 1 and ex.segments[1] else []
    rows = []
    for choice in ex.choices:
        c, q, a = _fit([context, question, enc(choice)], [False, True, True], max_len - 3, where, context=0)
        rows.append([ids.start] + c + q + [ids.delim] + a + [ids.extract])
    return rows


@dataclass
class Encoded:
    """A task's examples as padded arrays: tokens [N, R, T], extract positions [N, R], row mask [N, R],
    labels [N] (int32 class / choice, or float32 score)."""

    tokens: np.ndarray
    extract: np.ndarray
    rows: np.ndarray
    labels: np.ndarray
    dropped: int = 0  # examples left out because they did not fit (drop_long)
    kept: list | None = None  # the examples encoded, in order

    def __len__(self) -> int:
        return len(self.labels)


def encode(task: FinetuneTask, examples: list[Example], tok, ids: SpecialIds, max_len: int,
           length: int | None = None, split: str = "train", drop_long: bool = False) -> Encoded:
    """Encode `examples`; rows are right-padded to `length` (default: the longest row, rounded up to 16). An
    example that cannot fit is an error, or with `drop_long` left out and counted."""
    per, kept, n_in = [], [], len(examples)
    for i, ex in enumerate(examples):
        try:
            per.append(example_rows(task, ex, tok, ids, max_len, where=f"{task.name} {split} item {i}"))
            kept.append(ex)
        except TaskError:
            if not drop_long:
                raise
    if not per:
        raise TaskError(f"no {task.name} {split} item fits max_len={max_len}; raise max_len")
    examples = kept
    R = max(len(r) for r in per)
    T = length or min(max_len, -(-max(len(row) for r in per for row in r) // 16) * 16)
    tokens = np.full((len(per), R, T), ids.pad, np.int32)
    extract = np.zeros((len(per), R), np.int32)
    rows = np.zeros((len(per), R), np.float32)
    for i, r in enumerate(per):
        for j, row in enumerate(r):
            row = row[-T:]  # only when `length` is shorter than this split's rows: keep the extract token
            tokens[i, j, :len(row)] = row
            extract[i, j] = len(row) - 1
            rows[i, j] = 1.0
    dtype = np.float32 if task.regression else np.int32
    labels = np.asarray([ex.label for ex in examples], dtype)
    return Encoded(tokens, extract, rows, labels, dropped=n_in - len(kept), kept=kept)
