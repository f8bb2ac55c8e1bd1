"""Reading a user's labelled JSONL files into a FinetuneTask (gptjax.finetune.task).

The format is told from the keys of the records (extra keys, such as GLUE's "idx", are ignored):
  sst2        {sentence, label}                          classification     SST-2, CoLA
  mnli        {premise, hypothesis, label}               entailment         MNLI
  qnli        {question, sentence, label}                entailment         QNLI
  rte         {sentence1, sentence2, label}              entailment         RTE; similarity if the file or task name
                                                                            says "mrpc" or kind="similarity" (MRPC);
                                                                            float scores make it regression (STS-B)
  qqp         {question1, question2, label}              similarity         QQP
  race        {article, question, options, answer}       multiple_choice    RACE (answer "A".."D" or a 0-based index)
  storycloze  {InputSentence1..4, RandomFifthSentenceQuiz1, RandomFifthSentenceQuiz2, AnswerRightEnding (1 or 2)}

Any other file needs a fields mapping from our roles to its keys, ROLE=KEY,... (`--fields text=review,label=stars`):
  text | premise,hypothesis | a,b | context,choices[,question]   plus label (default key "label")
choices is a list of answer strings; a multiple-choice label is the gold index (or a letter).

Class labels are ints or strings; the vocabulary is built from the train file unless one is passed (a checkpoint's).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptjax.data.sources import is_validation, iter_jsonl
from gptjax.errors import TaskError
from gptjax.finetune.task import KINDS, Example, FinetuneTask

FIELDS_EXAMPLE = "--fields text=review,label=stars"
ROLES = ("text", "premise", "hypothesis", "a", "b", "context", "question", "choices", "label")
ROLE_SETS = {  # the segment roles of a mapping -> its kind
    frozenset({"text"}): "classification",
    frozenset({"premise", "hypothesis"}): "entailment",
    frozenset({"a", "b"}): "similarity",
    frozenset({"context", "choices"}): "multiple_choice",
    frozenset({"context", "question", "choices"}): "multiple_choice",
}
ROLES_HINT = "text | premise,hypothesis | a,b | context,choices[,question], plus label"
PAIR_KINDS = ("entailment", "similarity")  # two segments: either kind reads them


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    kind: str
    segments: tuple[str, ...]  # the record keys, in segment order
    label: str
    choices: tuple[str, ...] = ()  # one key: a list of answers; several keys: one answer each (Story Cloze)
    optional: tuple[str, ...] = ()  # keys that must be present but may be "" (a multiple-choice question)
    join: bool = False  # the segments are joined by " " into one context (Story Cloze's four sentences)
    one_based: bool = False  # the label counts choices from 1 (Story Cloze's AnswerRightEnding)

    @property
    def keys(self) -> tuple[str, ...]:
        return self.segments + self.choices + (self.label,)


_STORY = tuple(f"InputSentence{i}" for i in range(1, 5))
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("sst2", "SST-2/CoLA-style sentences", "classification", ("sentence",), "label"),
    Format("mnli", "MNLI-style pairs", "entailment", ("premise", "hypothesis"), "label"),
    Format("qnli", "QNLI-style question/sentence pairs", "entailment", ("question", "sentence"), "label"),
    Format("rte", "RTE-style pairs", "entailment", ("sentence1", "sentence2"), "label"),
    Format("qqp", "QQP-style question pairs", "similarity", ("question1", "question2"), "label"),
    Format("race", "RACE-style reading comprehension", "multiple_choice", ("article", "question"), "answer",
           choices=("options",), optional=("question",)),
    Format("storycloze", "Story Cloze endings", "multiple_choice", _STORY, "AnswerRightEnding",
           choices=("RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2"), join=True, one_based=True),
)}


def parse_fields(spec: str) -> dict[str, str]:
    """'text=review,label=stars' -> {'text': 'review', 'label': 'stars'}."""
    out: dict[str, str] = {}
    for item in spec.split(","):
        role, eq, key = (s.strip() for s in item.partition("="))
        if not eq or not role or not key:
            raise TaskError(f"fields '{spec}': '{item.strip()}' is not ROLE=KEY; write e.g. {FIELDS_EXAMPLE}")
        if role in out:
            raise TaskError(f"fields '{spec}' names the role '{role}' twice; give each role one key")
        out[role] = key
    _check_roles(out)
    return out


def _check_roles(fields: dict[str, str]) -> None:
    unknown = [r for r in fields if r not in ROLES]
    if unknown:
        raise TaskError(f"unknown field role {unknown[0]!r}; roles are {ROLES_HINT} (e.g. {FIELDS_EXAMPLE})")
    bad = [r for r, k in fields.items() if not isinstance(k, str) or not k]
    if bad:
        raise TaskError(f"field role '{bad[0]}' must map to a key name; write e.g. {FIELDS_EXAMPLE}")


def _mapped(fields: dict[str, str]) -> Format:
    _check_roles(fields)
    roles = dict(fields)
    label = roles.pop("label", "label")
    kind = ROLE_SETS.get(frozenset(roles))
    spec = ",".join(f"{r}={k}" for r, k in fields.items())
    if kind is None:
        raise TaskError(f"fields '{spec}' give the roles {', '.join(roles) or 'none'}; give one of {ROLES_HINT}")
    if kind == "multiple_choice":
        segments = (roles["context"],) + ((roles["question"],) if "question" in roles else ())
        return Format("fields", f"multiple-choice records mapped by fields {spec}", kind, segments, label,
                      choices=(roles["choices"],), optional=segments[1:])
    segments = tuple(roles[r] for r in {"classification": ("text",), "entailment": ("premise", "hypothesis"),
                                        "similarity": ("a", "b")}[kind])
    return Format("fields", f"{kind} records mapped by fields {spec}", kind, segments, label)


def _detect(rec: dict, path: Path) -> Format:
    # the most specific format first: a QNLI record also has SST-2's keys
    for fmt in sorted(FORMATS.values(), key=lambda f: -len(f.keys)):
        if set(fmt.keys) <= set(rec):
            return fmt
    raise TaskError(f"cannot tell the format of {path} from its keys ({', '.join(sorted(rec)) or 'none'}); "
                    f"map them to roles, e.g. {FIELDS_EXAMPLE} (roles: {ROLES_HINT})")


def _records(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise TaskError(f"{path} does not exist or is not a file; check the path")
    rows = []
    for i, rec in iter_jsonl(path, TaskError):
        if not isinstance(rec, dict):
            raise TaskError(f"{path}:{i} is not a JSON object; write one example per line, "
                            f'e.g. {{"sentence": "...", "label": 1}}')
        rows.append((i, rec))
    if not rows:
        raise TaskError(f'{path} holds no examples; write one JSON object per line, e.g. {{"sentence": "...", '
                        f'"label": 1}}')
    return rows


def _text(rec: dict, key: str, where: str, optional: bool = False) -> str:
    v = rec[key]
    if optional and v in (None, ""):
        return ""
    if not isinstance(v, str):
        raise TaskError(f"{where}: '{key}' is {type(v).__name__}, not a string; fix or drop the line")
    if not v.strip():
        raise TaskError(f"{where}: '{key}' is empty; every example needs its text, fix or drop the line")
    return v


def _extract(fmt: Format, rec: dict, where: str) -> tuple[tuple[str, ...], tuple[str, ...], Any]:
    """(segments, choices, raw label) of one record, every key checked."""
    for key in fmt.keys:
        if key not in rec:
            need = ("the fields mapping names it" if fmt.name == "fields"
                    else f"{fmt.description} need {', '.join(fmt.keys)}")
            raise TaskError(f"{where} has no key '{key}' ({need}); add it or drop the line")
    texts = tuple(_text(rec, k, where, k in fmt.optional) for k in fmt.segments)
    if fmt.kind != "multiple_choice":
        return texts, (), rec[fmt.label]
    segments = (" ".join(texts), "") if fmt.join else (texts + ("",))[:2]
    if len(fmt.choices) > 1:
        choices = tuple(_text(rec, k, where) for k in fmt.choices)
    else:
        key = fmt.choices[0]
        v = rec[key]
        if not isinstance(v, list) or len(v) < 2:
            n = len(v) if isinstance(v, list) else type(v).__name__
            raise TaskError(f"{where}: '{key}' must be a list of at least two answers (it has {n}); "
                            f"fix or drop the line")
        for j, c in enumerate(v):
            if not isinstance(c, str) or not c.strip():
                raise TaskError(f"{where}: answer {j} in '{key}' is {c!r}, not a non-empty string; "
                                f"fix or drop the line")
        choices = tuple(v)
    return segments, choices, rec[fmt.label]


def _choice_index(raw: Any, n: int, one_based: bool, where: str) -> int:
    idx = None
    if isinstance(raw, int) and not isinstance(raw, bool):
        idx = raw
    elif isinstance(raw, float) and raw.is_integer():
        idx = int(raw)
    elif isinstance(raw, str) and re.fullmatch(r"\s*-?\d+\s*", raw):
        idx = int(raw)
    elif isinstance(raw, str) and len(raw.strip()) == 1 and raw.strip().isalpha() and not one_based:
        idx = ord(raw.strip().upper()) - ord("A")
    if idx is not None and one_based:
        idx -= 1
    if idx is None or not 0 <= idx < n:
        first = "1" if one_based else "0 or A"
        raise TaskError(f"{where}: answer {raw!r} is not one of its {n} choices (counted from {first}); "
                        f"fix or drop the line")
    return idx


def _class_label(raw: Any, where: str) -> str:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)) or (isinstance(raw, float)
                                                                            and not raw.is_integer()):
        raise TaskError(f"{where}: label {raw!r} is not an integer or a string; fix or drop the line")
    return str(int(raw)) if isinstance(raw, float) else str(raw)


def _score(raw: Any, where: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise TaskError(f"{where}: label {raw!r} is not a finite number, and this is a regression task "
                        f"(float scores); fix or drop the line")
    return float(raw)


def _vocab_key(s: str) -> tuple:
    return (0, int(s), "") if re.fullmatch(r"-?\d+", s) else (1, 0, s)


def _is_minus_one(raw: Any) -> bool:
    return isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw == -1


def _is_float_score(raw: Any) -> bool:
    return isinstance(raw, float) and not raw.is_integer()


def load_task(train_path, val_path=None, *, kind: str | None = None, fields: dict[str, str] | None = None,
              labels: tuple[str, ...] | None = None, name: str | None = None,
              val_fraction: float = 0.1) -> FinetuneTask:
    """The task in a train JSONL file and, optionally, a val file (else examples are held out by content hash)."""
    if kind is not None and kind not in KINDS:
        raise TaskError(f"unknown task kind {kind!r}; use one of {', '.join(KINDS)}")
    if labels is not None:
        labels = tuple(str(x) for x in labels)
    train_path = Path(train_path).expanduser()
    paths = [train_path] + ([Path(val_path).expanduser()] if val_path is not None else [])
    recs = {p: _records(p) for p in paths}
    fmt = _mapped(fields) if fields is not None else _detect(recs[train_path][0][1], train_path)
    name = name or train_path.stem
    tag = f"{name} {train_path.name}".lower()  # what the user called the task: says MRPC or CoLA

    task_kind = kind or fmt.kind
    fits = PAIR_KINDS if fmt.kind in PAIR_KINDS else (fmt.kind,)
    if task_kind not in fits:
        raise TaskError(f"kind={task_kind} does not fit {train_path} ({fmt.description}); "
                        f"use {' or '.join('kind=' + k for k in fits)}, or map other fields with {FIELDS_EXAMPLE}")
    if fmt.name == "rte" and kind is None and "mrpc" in tag:
        task_kind = "similarity"

    rows = {p: [(f"{p}:{i}",) + _extract(fmt, rec, f"{p}:{i}") for i, rec in recs[p]] for p in paths}
    for p in paths:
        if all(_is_minus_one(r[3]) for r in rows[p]):
            raise TaskError(f"{p} is a test split without labels (every label is -1); fine-tune on the train "
                            f"split and evaluate on the validation split")

    regression = False
    if task_kind != "multiple_choice":
        score = next(((w, raw) for p in paths for w, _, _, raw in rows[p] if _is_float_score(raw)), None)
        if score is not None:
            if fmt.name == "rte" and kind is None:
                task_kind = "similarity"  # STS-B: scored sentence pairs
            if task_kind != "similarity":
                fix = "pass kind=similarity for a regression task, or " if task_kind in PAIR_KINDS else ""
                raise TaskError(f"{score[0]} has the score {score[1]!r}, but only similarity tasks take float "
                                f"scores; {fix}fix the label")
            if labels:
                raise TaskError(f"{score[0]} has the score {score[1]!r}, but the label vocabulary "
                                f"({', '.join(labels)}) was given; a regression task has none")
            regression = True
        elif labels is not None and len(labels) == 0:
            # an empty vocabulary comes from a regression checkpoint: integer scores are still scores
            numeric = all(isinstance(raw, (int, float)) and not isinstance(raw, bool)
                          for p in paths for *_, raw in rows[p])
            if fmt.name == "rte" and kind is None and numeric:
                task_kind = "similarity"
            if task_kind != "similarity" or not numeric:
                raise TaskError(f"an empty label vocabulary (regression) was given, but {train_path} holds "
                                f"{task_kind} labels; pass the checkpoint's vocabulary, or none to build "
                                f"it from the train file")
            regression = True
    elif labels:
        raise TaskError(f"a label vocabulary ({', '.join(labels)}) was given, but {train_path} is a "
                        f"multiple-choice task, which has none; pass no labels")

    source = ""
    if task_kind == "multiple_choice" or regression:
        vocab: tuple[str, ...] = ()
    elif labels is not None:
        vocab = tuple(str(x) for x in labels)
        source = "the vocabulary passed in"
    else:
        seen = {_class_label(raw, w) for w, _, _, raw in rows[train_path]}
        vocab = tuple(sorted(seen, key=_vocab_key))
        source = f"the vocabulary built from {train_path}"
        if len(vocab) < 2:
            raise TaskError(f"{train_path} has only the label {vocab[0]!r}; a classifier needs at least two "
                            f"labels in the train file")

    examples: dict[Path, list[Example]] = {}
    for p in paths:
        out = []
        for where, segments, choices, raw in rows[p]:
            if task_kind == "multiple_choice":
                label: int | float = _choice_index(raw, len(choices), fmt.one_based, where)
            elif regression:
                label = _score(raw, where)
            else:
                s = _class_label(raw, where)
                if s not in vocab:
                    raise TaskError(f"{where}: label {s!r} is not in {source} ({', '.join(vocab)}); "
                                    f"fix the label or drop the line")
                label = vocab.index(s)
            out.append(Example(segments, label, choices))
        examples[p] = out

    if val_path is not None:
        train, val = examples[train_path], examples[paths[1]]
    else:
        if not 0 < val_fraction < 1:
            raise TaskError(f"val_fraction must be between 0 and 1 (got {val_fraction}); or pass a val file")
        held = [is_validation(json.dumps(e.segments + e.choices), val_fraction) for e in examples[train_path]]
        train = [e for e, h in zip(examples[train_path], held) if not h]
        val = [e for e, h in zip(examples[train_path], held) if h]
        if not val:
            train, val = train[:-1], train[-1:]
        if not train:
            raise TaskError(f"{train_path} has too few examples ({len(val)}) to hold some out for validation; "
                            f"add examples or pass a val file")

    if regression:
        metrics: tuple[str, ...] = ("pearson", "spearman")
    elif task_kind == "multiple_choice" or len(vocab) > 2:
        metrics = ("acc",)
    elif "cola" in tag:
        metrics = ("mcc", "acc")  # CoLA is unbalanced and reported by Matthews correlation
    else:
        metrics = ("acc", "f1", "mcc")

    description = fmt.description
    if fmt.name == "rte" and regression:
        description = "STS-B-style scored pairs"
    elif fmt.name == "rte" and task_kind == "similarity":
        description = "MRPC-style paraphrase pairs"
    elif fmt.name != "fields" and task_kind != fmt.kind:
        description = f"{fmt.description}, read as {task_kind}"
    return FinetuneTask(name=name, kind=task_kind, train=train, val=val, labels=vocab, regression=regression,
                        metrics=metrics, description=description)
