"""InstructGPT's task on a code corpus: prompts, demonstrations and programmatic labelers (Ouyang et al. 2022).

The paper's prompts are user requests, its demonstrations and rankings written by about 40 contractors. Our corpus
is code (by default this interpreter's standard library), so the task is code and the people are programs:

  prompt         a function's decorators and def line(s), its docstring and the first line of its body
  demonstration  the rest of the real body (SFT trains on it)
  labeler        a program that scores a completion by checkable properties (`features`), each labeler weighting
                 them its own way and adding its own Gaussian noise, and ranks K completions by that score

Prompts (`prompts`). Every function (def or async def, methods and nested functions included) of the corpus's
documents with a docstring and 2..12 lines from the first statement after the docstring to its last line
(`body_lines`), taken from `data.sources.split_documents`: "train" from the training documents, "val" from the
held-out ones, so evaluation only ever sees files that neither pretraining nor any post-training stage trained
on. A function is dedented by its def's indentation and cut after its first statement's first line:
  prompt    the decorator / def lines through the docstring, any blank or comment lines after it, and the first
            line of the first statement after the docstring (ends with a newline)
  response  the remaining lines of the function, through its last statement's last line (ends with a newline)
so prompt + response is the dedented function, exactly. Skipped: functions whose lines hold a tab, a form feed or
a line over 120 characters, that contain "<|" (our special tokens' spelling), whose prompt is longer than
`max_prompt_lines` lines, and functions a line of which is indented less than the def (inside a string: they
would not dedent cleanly); documents with a carriage return (ast and str.split would number lines apart) or that do
not parse. Each function text appears once per split; a held-out function whose prompt (its lines stripped of
indentation) occurs in any training document is dropped (the codec boilerplate of encodings/, copied helpers), so
no prompt can be learned in training and evaluated on. Order: documents in corpus order, functions by position.
`limit` keeps a seeded random subset of that many, in the same order. Example.source is the document's index in
its split's list. On CPython 3.11.7's standard library with the defaults (val_fraction 0.02: 724 training files,
12 MB, and 10 held-out ones): 3,198 train prompts and 15 val prompts (the held-out files hold 154 functions, 58
with a docstring, 17 of the right length, 2 of those also in training files). That is thin for evaluation: a
corpus held out at a larger data.val_fraction (set before pretraining, which must not see those files) gives more.

Features (`features`), each in [0, 1], 1 good. The function part of a completion: its lines up to the first line
that has a character in column 0 (the function has closed there; a sampler stops there too, `function_part`).
Everything below is computed on prompt + function part, so text a model writes after its function closes never
changes a score; a caller sets `ended` when the sampler saw end-of-text or the function closed.
  parses       ast.parse(prompt + function part) succeeds (warnings silenced)
  defined      1 - the fraction of names the function part loads that are undefined. A name is defined when it is
               a parameter or bound anywhere in the function (assignment, for, with, except, import, def, class,
               global, nonlocal, comprehension, walrus, match), a builtin, a standard-library module name, an
               identifier of the prompt's code (not its docstring), or looks module-level: called (`f(...)`) or
               with an attribute taken (`m.x`), or named so by PEP 8 (a leading underscore or capital: private
               helpers and imports, classes, CONSTANTS). What the module defines elsewhere is not in the prompt,
               so a judge reading the prompt cannot check it: use and naming stand in. What is flagged is a plain
               value no one bound: a variable the function never assigned. No loads: 1. The real bodies of the
               stdlib's prompts score 1 on parses 99.9%, defined 98.3%, uses_params 96.0%, no_repeats 97.4% of the
               time (all four: 91.9%).
  uses_params  the fraction of parameters (not self / cls) loaded in the prompt's first body line or the function
               part; no parameters: 1
  no_repeats   1 - the fraction of the function part's non-blank lines that repeat (stripped) an earlier one of
               them or the prompt's first body line; lines without a name of their own (`else:`, `return None`,
               `)`) are never repeats. Nothing written: 1
  ends         the `ended` flag
  style        the fraction of the function part's non-blank lines at most 99 characters long, without trailing
               whitespace, and, where a line starts a statement (not a continuation line, a comment or a string's
               inside), indented by a multiple of 4 spaces. Nothing written: 1
  length       exp(-d^2 / (2 ln(2)^2)), d = how far log(n + 1/2) lies outside [log(lo + 1/2), log(hi + 1/2)],
               n the function part's non-blank lines; [lo, hi] = [max(1, m / 1.5), 1.5 m] for an Example whose real
               response has m non-blank lines, [1, 12] for a bare prompt. Empty and very long completions -> 0
Code that does not parse gets `defined` and `uses_params` from its tokens (tokenize as far as it goes, then a
regex over the rest): a name is loaded unless it follows "." or is followed by "=", looks module-level when
followed by "(" or ".", and is bound when followed by "=" or ":=" or after for / as / def / class / import /
global / nonlocal / lambda. No input raises.

Labelers. A `Labeler` scores a completion by sum_f w_f * feature_f / sum_f w_f (in [0, 1]) plus noise * z, z a
standard normal drawn from numpy's default_rng seeded by (the labeler's seed, a hash of item_key, a hash of the
completion and its ended flag): the same labeler gives the same item the same score every time, different labelers
differ by weights and draws. `rank` gives 0 to the best; equal scores get equal ranks (a tie: the number of strictly
better completions, "competition" ranking) and the reward model drops tied pairs. Six labelers (`LABELERS`) with
visibly different priorities: syntax, semantics, concise, style (`TRAIN_LABELERS`, whose rankings train the reward
model), and balanced, reviewer (`HELDOUT_LABELERS`, who only evaluate, like the paper's held-out labelers).
`true_score` is the noise-free mean of all six weighted sums: the score we report for a policy.

Agreement and noise. The paper's labelers agreed with each other on 72.6 +- 1.5% of comparisons (training labelers)
and 77.3 +- 1.3% (held-out ones). `agreement` is that rate here: over completion pairs whose true scores differ, how
often two different labelers order them the same way, averaged over pairs of labelers. `NOISE`, every labeler's
default noise, is `calibrate_noise` (bisection, one noise for all six) for agreement 0.75 on what the labelers
actually rank: an SFT policy's samples (the demonstration's SFT run, K = 4 completions of 712 training prompts;
`python bench/calibrate_labelers.py runs/igpt/rankings.jsonl --run runs/igpt/pretrain`). The bisection gives 0.0349
there and NOISE = 0.035, at which all six agree 0.750 (the training labelers among themselves 0.717, the held-out
ones 0.793, training against held-out 0.769: near the paper's 72.6% and 77.3%); the same SFT run's samples of the
231 held-out prompts give 0.0319. With no noise the labelers agree 0.851 on those samples (weights alone).
Synthetic completions (`synthetic_items`: made without a model by mutating the real body, `MUTATIONS`: the body
itself, truncated, a line duplicated, a variable's use renamed to an undefined name, parameter uses replaced by None,
an indentation broken, junk appended, nothing, the body written out three times) differ from each other by more, so
the same noise leaves labelers agreeing more on them: 0.829 on `synthetic_items(prompts("train", limit=400), k=7,
seed=0)` (0.875 without noise; an earlier NOISE of 0.083 was calibrated on these, and gave only 0.64 on model
samples).

Ranking records (`ranking_records`), the reward model's training data, one JSON object per line:
  {"prompt": str, "completions": [str] * K, "ended": [bool] * K, "ranks": [int] * K, "labeler": str}
K is 4..9 (the paper's range); ranks as `Labeler.rank` gives them (0 best, equal = tie); "ended" says whether each
completion ended (the reward model appends the end-of-text token to those, and reads its score at the end);
each item is ranked by one labeler, round robin over the labelers given; items all of whose ranks tie are dropped.

Deviations from the paper, with reasons: the labelers are programs (no people here), whose features can only check
what is checkable (a body can be well-formed and still wrong); K completions are ranked by a score with noise, not
by a person's comparison of all of them; the noise is calibrated to the paper's agreement rate, not measured.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import io
import keyword
import math
import re
import sys
import tokenize
import warnings
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Sequence, Union

import numpy as np

from gptjax.config import DataConfig

FEATURES = ("parses", "defined", "uses_params", "no_repeats", "ends", "style", "length")
MUTATIONS = ("real", "truncate", "duplicate", "undefined", "drop_params", "indent", "junk", "empty", "ramble")
MAX_LINE = 120  # source lines longer than this disqualify a function
STYLE_LINE = 99  # the style feature's line length (PEP 8's limit for code agreed in a team)
LENGTH_BAND = (1, 12)  # non-blank lines a completion of a bare prompt should have
_LENGTH_SIGMA = math.log(2.0)  # a completion twice too long (or half too short) keeps exp(-1/2) of its length score
_SKIP_CHARS = ("\t", "\x0c", "\x0b", "<|")
_KEYWORDS = frozenset(keyword.kwlist)  # soft keywords (match, case, _) are names too
_KNOWN = frozenset(dir(builtins)) | frozenset(sys.stdlib_module_names)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BIND_AFTER = frozenset({"for", "as", "def", "class", "import", "global", "nonlocal", "lambda"})
_JUNK_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "zork", "quux", "blarg", "frob")

Completion = tuple[str, bool]  # (text, ended)


@dataclass(frozen=True)
class Example:
    """One function split into a prompt and the real rest of its body (the SFT demonstration)."""

    prompt: str
    response: str
    params: tuple[str, ...]  # parameter names, without self / cls
    name: str
    source: int  # index of the document in its split's list (split_documents' train or val)

    @property
    def function(self) -> str:
        return self.prompt + self.response


Prompt = Union[Example, str]


# ----------------------------------------------------------------------------------------------
# prompts


def _parse(code: str):
    """ast.parse, or None: never raises, never warns."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ast.parse(code)
    except Exception:  # SyntaxError, ValueError (NUL bytes), RecursionError, MemoryError: all mean "no"
        return None


def _first_line(node: ast.stmt) -> int:
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", ())])


def _param_names(args: ast.arguments) -> tuple[str, ...]:
    names = [a.arg for a in args.posonlyargs + args.args]
    names += [args.vararg.arg] if args.vararg else []
    names += [a.arg for a in args.kwonlyargs]
    names += [args.kwarg.arg] if args.kwarg else []
    return tuple(names)


def _doc_examples(text: str, source: int, max_prompt_lines: int, body_lines: tuple[int, int]) -> list[Example]:
    if "\r" in text:
        return []
    tree = _parse(text)
    if tree is None:
        return []
    lines = text.split("\n")
    fns = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    out = []
    for node in sorted(fns, key=lambda n: (n.lineno, n.col_offset)):
        if len(node.body) < 2 or ast.get_docstring(node, clean=False) is None:
            continue
        doc, first = node.body[0], node.body[1]
        body_start = _first_line(first)
        if body_start <= doc.end_lineno or not body_lines[0] <= node.end_lineno - body_start + 1 <= body_lines[1]:
            continue
        start = _first_line(node)
        if body_start - start + 1 > max_prompt_lines:
            continue
        span = lines[start - 1:node.end_lineno]
        col = len(span[0]) - len(span[0].lstrip(" "))
        pad = " " * col
        if any(c in ln for ln in span for c in _SKIP_CHARS) or any(len(ln) > MAX_LINE for ln in span):
            continue
        if any(ln.strip() and not ln.startswith(pad) for ln in span):
            continue
        dedented = [ln[col:] if ln.startswith(pad) else ln.lstrip(" ") for ln in span]
        cut = body_start - start + 1
        prompt, response = "\n".join(dedented[:cut]) + "\n", "\n".join(dedented[cut:]) + "\n"
        params = tuple(p for p in _param_names(node.args) if p not in ("self", "cls"))
        out.append(Example(prompt, response, params, node.name, source))
    return out


@lru_cache(maxsize=2)
def _documents(data_cfg: DataConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    from gptjax.data.sources import split_documents

    train, val = split_documents(data_cfg)
    return tuple(train), tuple(val)


def _stripped_index(docs: Sequence[str]) -> tuple[dict[str, list[tuple[int, int]]], list[list[str]]]:
    """Where each def / decorator line (stripped) occurs in `docs`, and every document's lines stripped."""
    index: dict[str, list[tuple[int, int]]] = {}
    stripped = []
    for d, text in enumerate(docs):
        lines = [ln.strip() for ln in text.split("\n")]
        stripped.append(lines)
        for i, s in enumerate(lines):
            if s.startswith(("def ", "async def ", "@")):
                index.setdefault(s, []).append((d, i))
    return index, stripped


def _occurs(prompt: str, index, stripped) -> bool:
    want = [ln.strip() for ln in prompt.split("\n")[:-1]]
    return any(stripped[d][i:i + len(want)] == want for d, i in index.get(want[0], ()))


@lru_cache(maxsize=8)
def _all_prompts(data_cfg: DataConfig, split: str, max_prompt_lines: int,
                 body_lines: tuple[int, int]) -> tuple[Example, ...]:
    train, val = _documents(data_cfg)
    docs = train if split == "train" else val
    seen: set[str] = set()
    out = []
    for d, text in enumerate(docs):
        for ex in _doc_examples(text, d, max_prompt_lines, body_lines):
            if ex.function not in seen:
                seen.add(ex.function)
                out.append(ex)
    if split == "val":
        index, stripped = _stripped_index(train)
        out = [ex for ex in out if not _occurs(ex.prompt, index, stripped)]
    return tuple(out)


def prompts(split: str, *, data_cfg: DataConfig | None = None, max_prompt_lines: int = 24,
            body_lines: tuple[int, int] = (2, 12), limit: int | None = None, seed: int = 0) -> list[Example]:
    """The task's prompts and demonstrations from one side of the corpus's held-out split.

    Args:
      split: "train" (from pretraining's training documents) or "val" (from its held-out documents).
      data_cfg: the corpus (a DataConfig; default: the standard library).
      max_prompt_lines: longest prompt kept, in lines (def and docstring and first body line).
      body_lines: (fewest, most) lines from the first statement after the docstring to the function's end.
      limit: keep a random subset of this many (in corpus order), chosen by `seed`; None keeps all.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    found = _all_prompts(data_cfg or DataConfig(), split, max_prompt_lines, tuple(body_lines))
    if limit is None or limit >= len(found):
        return list(found)
    keep = np.sort(np.random.default_rng(seed).choice(len(found), size=max(limit, 0), replace=False))
    return [found[i] for i in keep]


# ----------------------------------------------------------------------------------------------
# features


def function_part(completion: str) -> tuple[str, bool]:
    """(the completion's lines that belong to the function, whether the function closed): the lines before the
    first one with a character in column 0."""
    lines = completion.split("\n")
    for i, ln in enumerate(lines):
        if ln and not ln[0].isspace():
            return "\n".join(lines[:i]) + ("\n" if i else ""), True
    return completion, False


def _tokens(code: str) -> tuple[list[tokenize.TokenInfo], int]:
    """Python's tokens of `code` as far as tokenize gets, and the line (1-based) after the last one reached."""
    toks: list[tokenize.TokenInfo] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            toks.append(tok)
    except Exception:  # TokenError, IndentationError, SyntaxError: keep what came before
        return toks, (toks[-1].end[0] + 1 if toks else 1)
    return toks, code.count("\n") + 2


def _name_uses(code: str) -> list[tuple[str, int, str, str]]:
    """(name, line, previous token, next token) of every identifier in `code`'s tokens (not in strings or
    comments), with a regex over the lines that tokenize did not reach."""
    toks, reached = _tokens(code)
    sig = [t for t in toks if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT,
                                                tokenize.DEDENT, tokenize.ENDMARKER)]
    out = []
    for i, t in enumerate(sig):
        if t.type == tokenize.NAME and t.string not in _KEYWORDS:
            prev = sig[i - 1].string if i else ""
            nxt = sig[i + 1].string if i + 1 < len(sig) else ""
            out.append((t.string, t.start[0], prev, nxt))
    for row, ln in enumerate(code.split("\n")[reached - 1:], start=reached):
        for m in _IDENT.finditer(ln):
            if m.group() not in _KEYWORDS and not m.group()[0].isdigit():
                before = re.search(r"(\w+|\S)\s*$", ln[:m.start()])
                prev = before.group(1) if before else ""
                rest = ln[m.end():].lstrip()
                nxt = ":=" if rest.startswith(":=") else ("=" if rest[:1] == "=" and rest[:2] != "==" else rest[:1])
                out.append((m.group(), row, prev, nxt))
    return out


def _module_looking(name: str) -> bool:
    return name[0] == "_" or name[0].isupper()


def _namespaces(tree: ast.AST) -> set[int]:
    """ids of the Name nodes called (`f(...)`) or with an attribute taken (`m.x`): a function or module, which the
    rest of the file would define or import."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            out.add(id(node.func))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            out.add(id(node.value))
    return out


def _bound_in(tree: ast.AST) -> set[str]:
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            bound.update(node.names)
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            bound.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            bound.add(node.rest)
    return bound


@lru_cache(maxsize=4096)
def _prompt_names(prompt: str) -> frozenset[str]:
    return frozenset(n for n, *_ in _name_uses(prompt))


@lru_cache(maxsize=4096)
def _prompt_params(prompt: str) -> tuple[str, ...]:
    """A bare prompt's parameters (not self / cls): its def line(s) parsed with `pass` for a body."""
    lines = prompt.split("\n")
    for i, ln in enumerate(lines):
        if ln.lstrip().startswith(("def ", "async def ")):
            for j in range(i + 1, min(i + 16, len(lines)) + 1):
                tree = _parse("\n".join(lines[i:j]).strip() + "\n    pass\n")
                if tree is not None and tree.body and isinstance(tree.body[0], (ast.FunctionDef,
                                                                                  ast.AsyncFunctionDef)):
                    return tuple(p for p in _param_names(tree.body[0].args) if p not in ("self", "cls"))
            break
    return ()


def _stock(line: str) -> bool:
    """A line with no name of its own (only keywords, literals, punctuation): repeating it is no repetition."""
    return all(w in _KEYWORDS or keyword.issoftkeyword(w) for w in _IDENT.findall(line))


def _length_score(n: int, ref: int | None) -> float:
    lo, hi = (max(1.0, ref / 1.5), 1.5 * ref) if ref else LENGTH_BAND
    x = math.log(n + 0.5)
    d = max(0.0, math.log(lo + 0.5) - x, x - math.log(hi + 0.5))
    return math.exp(-0.5 * (d / _LENGTH_SIGMA) ** 2)


def _style_score(code: str, first_row: int) -> float:
    lines = code.split("\n")
    toks, reached = _tokens(code)
    starts, at_start = set(), True
    for t in toks:
        if t.type == tokenize.NEWLINE:
            at_start = True
        elif t.type not in (tokenize.NL, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            if at_start:
                starts.add(t.start[0])
            at_start = False
    rows = [r for r in range(first_row, len(lines) + 1) if lines[r - 1].strip()]
    if not rows:
        return 1.0
    good = 0
    for r in rows:
        ln = lines[r - 1]
        indent = len(ln) - len(ln.lstrip())
        indent_ok = (r not in starts and r < reached) or (ln[:indent] == " " * indent and indent % 4 == 0)
        good += len(ln) <= STYLE_LINE and ln == ln.rstrip() and indent_ok
    return good / len(rows)


@lru_cache(maxsize=1 << 16)
def _features(prompt: str, params: tuple[str, ...], ref: int | None, completion: str,
              ended: bool) -> tuple[float, ...]:
    if not prompt.endswith("\n"):
        prompt += "\n"
    body, _ = function_part(completion)
    code = prompt + body
    n_prompt = prompt.count("\n")  # the prompt's last line (its first body line) is line n_prompt of code
    body_lines = [ln for ln in body.split("\n") if ln.strip()]
    tree = _parse(code)
    in_prompt = _prompt_names(prompt)
    if tree is not None:
        names = [n for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)]
        fn = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), tree)
        bound, outer = _bound_in(fn), _namespaces(tree)
        used = {n.id for n in names if n.lineno >= n_prompt}
        loads = [(n.id, id(n) in outer) for n in names if n.lineno > n_prompt]
    else:
        uses = _name_uses(code)
        bound = {name for name, row, prev, nxt in uses if nxt in ("=", ":=") or prev in _BIND_AFTER}
        bound |= set(params) | {"self", "cls"}
        used = {name for name, row, prev, _ in uses if row >= n_prompt and prev != "."}
        loads = [(name, nxt in ("(", ".")) for name, row, prev, nxt in uses if row > n_prompt and prev != "." and
                 nxt != "="]
    undefined = sum(1 for n, called in loads if not (called or n in bound or n in _KNOWN or n in in_prompt or
                                                     _module_looking(n)))
    defined = 1.0 - undefined / len(loads) if loads else 1.0
    uses_params = sum(p in used for p in params) / len(params) if params else 1.0
    seen = {prompt.split("\n")[-2].strip()}
    repeats = 0
    for ln in body_lines:
        s = ln.strip()
        repeats += s in seen and not _stock(s)
        seen.add(s)
    no_repeats = 1.0 - repeats / len(body_lines) if body_lines else 1.0
    return (float(tree is not None), defined, uses_params, no_repeats, float(bool(ended)),
            _style_score(code, n_prompt + 1), _length_score(len(body_lines), ref))


def _key(example_or_prompt: Prompt) -> tuple[str, tuple[str, ...], int | None]:
    if isinstance(example_or_prompt, Example):
        ex = example_or_prompt
        return ex.prompt, ex.params, sum(1 for ln in ex.response.split("\n") if ln.strip())
    prompt = str(example_or_prompt)
    return prompt, _prompt_params(prompt), None


def features(example_or_prompt: Prompt, completion: str, ended: bool) -> dict[str, float]:
    """The checkable properties of a completion of a prompt (an Example, or a bare prompt string), each in [0, 1]
    with 1 good; the module docstring defines each one. Never raises."""
    return dict(zip(FEATURES, _features(*_key(example_or_prompt), str(completion), bool(ended))))


# ----------------------------------------------------------------------------------------------
# labelers


def _h64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big")


@dataclass(frozen=True)
class Labeler:
    """A programmatic labeler: the weighted mean of the features plus its own deterministic Gaussian noise."""

    name: str
    weights: dict[str, float] = field(hash=False)
    noise: float = 0.0
    seed: int = 0

    def __post_init__(self):
        unknown = sorted(set(self.weights) - set(FEATURES))
        if unknown:
            raise ValueError(f"labeler {self.name}: unknown features {unknown}; features are {', '.join(FEATURES)}")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"labeler {self.name}: weights must be >= 0 and not all 0")
        if self.noise < 0:
            raise ValueError(f"labeler {self.name}: noise must be >= 0, not {self.noise}")

    def vector(self) -> np.ndarray:
        w = np.array([self.weights.get(f, 0.0) for f in FEATURES], np.float64)
        return w / w.sum()

    def value(self, example: Prompt, completion: str, ended: bool) -> float:
        """The noise-free score: sum_f w_f feature_f / sum_f w_f, in [0, 1]."""
        return float(np.dot(self.vector(), _feature_vector(example, completion, ended)))

    def draw(self, item_key, completion: str, ended: bool) -> float:
        """This labeler's standard normal for this completion of this item (scaled by noise in `score`)."""
        rng = np.random.default_rng([self.seed, _h64(str(item_key)), _h64(f"{completion}\x00{bool(ended)}")])
        return float(rng.standard_normal())

    def score(self, example: Prompt, completion: str, ended: bool, *, item_key) -> float:
        return self.value(example, completion, ended) + self.noise * self.draw(item_key, completion, ended)

    def rank(self, example: Prompt, completions: Sequence[Completion], item_key) -> list[int]:
        """0 for the best; each completion's rank is how many score strictly better (equal scores tie)."""
        scores = [self.score(example, c, e, item_key=item_key) for c, e in completions]
        return [sum(t > s for t in scores) for s in scores]


def _feature_vector(example: Prompt, completion: str, ended: bool) -> np.ndarray:
    return np.array(_features(*_key(example), str(completion), bool(ended)), np.float64)


NOISE = 0.035  # calibrate_noise for agreement 0.75 on an SFT policy's samples of 712 training prompts (see above)
LABELERS = (
    #                           parses defined uses_params no_repeats ends style length
    Labeler("syntax", dict(zip(FEATURES, (4, 2, 1, 1, 1, 1, 0.5))), NOISE, 101),
    Labeler("semantics", dict(zip(FEATURES, (2, 4, 3, 1, 1, 0, 0.5))), NOISE, 102),
    Labeler("concise", dict(zip(FEATURES, (2, 1, 1, 3, 3, 0.5, 3))), NOISE, 103),
    Labeler("style", dict(zip(FEATURES, (2, 1, 1, 1, 1, 4, 1))), NOISE, 104),
    Labeler("balanced", dict(zip(FEATURES, (1, 1, 1, 1, 1, 1, 1))), NOISE, 105),
    Labeler("reviewer", dict(zip(FEATURES, (3, 3, 2, 2, 2, 0.5, 1))), NOISE, 106),
)
TRAIN_LABELERS = LABELERS[:4]
HELDOUT_LABELERS = LABELERS[4:]


def true_score(example: Prompt, completion: str, ended: bool) -> float:
    """The noise-free mean of every labeler's weighted sum: the score reported for a policy."""
    w = np.mean([lab.vector() for lab in LABELERS], axis=0)
    return float(np.dot(w, _feature_vector(example, completion, ended)))


# ----------------------------------------------------------------------------------------------
# agreement and calibration

Item = tuple[Prompt, Sequence[Completion]]


def _tables(labelers: Sequence[Labeler], items: Sequence[Item]):
    """Over all items' completion pairs with distinct true scores: (clean score difference [P, L], noise draw
    difference [P, L]) of each labeler, so a labeler with noise s orders a pair by the sign of clean + s * draw."""
    W = np.stack([lab.vector() for lab in labelers])
    w_true = np.mean([lab.vector() for lab in LABELERS], axis=0)
    clean, drawn = [], []
    for key, (ex, comps) in enumerate(items):
        F = np.stack([_feature_vector(ex, c, e) for c, e in comps])
        Z = np.array([[lab.draw(key, c, e) for lab in labelers] for c, e in comps])
        V, t = F @ W.T, F @ w_true
        i, j = np.triu_indices(len(comps), 1)
        keep = np.abs(t[i] - t[j]) > 1e-9
        clean.append(V[i[keep]] - V[j[keep]])
        drawn.append(Z[i[keep]] - Z[j[keep]])
    L = len(labelers)
    return (np.concatenate(clean) if clean else np.zeros((0, L)), np.concatenate(drawn) if drawn else np.zeros((0, L)))


def _agreement(clean, drawn, noise, pairs) -> float:
    if not len(clean) or not pairs:
        return float("nan")
    sign = np.sign(clean + drawn * np.asarray(noise)[None, :])
    return float(np.mean([np.mean(sign[:, a] == sign[:, b]) for a, b in pairs]))


def agreement(labelers_a: Sequence[Labeler], labelers_b: Sequence[Labeler], items: Sequence[Item]) -> float:
    """How often two different labelers (a from A, b from B, a != b) order a pair of completions the same way,
    over the pairs whose true scores differ (items: (example, [(completion, ended)]), keyed by position), averaged
    over the labeler pairs; NaN without any."""
    labs = list({lab.name: lab for lab in list(labelers_a) + list(labelers_b)}.values())
    at = {lab.name: k for k, lab in enumerate(labs)}
    pairs = [(at[a.name], at[b.name]) for a in labelers_a for b in labelers_b if a.name != b.name]
    clean, drawn = _tables(labs, items)
    return _agreement(clean, drawn, [lab.noise for lab in labs], pairs)


def calibrate_noise(items: Sequence[Item], target: float = 0.75, *, labelers: Sequence[Labeler] = LABELERS,
                    hi: float = 1.0, iters: int = 40) -> float:
    """The noise (one for every labeler) at which distinct labelers agree on `target` of the pairs of `items`,
    by bisection; 0 when they agree less than that without noise."""
    clean, drawn = _tables(labelers, items)
    pairs = [(a, b) for a in range(len(labelers)) for b in range(len(labelers)) if a != b]
    rate = lambda s: _agreement(clean, drawn, [s] * len(labelers), pairs)  # noqa: E731
    if not rate(0.0) > target:
        return 0.0
    while rate(hi) > target and hi < 1e6:
        hi *= 2
    lo = 0.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate(mid) > target else (lo, mid)
    return (lo + hi) / 2


def with_noise(labelers: Sequence[Labeler], noise: float) -> tuple[Labeler, ...]:
    """The labelers with `noise` instead of their own."""
    return tuple(replace(lab, noise=noise) for lab in labelers)


# ----------------------------------------------------------------------------------------------
# synthetic completions (no model needed)


def _char_col(line: str, byte_col: int) -> int:  # ast counts UTF-8 bytes, str indexes characters
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))


def _replace_names(example: Example, spots: list[ast.Name], new: str) -> str | None:
    lines = example.function.split("\n")
    for node in sorted(spots, key=lambda n: (n.lineno, n.col_offset), reverse=True):
        ln = lines[node.lineno - 1]
        col = _char_col(ln, node.col_offset)
        if ln[col:col + len(node.id)] != node.id:
            return None
        lines[node.lineno - 1] = ln[:col] + new + ln[col + len(node.id):]
    return "\n".join(lines)[len(example.prompt):]


def _fresh(base: str, taken: set[str]) -> str:
    name = base.strip("_").lower() or "v"
    name = name + "2"
    while name in taken or name in _KNOWN or name in _KEYWORDS:
        name += "2"
    return name


def mutate(example: Example, kind: str, rng: np.random.Generator) -> Completion | None:
    """The real response changed one way (`MUTATIONS`), or None where that way does not apply to it."""
    r, n_prompt = example.response, example.prompt.count("\n")
    lines = r.split("\n")  # the last is "" (the response ends with a newline)
    if kind == "real":
        return r, True
    if kind == "empty":
        return "", True
    if kind == "ramble":
        return r * 3, False
    if kind == "truncate":
        text = r.rstrip("\n")
        return (r[:int(rng.integers(1, len(text)))], False) if len(text) > 1 else None
    if kind == "duplicate":
        spots = [i for i, ln in enumerate(lines) if ln.strip() and not _stock(ln.strip())]
        if not spots:
            return None
        i = int(rng.choice(spots))
        return "\n".join(lines[:i + 1] + [lines[i]] + lines[i + 1:]), True
    if kind == "junk":
        junk = ["    " + " ".join(rng.choice(_JUNK_WORDS, size=int(rng.integers(3, 7)))) for _ in
                range(int(rng.integers(1, 4)))]
        return r + "\n".join(junk) + "\n", True
    tree = _parse(example.function)
    if tree is None or kind not in MUTATIONS:
        return None
    names = [n for n in ast.walk(tree) if isinstance(n, ast.Name)]
    if kind == "undefined":
        # a variable (a parameter or a local) used as a value: callees and modules pass as defined elsewhere
        outer, bound = _namespaces(tree), _bound_in(tree.body[0])
        spots = [n for n in names if isinstance(n.ctx, ast.Load) and n.lineno > n_prompt and id(n) not in outer and
                 n.id in bound]
        if not spots:
            return None
        node = spots[int(rng.integers(len(spots)))]
        taken = {n for n, *_ in _name_uses(example.function)}
        text = _replace_names(example, [node], _fresh(node.id, taken))
        return None if text is None else (text, True)
    if kind == "drop_params":
        loads = [n for n in names if isinstance(n.ctx, ast.Load)]
        in_first = {n.id for n in loads if n.lineno == n_prompt}
        drop = {n.id for n in loads if n.lineno > n_prompt and n.id in example.params} - in_first
        text = _replace_names(example, [n for n in loads if n.id in drop and n.lineno > n_prompt], "None")
        return None if not drop or text is None else (text, True)
    if kind == "indent":  # two more spaces before a statement that follows a sibling: "unexpected indent"
        rows = []
        for node in ast.walk(tree):
            for fld in ("body", "orelse", "finalbody", "handlers", "cases"):
                block = getattr(node, fld, None)
                if not isinstance(block, list):
                    continue
                for prev, st in zip(block, block[1:]):  # (match's cases have no line numbers: skipped)
                    if hasattr(prev, "end_lineno") and hasattr(st, "lineno") and \
                            _first_line(st) > max(prev.end_lineno, n_prompt):
                        rows.append(_first_line(st))
        if not rows:
            return None
        row = int(rng.choice(sorted(set(rows))))
        fn = example.function.split("\n")
        fn[row - 1] = "  " + fn[row - 1]
        return "\n".join(fn)[len(example.prompt):], True
    return None


def synthetic_completions(example: Example, k: int, seed: int = 0) -> list[Completion]:
    """K distinct completions of varying quality made from the real body by `MUTATIONS`, in a seeded order;
    where fewer than K mutations apply, more truncations fill in."""
    rng = np.random.default_rng([seed, _h64(example.prompt)])
    out: list[Completion] = []
    for kind in rng.permutation(MUTATIONS):
        c = mutate(example, str(kind), rng)
        if c is not None and c not in out:
            out.append(c)
        if len(out) == k:
            return out
    for _ in range(50):
        c = mutate(example, "truncate", rng)
        if c is not None and c not in out:
            out.append(c)
        if len(out) == k:
            break
    return out


def synthetic_items(examples: Sequence[Example], k: int = 7, seed: int = 0) -> list[tuple[Example,
                                                                                           list[Completion]]]:
    """(example, synthetic_completions) for each example that yields K distinct completions."""
    items = [(ex, synthetic_completions(ex, k, seed)) for ex in examples]
    return [(ex, comps) for ex, comps in items if len(comps) == k]


# ----------------------------------------------------------------------------------------------
# ranking records


def ranking_records(items: Sequence[Item], labelers: Sequence[Labeler] = TRAIN_LABELERS, *,
                    item_keys: Sequence | None = None) -> list[dict]:
    """The reward model's training records (the module docstring gives the format): item i ranked by
    labelers[i % len(labelers)] with item key item_keys[i] (default: i); items whose ranks all tie are dropped."""
    keys = range(len(items)) if item_keys is None else item_keys
    if len(keys) != len(items):
        raise ValueError(f"{len(keys)} item keys for {len(items)} items")
    records = []
    for i, ((ex, comps), key) in enumerate(zip(items, keys)):
        if not 4 <= len(comps) <= 9:
            raise ValueError(f"item {i} has {len(comps)} completions; the paper ranks K = 4..9")
        lab = labelers[i % len(labelers)]
        ranks = lab.rank(ex, comps, key)
        if len(set(ranks)) > 1:
            prompt = ex.prompt if isinstance(ex, Example) else str(ex)
            records.append({"prompt": prompt, "completions": [c for c, _ in comps],
                            "ended": [bool(e) for _, e in comps], "ranks": ranks, "labeler": lab.name})
    return records
