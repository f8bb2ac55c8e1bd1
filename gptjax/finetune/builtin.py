"""Built-in fine-tuning tasks, generated deterministically and offline from the corpus (by default the Python
standard library), so a pretrained checkpoint can be fine-tuned GPT-1 style with no download:

  code-package   classification   which top-level package a snippet of 8-16 lines comes from (the package's
                                  own name masked as "pkg"); the 6 packages with most training files
  code-follows   entailment       do 1-2 lines follow 3-8 lines of code (entailment), come from elsewhere in
                                  the same file (neutral) or from another file (contradiction)
  code-renamed   similarity       is function B function A with its arguments and locals renamed, or a
                                  different function of similar length renamed the same way; both named "f"
  code-body      multiple_choice  which of 4 bodies (of similar length) belongs to a function's def line(s) and
                                  docstring, when it has one

Split: the one pretraining uses (data.sources.split, by a hash of each document's content). Training items
come only from pretraining's training documents and validation items only from its held-out ones, so no file
feeds both and a fine-tuned model is evaluated on files it never saw. Functions of the held-out files that
also occur verbatim in training files (boilerplate such as the codec classes of encodings/) are dropped.
"""

from __future__ import annotations

import ast
import builtins
import io
import os
import random
import re
import symtable
import tokenize
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import lru_cache
from pathlib import PurePath
from typing import Sequence

from gptjax.data.sources import is_validation, iter_documents
from gptjax.errors import TaskError
from gptjax.eval.tasks import _lines, _take
from gptjax.finetune.task import Example, FinetuneTask

BUILTIN = ("code-package", "code-follows", "code-renamed", "code-body")
PACKAGES = 6  # K: classes of code-package
MAX_CHARS = 1500  # a snippet or premise; the model's context is 256 tokens
MAX_FUNCTION = 800  # each of code-renamed's two functions
MAX_ANSWER = 400  # a hypothesis or body: GPT-1's input transformation never cuts these, so they must fit
FOLLOWS_GAP = 30  # a neutral hypothesis is at least this many lines away from the premise
_BUILTINS = frozenset(dir(builtins))

Docs = Sequence[tuple[str, str]]
Item = tuple[Example, frozenset]  # an example and the names of the documents it was made from


def split_named(docs: Docs, fraction: float) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """data.sources.split, keeping names: the same rule, the same fallback (the last document held out)."""
    train = [d for d in docs if not is_validation(d[1], fraction)]
    val = [d for d in docs if is_validation(d[1], fraction)]
    if not val:
        val, train = train[-1:], train[:-1]
    return train, val


def _clip(text: str, limit: int = MAX_CHARS) -> str:
    """At most `limit` characters, cut at a line end where there is one."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n", 0, limit)
    return text[:cut] if cut > 0 else text[:limit]


def _dedent(lines: list[str], col: int) -> list[str]:
    # by the def's own indentation only: lines of a multi-line string indented less keep theirs
    return [ln[col:] if ln[:col].isspace() or not ln[:col] else ln for ln in lines]


# ----------------------------------------------------------------------------------------------
# code-package


def _root(docs: Docs) -> str:
    """Where package paths start: "" for names already relative (the stdlib's), else the files' common folder."""
    names = [name for name, _ in docs]
    if not names or not all(os.path.isabs(n) for n in names):
        return ""
    return os.path.dirname(names[0]) if len(names) == 1 else os.path.commonpath(names)


def _package(name: str, root: str) -> str | None:
    """The first folder of a document's path (below `root`); None for a top-level module."""
    p = PurePath(os.path.relpath(name, root) if root else name)
    return p.parts[0] if len(p.parts) > 1 and not p.is_absolute() and p.parts[0] != ".." else None


def _snippet_starts(text: str) -> list[int]:
    lines = _lines(text)
    return [j for j in range(len(lines) - 7) if lines[j].strip()]


def _packages(train: Docs, val: Docs, root: str) -> list[str]:
    """The K packages with the most (usable) training documents among those that also have held-out ones."""
    def count(docs):
        n: dict[str, int] = {}
        for name, text in docs:
            pkg = _package(name, root)
            if pkg and _snippet_starts(text):
                n[pkg] = n.get(pkg, 0) + 1
        return n

    n_train, n_val = count(train), count(val)
    both = sorted((p for p in n_train if p in n_val), key=lambda p: (-n_train[p], p))[:PACKAGES]
    if len(both) < 2:
        raise TaskError(f"code-package needs at least 2 packages (directories) with both training and held-out "
                        f"files; the corpus has {len(both)}")
    return sorted(both)


def _package_items(docs: Docs, labels: Sequence[str], root: str, n: int, rng: random.Random) -> list[Item]:
    """Items: 8-16 lines from a file of a package drawn uniformly (then a spot uniformly within it)."""
    spots: dict[str, list[tuple[int, int]]] = {p: [] for p in labels}
    for d, (name, text) in enumerate(docs):
        pkg = _package(name, root)
        if pkg in spots:
            spots[pkg] += [(d, j) for j in _snippet_starts(text)]
    for p in labels:
        rng.shuffle(spots[p])
    masks = {p: re.compile(rf"\b{re.escape(p)}\b", re.IGNORECASE) for p in labels}
    live = [p for p in labels if spots[p]]
    items: list[Item] = []
    while live and len(items) < n:
        p = rng.choice(live)
        d, j = spots[p].pop()  # shuffled: popping is drawing without replacement
        if not spots[p]:
            live.remove(p)
        name, text = docs[d]
        snippet = "\n".join(_lines(text)[j:j + rng.randint(8, 16)])
        items.append((Example((_clip(masks[p].sub("pkg", snippet)),), labels.index(p)), frozenset([name])))
    return items


# ----------------------------------------------------------------------------------------------
# code-follows


FOLLOWS_LABELS = ("contradiction", "entailment", "neutral")


def _hyp_at(lines: list[str], j: int, k: int) -> str | None:
    """k lines from j, all non-blank and short enough to be a hypothesis; None if not."""
    got = lines[j:j + k]
    if len(got) < k or not all(ln.strip() for ln in got):
        return None
    hyp = "\n".join(got)
    return hyp if len(hyp) <= MAX_ANSWER else None


def _follows_items(docs: Docs, n: int, rng: random.Random) -> list[Item]:
    """Items: 3-8 lines, and 1-2 lines that follow them / lie at least 30 lines away / come from another file;
    the three labels in turn, so each is a third."""
    if len(docs) < 2:
        return []
    split_lines = [_lines(t) for _, t in docs]
    spots = [(d, j) for d, lines in enumerate(split_lines) for j in range(len(lines) - 3) if lines[j].strip()]
    made = [0]

    def elsewhere(label, d, j, m, k):
        """A hypothesis for a neutral or contradiction item, and the document it comes from; None if none."""
        if label == "neutral":
            b = rng.randrange(len(split_lines[d]))
            far = b >= j + m + FOLLOWS_GAP or b + k <= j - FOLLOWS_GAP
            return (_hyp_at(split_lines[d], b, k), d) if far else (None, d)
        e = rng.randrange(len(docs))
        if docs[e][0] == docs[d][0]:
            return None, e
        return _hyp_at(split_lines[e], rng.randrange(len(split_lines[e])), k), e

    def item_at(d, j):
        lines = split_lines[d]
        m, k = rng.randint(3, 8), rng.randint(1, 2)
        follow = _hyp_at(lines, j + m, k) or _hyp_at(lines, j + m, 1)
        premise = "\n".join(lines[j:j + m])
        if follow is None or len(premise) > MAX_CHARS:  # not cut: the hypothesis must follow it as it stands
            return None
        k = follow.count("\n") + 1
        label = FOLLOWS_LABELS[made[0] % 3]
        hyp, e = follow, d
        if label != "entailment":
            for _ in range(8):  # a few tries for usable lines elsewhere
                hyp, e = elsewhere(label, d, j, m, k)
                if hyp is not None and hyp.strip() != follow.strip():
                    break
            else:
                return None
        made[0] += 1
        return Example((premise, hyp), FOLLOWS_LABELS.index(label)), frozenset({docs[d][0], docs[e][0]})

    items = _take(spots, n, rng, item_at)
    rng.shuffle(items)  # taken in label order
    return items


# ----------------------------------------------------------------------------------------------
# Functions of a document (code-renamed, code-body)


@dataclass(frozen=True)
class _Fn:
    source: str  # the function, dedented to its def
    name: str
    n_lines: int
    header: str = ""  # def line(s), and the docstring when it has one; "" when there is no body on later lines
    body: str = ""  # the statements after the header, leading blank lines dropped
    method: bool = False  # defined in a class body: its bare name inside it is never the function itself


def _first_line(node: ast.stmt) -> int:
    """Where a statement starts: at its first decorator when it has any."""
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", ())])


def _header_body(node, lines: list[str]) -> tuple[str, str]:
    """(header, body) of a function: the def line(s) and the docstring when there is one, then the statements
    after them; ("", "") when there is nothing after the header or the body shares a line with it."""
    doc = node.body[0]
    if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
        if len(node.body) < 2 or _first_line(node.body[1]) <= doc.end_lineno:
            return "", ""  # the docstring alone, or a statement on its last line
        head, start = lines[node.lineno - 1:doc.end_lineno], doc.end_lineno
    else:
        start = _first_line(doc) - 1  # 0-based line of the first statement
        if start < node.lineno:
            return "", ""  # `def f(x): return x`: the body on the def line
        head = lines[node.lineno - 1:start]
        while head and (not head[-1].strip() or head[-1].lstrip().startswith("#")):
            head, start = head[:-1], start - 1  # blank and comment lines before the body go with the body
    rest = lines[start:node.end_lineno]
    while rest and not rest[0].strip():
        rest = rest[1:]
    return "\n".join(_dedent(head, node.col_offset)), "\n".join(_dedent(rest, node.col_offset))


@lru_cache(maxsize=4096)
def _functions(text: str) -> tuple[_Fn, ...]:
    """The functions (methods, nested ones too) of a document; nothing if it does not parse."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
        return ()
    lines = _lines(text)
    methods: set[int] = set()
    out = []
    for node in ast.walk(tree):  # breadth first: a class before its methods
        if isinstance(node, ast.ClassDef):
            methods.update(id(n) for n in _scope_defs(node.body))
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        # whole lines (ast.get_source_segment's text, with a trailing comment): that function splits the
        # whole document on every call, quadratic over a file's functions
        source = "\n".join(_dedent(lines[node.lineno - 1:node.end_lineno], node.col_offset))
        header, body = _header_body(node, lines)
        out.append(_Fn(source, node.name, node.end_lineno - node.lineno + 1, header, body, id(node) in methods))
    return tuple(out)


def _scope_defs(stmts):
    """The functions defined directly in a scope's statements (inside if / try / with / for blocks too)."""
    for st in stmts:
        if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield st
        elif not isinstance(st, ast.ClassDef):
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                yield from _scope_defs(getattr(st, field, ()))


def _split_functions(train: Docs, val: Docs, keep) -> tuple[list[tuple[_Fn, str]], list[tuple[_Fn, str]]]:
    """(function, document name) of each split that `keep` accepts, each source once, and held-out functions
    that also occur in a training file left out."""
    def collect(docs, seen):
        out = []
        for name, text in docs:
            for fn in _functions(text):
                if fn.source not in seen and keep(fn):
                    seen.add(fn.source)
                    out.append((fn, name))
        return out

    seen_train: set[str] = set()
    fns_train = collect(train, seen_train)
    # a training function need not pass `keep` to count as seen
    seen_train |= {fn.source for _, text in train for fn in _functions(text)}
    return fns_train, collect(val, set(seen_train))


# ----------------------------------------------------------------------------------------------
# code-renamed


RENAMED_LABELS = ("different", "renamed")


def _tables(t: symtable.SymbolTable):
    yield t
    for c in t.get_children():
        yield from _tables(c)


def _renamable(tree: ast.AST, src: str) -> set[str]:
    """Names bound in the function (arguments, and Name targets: assignment, for, with, :=) that are local
    wherever they occur in it: never a builtin, a global, a class attribute or a name bound another way."""
    top = symtable.symtable(src, "<function>", "exec")
    func = top.get_children()[0]
    # the module level evaluates decorators, defaults and annotations: a name there is not the function's
    bound, blocked = set(), set(_BUILTINS) | {s.get_name() for s in top.get_symbols()}
    for t in _tables(func):
        for s in t.get_symbols():
            name = s.get_name()
            if t.get_type() == "class" and s.is_local():
                blocked.add(name)  # a class attribute
            elif s.is_global() or s.is_declared_global() or (t is func and s.is_nonlocal()) or s.is_imported():
                blocked.add(name)
            elif s.is_local() and (s.is_parameter() or s.is_assigned()):
                bound.add(name)
    for node in ast.walk(tree):  # bound by a form whose name is no Name or arg node: left alone
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            blocked.add(node.name)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            blocked.add(node.name)
        elif isinstance(node, ast.alias):
            blocked.add(node.asname or node.name.split(".")[0])
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            blocked.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            blocked.add(node.rest)
    return bound - blocked


@lru_cache(maxsize=65536)
def _renamed(src: str) -> str | None:
    """`src` with its arguments and locals renamed v1, v2, ... in order of first occurrence, token by token
    (formatting and comments kept); None when there is nothing to rename or a name is out of tokens' reach
    (inside an f-string)."""
    try:
        tree = ast.parse(src)
        names = _renamable(tree, src)
    except (SyntaxError, ValueError, RecursionError, IndexError):
        return None
    if not names:
        return None
    lines = src.split("\n")

    def char_col(row: int, col: int) -> int:  # ast counts UTF-8 bytes, tokenize characters
        return len(lines[row - 1].encode("utf-8")[:col].decode("utf-8", errors="replace"))

    at = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in names:
            at[node.lineno, char_col(node.lineno, node.col_offset)] = node.id
        elif isinstance(node, ast.arg) and node.arg in names:
            at[node.lineno, char_col(node.lineno, node.col_offset)] = node.arg
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (tokenize.TokenError, SyntaxError):
        return None
    used = {t.string for t in toks if t.type == tokenize.NAME}
    hits = [t for t in toks if t.type == tokenize.NAME and at.get(t.start) == t.string]
    if len(hits) != len(at):
        return None
    fresh: dict[str, str] = {}
    counter = 0
    for t in hits:
        if t.string not in fresh:
            counter += 1
            while f"v{counter}" in used:
                counter += 1
            fresh[t.string] = f"v{counter}"
    for t in sorted(hits, key=lambda t: t.start, reverse=True):  # right to left keeps columns valid
        row, col = t.start
        ln = lines[row - 1]
        lines[row - 1] = ln[:col] + fresh[t.string] + ln[col + len(t.string):]
    return "\n".join(lines)


PLACEHOLDER = "f"  # code-renamed's functions are all named this: their names would tell renamings apart


@lru_cache(maxsize=65536)
def _anonymous(src: str, name: str, method: bool) -> str | None:
    """`src`, the function `name`, named PLACEHOLDER: in its def line, and in its body where it calls itself
    by that bare name (a recursive function; a method's bare name is never itself, nor is a name the function
    binds); None when PLACEHOLDER is a name in `src` already or `src` does not parse."""
    lines = src.split("\n")
    m = re.match(rf"(?:async\s+)?def\s+({re.escape(name)})\b", lines[0])
    if m is None:
        return None
    if name == PLACEHOLDER:
        return src
    rest = src[len(lines[0]):]
    if not re.search(rf"\b{PLACEHOLDER}\b", src) and not re.search(rf"\b{re.escape(name)}\b", rest):
        return lines[0][:m.start(1)] + PLACEHOLDER + lines[0][m.end(1):] + rest  # most: nothing more to ask
    try:
        tree = ast.parse(src)
        top = symtable.symtable(src, "<function>", "exec")
    except (SyntaxError, ValueError, RecursionError):
        return None
    symbols = [(t, sym) for t in _tables(top) for sym in t.get_symbols()]
    if any(sym.get_name() == PLACEHOLDER for _, sym in symbols):
        return None  # `def f(f)`, or a call of some other f: the placeholder would be ambiguous
    bound = any(sym.get_name() == name and (sym.is_local() or sym.is_declared_global() or sym.is_nonlocal())
                for t, sym in symbols if t is not top)
    spots = [(1, m.start(1))]
    if not method and not bound:
        for node in (n for st in tree.body[0].body for n in ast.walk(st)):  # the body: not defaults
            if isinstance(node, ast.Name) and node.id == name:
                row = node.lineno
                spots.append((row, len(lines[row - 1].encode("utf-8")[:node.col_offset].decode("utf-8"))))
    for row, col in sorted(spots, reverse=True):  # right to left keeps columns valid
        ln = lines[row - 1]
        if ln[col:col + len(name)] != name:
            return None
        lines[row - 1] = ln[:col] + PLACEHOLDER + ln[col + len(name):]
    return "\n".join(lines)


def _shown(fn: _Fn, rename: bool) -> str | None:
    """A function as an item shows it: named PLACEHOLDER, its arguments and locals renamed if `rename`; None
    when it cannot be (nothing to rename, or the placeholder taken)."""
    src = _renamed(fn.source)
    if src is None:
        return None
    return _anonymous(src if rename else fn.source, fn.name, fn.method)


@lru_cache(maxsize=65536)
def _shape(fn: _Fn) -> str:
    """A function's AST as shown renamed: equal for renamings of each other."""
    return ast.dump(ast.parse(_shown(fn, True)))


def _renamed_items(fns: list[tuple[_Fn, str]], n: int, rng: random.Random) -> list[Item]:
    """Items: (A, A renamed) and (A, another function of similar length renamed), in random order, both named
    PLACEHOLDER so their names are no cue; another function of the same name is preferred (`__init__` against
    `__init__`), for a negative of the same role."""
    fns = sorted(fns, key=lambda f: (f[0].n_lines, f[0].source))
    lengths = [f.n_lines for f, _ in fns]
    by_name: dict[str, list[int]] = {}
    for i, (f, _) in enumerate(fns):
        by_name.setdefault(f.name, []).append(i)
    spots = [(i, positive) for i in range(len(fns)) for positive in (0, 1)]

    def item_at(i, positive):
        a, doc_a = fns[i]
        if _shown(a, False) is None or _shown(a, True) is None:
            return None
        if positive:
            b, doc_b = a, doc_a
        else:
            n_a, tol = a.n_lines, max(1, a.n_lines // 5)
            near = range(bisect_left(lengths, n_a - tol), bisect_right(lengths, n_a + tol))
            same = [k for k in by_name[a.name] if k != i and abs(lengths[k] - n_a) <= tol]
            picks = rng.sample(same, min(len(same), 4)) + [rng.choice(near) for _ in range(6)]
            picks = [k for k in picks if k != i and _shown(fns[k][0], True) and
                     _shape(fns[k][0]) != _shape(a)]
            if not picks:
                return None
            b, doc_b = fns[picks[0]]
        pair = [_shown(a, False), _shown(b, True)]
        if rng.random() < 0.5:
            pair.reverse()
        return Example(tuple(pair), positive), frozenset([doc_a, doc_b])

    return _take(spots, n, rng, item_at)


def _keep_renamed(fn: _Fn) -> bool:
    # whether it has anything to rename is only asked of the functions drawn (tokenizing them all is slow)
    return 3 <= fn.n_lines <= 30 and len(fn.source) <= MAX_FUNCTION


# ----------------------------------------------------------------------------------------------
# code-body


NEAR_BODIES = 10  # code-body's distractors come from the functions this many places either side by body length


def _keep_body(fn: _Fn) -> bool:
    return bool(fn.header) and 1 <= len(_lines(fn.body)) <= 20 and len(fn.body) <= MAX_ANSWER \
        and len(fn.header) <= MAX_CHARS


def _stripped(text: str) -> tuple[str, ...]:
    """A text's non-blank lines, stripped: two bodies or headers equal but for indentation and blank lines
    are the same."""
    return tuple(ln.strip() for ln in _lines(text) if ln.strip())


def _body_items(fns: list[tuple[_Fn, str]], n: int, rng: random.Random) -> list[Item]:
    """Items: a function's def line(s) and docstring (if it has one); its body among 3 bodies of other
    functions of the split, of similar length where there are such (neighbours in the order by lines, then
    characters), never one equal to it nor one of a function with the same header (`def __iter__(self):`'s
    bodies would all fit)."""
    order = sorted(range(len(fns)), key=lambda i: (len(_lines(fns[i][0].body)), len(fns[i][0].body), i))
    rank = {i: r for r, i in enumerate(order)}
    bodies = [_stripped(fn.body) for fn, _ in fns]
    headers = [_stripped(fn.header) for fn, _ in fns]
    spots = [(i, 0) for i in range(len(fns))]

    def item_at(i, _):
        fn, doc = fns[i]
        r = rank[i]
        near = order[max(0, r - NEAR_BODIES):r + NEAR_BODIES + 1]
        anywhere = rng.sample(range(len(fns)), min(len(fns), 12))  # when too few near ones will do
        others, taken = [], {bodies[i]}
        for k in rng.sample(near, len(near)) + anywhere:
            if bodies[k] not in taken and headers[k] != headers[i]:
                taken.add(bodies[k])
                others.append(k)
                if len(others) == 3:
                    break
        else:
            return None
        gold = rng.randrange(4)
        choices = [fns[k][0].body for k in others]
        choices.insert(gold, fn.body)
        return Example((fn.header, ""), gold, tuple(choices)), frozenset([doc] + [fns[k][1] for k in others])

    return _take(spots, n, rng, item_at)


# ----------------------------------------------------------------------------------------------


DESCRIPTIONS = {
    "code-package": "Which top-level package does this code snippet come from (its name masked as pkg)?",
    "code-follows": "Do the second lines directly follow the first (entailment), come from elsewhere in the same "
                    "file (neutral) or from another file (contradiction)?",
    "code-renamed": "Is the one function the other with its arguments and local variables renamed, or a "
                    "different function (both named f)?",
    "code-body": "Which of the four bodies belongs to this function's signature (and docstring, if any)?",
}


def _generate(name: str, docs: Docs, val_fraction: float, *, n_train: int = 2000, n_val: int = 500,
              seed: int = 0) -> tuple[FinetuneTask, list[frozenset], list[frozenset]]:
    """The task, and for each training and validation example the names of the documents it was made from."""
    if name not in BUILTIN:
        raise TaskError(f"unknown built-in fine-tuning task {name!r}; built-in tasks: {', '.join(BUILTIN)}")
    docs = list(docs)
    train_docs, val_docs = split_named(docs, val_fraction)
    rngs = [random.Random(f"{name}-{part}-{seed}") for part in ("train", "val")]
    kw: dict = {}
    if name == "code-package":
        root = _root(docs)
        labels = tuple(_packages(train_docs, val_docs, root))
        made = [_package_items(d, labels, root, n, r)
                for d, n, r in zip((train_docs, val_docs), (n_train, n_val), rngs)]
        kind, kw = "classification", {"labels": labels}
    elif name == "code-follows":
        made = [_follows_items(d, n, r) for d, n, r in zip((train_docs, val_docs), (n_train, n_val), rngs)]
        kind, kw = "entailment", {"labels": FOLLOWS_LABELS}
    else:
        renamed = name == "code-renamed"
        fns = _split_functions(train_docs, val_docs, _keep_renamed if renamed else _keep_body)
        make = _renamed_items if renamed else _body_items
        made = [make(f, n, r) for f, n, r in zip(fns, (n_train, n_val), rngs)]
        kind = "similarity" if renamed else "multiple_choice"
        if renamed:
            kw = {"labels": RENAMED_LABELS, "metrics": ("acc", "f1", "mcc")}
    for part, items in zip(("training", "held-out"), made):
        if not items:
            raise TaskError(f"the corpus's {part} documents yield no {name} items; use a larger corpus")
    (train, train_src), (val, val_src) = ([list(x) for x in zip(*items)] for items in made)
    task = FinetuneTask(name, kind, train, val, description=DESCRIPTIONS[name], **kw)
    return task, train_src, val_src


def builtin_from_documents(name: str, docs: list[tuple[str, str]], val_fraction: float, *, n_train: int = 2000,
                           n_val: int = 500, seed: int = 0) -> FinetuneTask:
    """Built-in task `name` from (name, text) documents split as pretraining splits them (`val_fraction`):
    training items from the training documents, validation items from the held-out ones. Deterministic for
    the documents and the seed; at most n_train / n_val items, fewer from a small corpus."""
    return _generate(name, docs, val_fraction, n_train=n_train, n_val=n_val, seed=seed)[0]


def builtin_task(name: str, data_cfg, *, n_train: int = 2000, n_val: int = 500, seed: int = 0) -> FinetuneTask:
    """Built-in task `name` from the corpus of `data_cfg` (a DataConfig), split by its val_fraction."""
    if name not in BUILTIN:
        raise TaskError(f"unknown built-in fine-tuning task {name!r}; built-in tasks: {', '.join(BUILTIN)}")
    docs = list(iter_documents(data_cfg))
    return builtin_from_documents(name, docs, data_cfg.val_fraction, n_train=n_train, n_val=n_val, seed=seed)
