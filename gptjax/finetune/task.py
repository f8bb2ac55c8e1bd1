"""What a fine-tuning task is, independent of where it came from (a user's JSONL file or a built-in generator).

Kinds, after GPT-1 (Radford et al. 2018, section 3.3 and Figure 1):
  classification   segments (text,)                  label: index into `labels`      e.g. SST-2, CoLA
  entailment       segments (premise, hypothesis)    label: index into `labels`      e.g. MNLI, RTE, QNLI
  similarity       segments (a, b), order-free       label: index into `labels`, or  e.g. MRPC, QQP
                                                      a float score if `regression`   e.g. STS-B
  multiple_choice  segments (context, question)      label: index of the gold choice e.g. RACE, Story Cloze
                   (question may be ""), choices (answer_1, ..., answer_k)
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("classification", "entailment", "similarity", "multiple_choice")


@dataclass(frozen=True)
class Example:
    segments: tuple[str, ...]
    label: int | float
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class FinetuneTask:
    name: str
    kind: str  # one of KINDS
    train: list[Example]
    val: list[Example]
    labels: tuple[str, ...] = ()  # the label vocabulary (saved with the checkpoint); () for regression / choices
    regression: bool = False  # similarity scored as a float (STS-B): a one-output head with squared error
    metrics: tuple[str, ...] = ("acc",)  # the first is the one the best checkpoint is chosen by
    baseline: dict = field(default_factory=dict)  # a trivial baseline's metrics on `val` (majority class, chance...)
    description: str = ""

    @property
    def num_outputs(self) -> int:
        """Head outputs: one per label, one for regression, one logit per choice for multiple choice."""
        if self.kind == "multiple_choice" or self.regression:
            return 1
        return len(self.labels)
