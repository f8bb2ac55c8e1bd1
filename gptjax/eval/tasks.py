"""Zero-, one- and few-shot tasks, scored by log-likelihood the way the GPT-2 and GPT-3 papers (and
EleutherAI's lm-evaluation-harness) do.

Task kinds and the JSONL record each one reads (one JSON object per line):
  multiple_choice  {"context": str, "choices": [str, ...], "gold": int}
                   acc: the gold choice has the highest log-likelihood; acc_norm: the same after dividing each
                   choice's log-likelihood by its length in characters (lm-evaluation-harness's acc_norm).
  cloze            {"context": str, "target": str}            (LAMBADA: the text and its last word)
                   acc: every token of the target is the greedy prediction; ppl: exp(-mean log-likelihood of
                   the target).
  perplexity       {"text": str} per line, or a plain text file (one document)
                   token perplexity and bits per byte over whole documents (rolling context windows).
The scored continuation is `target_delimiter + answer` (default " "; the built-in code tasks use "").

Known public formats are read as they are downloaded: HellaSwag (ctx/endings/label), ARC
(question/choices/answerKey, nested or flat), LAMBADA ({"text"}: last word is the target). See
docs/evaluation.md.

Built-in tasks need no download: they are generated deterministically from the built-in corpus (the
Python standard library), test items from its held-out documents and few-shot examples from its
training documents, so a freshly trained checkpoint has something meaningful to be scored on:
  code-nextline   which of 4 lines comes next after 2-12 lines of code (distractors: lines of the same
                  indentation from elsewhere in the held-out files)
  code-cloze      complete an identifier that already appeared in the preceding 4-20 lines (LAMBADA-like:
                  the answer is recoverable from the context, not from the line alone)
"""

from __future__ import annotations

import builtins
import json
import keyword
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from gptjax.errors import TaskError

KINDS = ("multiple_choice", "cloze", "perplexity")
FORMATS = ("auto", "multiple_choice", "cloze", "perplexity", "hellaswag", "arc", "lambada")
BUILTIN = ("code-nextline", "code-cloze")
FEWSHOT_SEED = 1234




@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    test: list[dict]
    train: list[dict] = field(default_factory=list)  # few-shot pool; empty: other test items are drawn
    description: str = ""  # put before every prompt
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"


# ----------------------------------------------------------------------------------------------
# Reading task files


def _read_jsonl(path: Path) -> list[dict]:
    from gptjax.data import iter_jsonl

    rows = []
    for i, rec in iter_jsonl(path, TaskError):
        if not isinstance(rec, dict):
            raise TaskError(f"{path}:{i} is not a JSON object")
        rows.append(rec)
    if not rows:
        raise TaskError(f"{path} holds no records")
    return rows


def _hellaswag_text(text: str) -> str:
    # the cleanup lm-evaluation-harness applies to HellaSwag's WikiHow items
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _from_hellaswag(r: dict) -> dict:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize() if "ctx_a" in r else r["ctx"]
    return {"context": _hellaswag_text(r.get("activity_label", "") + ": " + ctx),
            "choices": [_hellaswag_text(e) for e in r["endings"]], "gold": int(r["label"])}


def _from_arc(r: dict) -> dict:
    q = r["question"]
    if isinstance(q, dict):  # the original AI2 JSONL
        stem, choices = q["stem"], q["choices"]
        texts, labels = [c["text"] for c in choices], [c["label"] for c in choices]
    else:  # the Hugging Face datasets export
        stem, texts, labels = q, r["choices"]["text"], r["choices"]["label"]
    if r["answerKey"] not in labels:
        raise TaskError(f"ARC item {r.get('id', '?')}: answerKey {r['answerKey']!r} is not among {labels}")
    return {"context": f"Question: {stem}\nAnswer:", "choices": texts, "gold": labels.index(r["answerKey"])}


def _from_lambada(r: dict) -> dict:
    context, _, word = r["text"].strip().rpartition(" ")
    return {"context": context, "target": word}


def _detect(rows: list[dict], path: Path) -> str:
    r = rows[0]
    if "choices" in r and "gold" in r and "context" in r:
        return "multiple_choice"
    if "context" in r and "target" in r:
        return "cloze"
    if "endings" in r and "label" in r:
        return "hellaswag"
    if "question" in r and "answerKey" in r:
        return "arc"
    if set(r) >= {"text"}:
        return "lambada" if "lambada" in path.name.lower() else "perplexity"
    raise TaskError(f"cannot tell the task format of {path} from its fields {sorted(r)}; write "
                    f"FORMAT:{path} with FORMAT one of {', '.join(FORMATS[1:])} (see docs/evaluation.md)")


CONVERT = {"hellaswag": ("multiple_choice", _from_hellaswag), "arc": ("multiple_choice", _from_arc),
           "lambada": ("cloze", _from_lambada)}


def _check(rows: list[dict], kind: str, path: Path) -> None:
    need = {"multiple_choice": ("context", "choices", "gold"), "cloze": ("context", "target"),
            "perplexity": ("text",)}[kind]
    for i, r in enumerate(rows, 1):
        missing = [k for k in need if k not in r]
        if missing:
            raise TaskError(f"{path} record {i} has no {', '.join(missing)} (a {kind} task needs {', '.join(need)})")
        if kind == "multiple_choice":
            if not isinstance(r["choices"], list) or len(r["choices"]) < 2:
                raise TaskError(f"{path} record {i}: choices must be a list of at least two strings")
            if not isinstance(r["gold"], int) or not 0 <= r["gold"] < len(r["choices"]):
                raise TaskError(f"{path} record {i}: gold must be an index into its {len(r['choices'])} choices")


def load_file(path: str | Path, fmt: str = "auto") -> tuple[str, list[dict]]:
    """(kind, records) of a task file in any supported format."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist")
    if fmt not in FORMATS:
        raise TaskError(f"unknown task format {fmt!r}; use one of {', '.join(FORMATS)}")
    if path.suffix not in (".jsonl", ".json"):  # a plain text file: one document to measure perplexity on
        if fmt not in ("auto", "perplexity"):
            raise TaskError(f"{path} is not a .jsonl file; only the perplexity format reads plain text")
        return "perplexity", [{"text": path.read_text(encoding="utf-8", errors="replace")}]
    rows = _read_jsonl(path)
    fmt = _detect(rows, path) if fmt == "auto" else fmt
    kind = fmt
    if fmt in CONVERT:
        kind, conv = CONVERT[fmt]
        try:
            rows = [conv(r) for r in rows]
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, TaskError):
                raise
            raise TaskError(f"{path} does not look like {fmt} data (missing or malformed {e}); "
                            f"check the file or name another format") from None
    _check(rows, kind, path)
    return kind, rows


def load_spec(spec_path: Path) -> Task:
    """A task described by a JSON file: {"name", "format", "test", "train", "description",
    "target_delimiter", "fewshot_delimiter"} (paths relative to the spec file)."""
    try:
        spec = json.loads(spec_path.read_text())
    except json.JSONDecodeError as e:
        raise TaskError(f"{spec_path} is not valid JSON ({e.msg})") from None
    known = {"name", "format", "test", "train", "description", "target_delimiter", "fewshot_delimiter"}
    if not isinstance(spec, dict) or "test" not in spec or set(spec) - known:
        raise TaskError(f"{spec_path} must be a JSON object with a 'test' file and only the keys {sorted(known)}")
    base = spec_path.parent
    kind, test = load_file(base / spec["test"], spec.get("format", "auto"))
    train = []
    if spec.get("train"):
        train_kind, train = load_file(base / spec["train"], spec.get("format", "auto"))
        if train_kind != kind:
            raise TaskError(f"{spec_path}: the train file holds {train_kind} records but the test file {kind}")
    kw = {k: spec[k] for k in ("description", "target_delimiter", "fewshot_delimiter") if k in spec}
    return Task(spec.get("name", spec_path.stem), kind, test, train, **kw)


# ----------------------------------------------------------------------------------------------
# Built-in tasks from the built-in corpus


MIN_LINE = 12  # characters, stripped: shorter lines (`else:`, `return x`) make poor items


def _lines(text: str) -> list[str]:
    return text.split("\n")


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _take(spots: list[tuple[int, int]], n: int, rng: random.Random, item_at) -> list[dict]:
    """Up to n items from the (document, line) spots in a seeded random order; `item_at` may decline a spot."""
    rng.shuffle(spots)
    items = []
    for d, j in spots:
        if len(items) == n:
            break
        item = item_at(d, j)
        if item is not None:
            items.append(item)
    return items


def _nextline_items(docs: Sequence[str], n: int, rng: random.Random) -> list[dict]:
    """Items: the 2-12 lines before a line, which is the gold among it and 3 lines of the same indentation
    drawn from elsewhere (other documents, or at least 50 lines away in the same one)."""
    by_indent: dict[str, list[tuple[int, int, str]]] = {}
    spots = []
    for d, text in enumerate(docs):
        for j, line in enumerate(_lines(text)):
            if len(line.strip()) >= MIN_LINE and not line.lstrip().startswith("#"):
                by_indent.setdefault(_indent(line), []).append((d, j, line))
                if j >= 2:
                    spots.append((d, j))

    def item_at(d, j):
        lines = _lines(docs[d])
        gold = lines[j]
        pool = by_indent[_indent(gold)]
        picks = [pool[k] for k in rng.sample(range(len(pool)), min(len(pool), 12))]
        near = set(lines[max(0, j - 12):j + 1])
        distractors = list(dict.fromkeys(ln for dd, jj, ln in picks
                                         if (dd != d or abs(jj - j) >= 50) and ln not in near))[:3]
        if len(distractors) < 3:
            return None
        k = rng.randint(2, 12)
        choices = distractors + [gold]
        rng.shuffle(choices)
        return {"context": "\n".join(lines[max(0, j - k):j]) + "\n", "choices": choices, "gold": choices.index(gold)}

    return _take(spots, n, rng, item_at)


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMON = set(keyword.kwlist) | set(dir(builtins)) | {"self", "cls", "args", "kwargs"}


def _cloze_items(docs: Sequence[str], n: int, rng: random.Random) -> list[dict]:
    """Items: a line cut just before an identifier (>= 5 characters, not a keyword or builtin) that already
    occurs in the 4-20 lines before it."""
    spots = [(d, j) for d, text in enumerate(docs) for j in range(4, len(_lines(text)))]

    def item_at(d, j):
        lines = _lines(docs[d])
        k = rng.randint(4, 20)
        before = "\n".join(lines[max(0, j - k):j]) + "\n"
        seen = set(_IDENT.findall(before))
        cands = [m for m in _IDENT.finditer(lines[j])
                 if len(m.group()) >= 5 and m.group() in seen and m.group() not in _COMMON
                 and m.start() > 0 and lines[j][m.start() - 1] not in "'\"#"]
        if not cands or lines[j].lstrip().startswith("#"):
            return None
        m = rng.choice(cands)
        return {"context": before + lines[j][:m.start()], "target": m.group()}

    return _take(spots, n, rng, item_at)


def builtin(name: str, data_cfg, *, n: int = 500, n_train: int = 200, seed: int = 0) -> Task:
    """Generate built-in task `name` from the documents of `data_cfg` (a DataConfig): test items from the
    held-out documents, few-shot items from the training ones. Deterministic for a given corpus and seed."""
    if name not in BUILTIN:
        raise TaskError(f"unknown built-in task {name!r}; built-in tasks: {', '.join(BUILTIN)}")
    from gptjax.data import split_documents

    train, val = split_documents(data_cfg)
    make = _nextline_items if name == "code-nextline" else _cloze_items
    test = make(val, n, random.Random(f"{name}-test-{seed}"))
    shots = make(train, n_train, random.Random(f"{name}-train-{seed}"))
    if not test:
        raise TaskError(f"the corpus's held-out documents yield no {name} items; use a larger corpus")
    kind = "multiple_choice" if name == "code-nextline" else "cloze"
    return Task(name, kind, test, shots, target_delimiter="", fewshot_delimiter="\n\n\n")


def resolve(spec: str, data_cfg=None, *, n: int = 500, seed: int = 0) -> Task:
    """A task from a name: a built-in, a task spec .json, FORMAT:PATH, or a path (format detected)."""
    if spec in BUILTIN:
        if data_cfg is None:
            raise TaskError(f"built-in task {spec} needs the run's corpus config")
        return builtin(spec, data_cfg, n=n, seed=seed)
    fmt, sep, rest = spec.partition(":")
    if sep and fmt in FORMATS:
        path = Path(rest)
    else:
        fmt, path = "auto", Path(spec)
    if not path.exists():
        raise TaskError(f"no task {spec!r}: not a built-in ({', '.join(BUILTIN)}) and no such file")
    if path.suffix == ".json" and fmt == "auto":
        with open(path) as f:
            first = f.read(1 << 16).lstrip()
        if first.startswith("{") and '"test"' in first:
            return load_spec(path)
    kind, rows = load_file(path, fmt)
    return Task(path.stem if not sep else f"{fmt}:{path.stem}", kind, rows,
                target_delimiter="" if kind == "perplexity" else " ")


# ----------------------------------------------------------------------------------------------
# Prompts and scoring


def _answer(task: Task, doc: dict) -> str:
    return doc["choices"][doc["gold"]] if task.kind == "multiple_choice" else doc["target"]


def prompt(task: Task, i: int, shots: int, seed: int = FEWSHOT_SEED) -> str:
    """The context for test item i with `shots` solved examples before it, drawn with a seed from the task's
    few-shot pool (or from the other test items when it has none)."""
    doc = task.test[i]
    parts = [task.description] if task.description else []
    if shots:
        pool = task.train if task.train else [d for j, d in enumerate(task.test) if j != i]
        if len(pool) < shots:
            raise TaskError(f"task {task.name} has {len(pool)} examples to draw {shots} shots from")
        rng = random.Random(f"{seed}-{i}")
        for ex in rng.sample(pool, shots):
            parts.append(ex["context"] + task.target_delimiter + _answer(task, ex) + task.fewshot_delimiter)
    return "".join(parts) + doc["context"]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split (its TemplateLM and Hugging Face model): trailing whitespace of the context
    goes to the continuation; the continuation's tokens are those of encode(context + continuation) after
    the first len(encode(context)); an empty (or all-whitespace) context becomes end-of-text."""
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    # a context of nothing but whitespace has moved entirely into the continuation: condition on end-of-text
    return (ctx or [tokenizer.eot_id]), whole[len(ctx):]


def _stderr(values: Sequence[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def score_task(task: Task, scorer, tokenizer, *, shots: int = 0, limit: int = 0, seed: int = FEWSHOT_SEED) -> dict:
    """Score `task` with a Scorer; returns its metrics (each with a standard error) and counts."""
    docs = range(min(limit, len(task.test)) if limit else len(task.test))
    before = scorer.truncated
    desc = f"{task.name} {shots}-shot"
    if task.kind == "perplexity":
        if shots:
            raise TaskError(f"{task.name} is a perplexity task: it takes no shots")
        texts = [task.test[i]["text"] for i in docs]
        ids = [tokenizer.encode(t) for t in texts]
        nats = -sum(scorer.rolling_loglikelihoods(ids, desc=desc))
        n_tok, n_bytes = sum(map(len, ids)), sum(len(t.encode("utf-8")) for t in texts)
        return {"token_perplexity": math.exp(min(nats / max(n_tok, 1), 700.0)),
                "bits_per_byte": nats / max(n_bytes, 1) / math.log(2), "n": len(docs), "tokens": n_tok}

    pairs, owner = [], []
    for i in docs:
        ctx = prompt(task, i, shots, seed)
        doc = task.test[i]
        answers = doc["choices"] if task.kind == "multiple_choice" else [doc["target"]]
        for a in answers:
            pairs.append(encode_pair(tokenizer, ctx, task.target_delimiter + a))
            owner.append((i, task.target_delimiter + a))
    scores = scorer.loglikelihood(pairs, desc=desc)
    truncated = scorer.truncated - before
    out: dict = {"n": len(docs), "truncated": truncated}
    if task.kind == "multiple_choice":
        acc, acc_norm, nll = [], [], []
        j = 0
        for i in docs:
            k = len(task.test[i]["choices"])
            lls = [s[0] for s in scores[j:j + k]]
            lens = [len(owner[j + c][1]) for c in range(k)]
            j += k
            gold = task.test[i]["gold"]
            acc.append(float(max(range(k), key=lambda c: lls[c]) == gold))
            acc_norm.append(float(max(range(k), key=lambda c: lls[c] / max(lens[c], 1)) == gold))
            top = max(lls)  # -log p(correct), p a softmax over the choices' log-likelihoods (GPT-4 report, 3.2)
            nll.append(top + math.log(sum(math.exp(x - top) for x in lls)) - lls[gold])
        out.update(nll_correct=sum(nll) / len(nll), nll_correct_stderr=_stderr(nll),
                   acc=sum(acc) / len(acc), acc_stderr=_stderr(acc), acc_norm=sum(acc_norm) / len(acc_norm),
                   acc_norm_stderr=_stderr(acc_norm), chance=sum(1 / len(task.test[i]["choices"]) for i in docs) / len(acc))
    else:
        acc = [float(g) for _, g in scores]
        lls = [ll for ll, _ in scores]
        # -log p(correct): the target's negative log-likelihood, i.e. minus the log of the chance that a sample
        # from the model starts with exactly the target's tokens (GPT-4 report, 3.2: -E[log pass rate]; a sample
        # could also spell the target with other tokens, or run on past it)
        out.update(acc=sum(acc) / len(acc), acc_stderr=_stderr(acc),
                   ppl=math.exp(min(-sum(lls) / len(lls), 700.0)),
                   nll_correct=-sum(lls) / len(lls), nll_correct_stderr=_stderr([-x for x in lls]))
    return out


def table(results: dict) -> str:
    """A plain-text table of {task: {shots: metrics}}."""
    rows = [("task", "shots", "metric", "value", "stderr", "n")]
    for name, by_shots in results.items():
        for shots, m in by_shots.items():
            for metric in ("acc", "acc_norm", "ppl", "token_perplexity", "bits_per_byte"):
                if metric in m:
                    se = m.get(f"{metric}_stderr")
                    rows.append((name, str(shots), metric, f"{m[metric]:.4f}",
                                 "" if se is None or se != se else f"± {se:.4f}", str(m["n"])))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
