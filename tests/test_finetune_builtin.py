"""The built-in fine-tuning tasks: deterministic, split as pretraining splits, and each item what it claims."""

from __future__ import annotations

import ast
import builtins
import copy
import re
from collections import Counter

import pytest

from gptjax.config import DataConfig
from gptjax.data.sources import iter_documents, split
from gptjax.errors import TaskError
from gptjax.finetune import builtin as B
from gptjax.finetune.builtin import BUILTIN, builtin_from_documents, builtin_task

FRACTION = DataConfig().val_fraction
N_TRAIN, N_VAL = 200, 100


@pytest.fixture(scope="module")
def docs():
    return list(iter_documents(DataConfig()))


@pytest.fixture(scope="module")
def halves(docs):
    train, val = B.split_named(docs, FRACTION)
    return dict(train), dict(val)


@pytest.fixture(scope="module")
def made(docs):
    """name -> (task, training sources, validation sources), generated once."""
    return {name: B._generate(name, docs, FRACTION, n_train=N_TRAIN, n_val=N_VAL) for name in BUILTIN}


def test_split_keeps_names_and_matches_the_pretraining_split(docs):
    texts = [t for _, t in docs]
    for fraction in (FRACTION, 0.0):  # 0.0: nothing held out by hash, the last document is
        train, val = B.split_named(docs, fraction)
        assert ([t for _, t in train], [t for _, t in val]) == split(texts, fraction)
        assert set(dict(train)) & set(dict(val)) == set()


@pytest.mark.parametrize("name", BUILTIN)
def test_items_are_deterministic_for_a_seed_and_differ_across_seeds(docs, made, name):
    again = builtin_from_documents(name, docs, FRACTION, n_train=N_TRAIN, n_val=N_VAL)
    assert again == made[name][0]
    other = builtin_from_documents(name, docs, FRACTION, n_train=N_TRAIN, n_val=N_VAL, seed=1)
    assert other.train != again.train and other.val != again.val


@pytest.mark.parametrize("name", BUILTIN)
def test_no_document_feeds_both_splits(made, halves, name):
    task, train_src, val_src = made[name]
    train_docs, texts = halves
    assert len(train_src) == len(task.train) and len(val_src) == len(task.val)
    assert set().union(*train_src) <= set(train_docs)
    assert set().union(*val_src) <= set(texts)


@pytest.mark.parametrize("name", BUILTIN)
def test_items_are_capped_and_shaped_as_their_kind(made, name):
    task = made[name][0]
    assert 0 < len(task.train) <= N_TRAIN and 0 < len(task.val) <= N_VAL
    assert task.description and task.baseline == {}
    for ex in task.train + task.val:
        if task.kind == "multiple_choice":
            assert len(ex.segments) == 2 and ex.segments[1] == "" and len(ex.choices) == 4
            assert 0 <= ex.label < 4
        else:
            assert len(ex.segments) == (1 if task.kind == "classification" else 2)
            assert 0 <= ex.label < len(task.labels) and not ex.choices
        assert all(len(s) <= B.MAX_CHARS for s in ex.segments)


@pytest.mark.parametrize("name", BUILTIN)
def test_labels_are_roughly_balanced(made, name):
    task = made[name][0]
    k = 4 if task.kind == "multiple_choice" else len(task.labels)
    counts = Counter(ex.label for ex in task.train)
    assert set(counts) == set(range(k))
    for c in counts.values():
        assert 0.5 / k < c / len(task.train) < 1.5 / k, counts


def test_code_package_masks_the_package_name_and_draws_from_its_files(made, halves):
    task, train_src, val_src = made["code-package"]
    assert 2 <= len(task.labels) <= B.PACKAGES and list(task.labels) == sorted(task.labels)
    for part, sources, docs in ((task.train, train_src, halves[0]), (task.val, val_src, halves[1])):
        for ex, (src,) in zip(part, sources):
            pkg = task.labels[ex.label]
            assert src.split("/")[0] == pkg
            assert not re.search(rf"\b{re.escape(pkg)}\b", ex.segments[0], re.IGNORECASE)
            # the snippet is the file's text with the package's name replaced by "pkg"
            either = f"(?:{re.escape(pkg)}|pkg)"
            text = re.compile(either.join(re.escape(p) for p in ex.segments[0].split("pkg")), re.IGNORECASE)
            assert text.search(docs[src])


def test_code_follows_hypotheses_are_what_their_label_says(made, halves):
    task, train_src, val_src = made["code-follows"]
    assert task.labels == ("contradiction", "entailment", "neutral")
    items = [(ex, src, halves[0]) for ex, src in zip(task.train, train_src)]
    items += [(ex, src, halves[1]) for ex, src in zip(task.val, val_src)]
    for ex, sources, texts in items:
        premise, hyp = ex.segments
        label = task.labels[ex.label]
        assert hyp.strip() and 1 <= len(hyp.split("\n")) <= 2 and 3 <= len(premise.split("\n")) <= 8
        if label == "entailment":
            (src,) = sources
            assert premise + "\n" + hyp in texts[src]
        elif label == "neutral":
            (src,) = sources
            lines = texts[src].split("\n")
            h = hyp.split("\n")
            starts = [i for i in range(len(lines)) if lines[i:i + len(h)] == h]
            p = premise.split("\n")
            at = [i for i in range(len(lines)) if lines[i:i + len(p)] == p]
            assert starts and at
            assert any(abs(s - a) >= 20 for s in starts for a in at)
        else:
            assert len(sources) == 2
            # from two files (in the boilerplate of encodings/ the premise may occur in both)
            assert any(premise in texts[s] for s in sources) and any(hyp in texts[s] for s in sources)
        if label != "entailment":
            assert not any(premise + "\n" + hyp in texts[s] for s in sources)


BUILTIN_NAMES = set(dir(builtins))


def _names(tree: ast.AST) -> list[ast.AST]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Name, ast.arg))]


def _ident(n: ast.AST) -> str:
    return n.id if isinstance(n, ast.Name) else n.arg


def _bound(tree: ast.AST) -> set[str]:
    return {_ident(n) for n in _names(tree) if isinstance(n, ast.arg) or isinstance(n.ctx, ast.Store)}


def _canonical(tree: ast.AST) -> str:
    """The AST with every Name / arg identifier replaced by its order of first appearance."""
    order: dict[str, str] = {}
    for n in _names(tree):
        new = order.setdefault(_ident(n), f"n{len(order)}")
        if isinstance(n, ast.Name):
            n.id = new
        else:
            n.arg = new
    return ast.dump(tree)


def _is_renaming(original: str, renamed: str) -> bool:
    a, b = ast.parse(original), ast.parse(renamed)
    na, nb = _names(a), _names(b)
    if len(na) != len(nb):
        return False
    mapping: dict[str, str] = {}
    for x, y in zip(na, nb):
        if mapping.setdefault(_ident(x), _ident(y)) != _ident(y):
            return False  # not consistent
    changed = {k: v for k, v in mapping.items() if k != v}
    if len(set(mapping.values())) != len(mapping):
        return False  # two names merged into one
    if not changed or not set(changed) <= _bound(a) or set(changed) & BUILTIN_NAMES:
        return False
    if not all(re.fullmatch(r"v\d+", v) for v in changed.values()):
        return False
    return _canonical(a) == _canonical(b)


_DEFS: dict[str, list] = {}


def _defs(text: str) -> list:
    """The function nodes of a document, parsed once."""
    if text not in _DEFS:
        _DEFS[text] = [n for n in ast.walk(ast.parse(text)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return _DEFS[text]


def _dump(node: ast.AST) -> str:
    """A function's AST without its decorators, dumped, each line of a string stripped (the function is shown
    dedented to its def, the lines of a string too)."""
    node = copy.deepcopy(node)
    node.decorator_list = []
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            n.value = "\n".join(ln.strip() for ln in n.value.split("\n"))
    return ast.dump(node)


def _as_placeholder(node: ast.AST, self_refs: bool) -> str:
    """A function's AST named B.PLACEHOLDER (and its bare self-references, if `self_refs`), dumped."""
    node = copy.deepcopy(node)
    if self_refs:
        for n in ast.walk(node):
            if isinstance(n, ast.Name) and n.id == node.name:
                n.id = B.PLACEHOLDER
    node.name = B.PLACEHOLDER
    return _dump(node)


def test_code_renamed_positives_are_renamings_and_negatives_different_functions(made, halves):
    task, train_src, val_src = made["code-renamed"]
    assert task.labels == ("different", "renamed") and task.metrics == ("acc", "f1", "mcc")
    seen = Counter()
    items = [(ex, src, halves[0]) for ex, src in zip(task.train, train_src)]
    items += [(ex, src, halves[1]) for ex, src in zip(task.val, val_src)]
    for ex, sources, texts in items:
        x, y = ex.segments
        ast.parse(x), ast.parse(y)  # both parse as Python
        renamed = len(re.findall(r"\bv\d+\b", y)) > len(re.findall(r"\bv\d+\b", x))
        original, other = (x, y) if renamed else (y, x)
        # the original is a function of its documents as it stands, but for its name (where it is that)
        want = _dump(ast.parse(original).body[0])
        assert any(want in (_as_placeholder(node, False), _as_placeholder(node, True))
                   for s in sources for node in _defs(texts[s])
                   if node.end_lineno - node.lineno == original.count("\n")), original
        if task.labels[ex.label] == "renamed":
            assert _is_renaming(original, other), (original, other)
            assert other.count("\n") == original.count("\n")  # formatting kept line for line
        else:
            assert not _is_renaming(original, other)
            assert _canonical(ast.parse(original)) != _canonical(ast.parse(other))
        seen[ex.label] += 1
    assert seen[0] > 20 and seen[1] > 20


def test_code_renamed_pairs_are_named_alike_so_the_name_is_no_cue(made):
    task = made["code-renamed"][0]
    for ex in task.train + task.val:
        x, y = (ast.parse(s).body[0] for s in ex.segments)
        assert x.name == y.name == B.PLACEHOLDER, ex
        # the placeholder is no other name in either: a call of f is the function calling itself
        for fn in (x, y):
            assert not any(isinstance(n, ast.arg) and n.arg == B.PLACEHOLDER for n in ast.walk(fn))
            assert not any(isinstance(n, ast.Name) and n.id == B.PLACEHOLDER and not isinstance(n.ctx, ast.Load)
                           for n in ast.walk(fn))


def test_the_placeholder_replaces_the_name_and_bare_self_references_only():
    src = ("def fact(n, memo=fact):\n"
           "    if n < 2:\n"
           "        return 1  # fact(1)\n"
           "    return n * fact(n - 1) + factorial(n) + self.fact + obj.fact(n)\n")
    assert B._anonymous(src, "fact", False) == (
        "def f(n, memo=fact):\n"
        "    if n < 2:\n"
        "        return 1  # fact(1)\n"
        "    return n * f(n - 1) + factorial(n) + self.fact + obj.fact(n)\n")
    # a method's bare name is some other function (here the builtin): only the def line changes
    method = "def open(self, mode='r'):\n    return open(self.path, mode)\n"
    assert B._anonymous(method, "open", True) == "def f(self, mode='r'):\n    return open(self.path, mode)\n"
    assert B._anonymous(method, "open", False) == "def f(self, mode='r'):\n    return f(self.path, mode)\n"
    # a name the function binds itself is not the function
    local = "def data(self):\n    data = self._data\n    return data\n"
    assert B._anonymous(local, "data", False) == "def f(self):\n    data = self._data\n    return data\n"
    assert B._anonymous("async def run(x):\n    await run(x)\n", "run", False) == "async def f(x):\n    await f(x)\n"
    # the placeholder already a name of the function: refused
    assert B._anonymous("def load(path):\n    with open(path) as f:\n        return f.read()\n", "load", False) is None
    assert B._anonymous("def g(a):\n    return f(a)\n", "g", False) is None
    assert B._anonymous("def g(a):\n    return a.f + f'{a}'\n", "g", False) == "def f(a):\n    return a.f + f'{a}'\n"


def test_renaming_leaves_attributes_builtins_globals_and_comments_alone():
    src = ("def f(a, *rest, key=DEFAULT):\n"
           "    total = a.total + len(rest)  # keep a comment\n"
           "    for item in rest:\n"
           "        total += item.size(key=key) + GLOBAL\n"
           "    def g():\n"
           "        shadow = 1\n"
           "        return shadow\n"
           "    return total, shadow, f'{total}'\n")
    # `shadow` is bound in g but global in f; the f-string's `total` is out of tokens' reach: no renaming
    assert B._renamed(src) is None
    src = src.replace(", f'{total}'", "")
    out = B._renamed(src)
    assert out == ("def f(v1, *v2, v3=DEFAULT):\n"
                   "    v4 = v1.total + len(v2)  # keep a comment\n"
                   "    for v5 in v2:\n"
                   "        v4 += v5.size(key=v3) + GLOBAL\n"
                   "    def g():\n"
                   "        shadow = 1\n"
                   "        return shadow\n"
                   "    return v4, shadow\n")
    assert B._renamed("def f():\n    return GLOBAL\n") is None  # nothing to rename


def _nonblank(text: str) -> list[str]:
    return [ln.strip() for ln in text.split("\n") if ln.strip()]


def test_code_body_gold_choice_is_the_real_body(made, halves):
    task, train_src, val_src = made["code-body"]
    assert task.kind == "multiple_choice" and task.labels == ()
    items = [(ex, src, halves[0]) for ex, src in list(zip(task.train, train_src))[:50]]
    items += [(ex, src, halves[1]) for ex, src in zip(task.val, val_src)]
    undocumented = 0
    for ex, sources, texts in items:
        header, _ = ex.segments
        assert len({tuple(_nonblank(c)) for c in ex.choices}) == 4  # distinct but for indentation too
        assert all(1 <= len(c.split("\n")) <= 20 for c in ex.choices)
        head, gold = _nonblank(header), _nonblank(ex.choices[ex.label])
        # the header and the gold body together are a function of the gold's document, line for line
        lines = {s: texts[s].split("\n") for s in sources}
        found = [node for s in sources for node in _defs(texts[s])
                 if _nonblank("\n".join(lines[s][node.lineno - 1:node.end_lineno])) == head + gold]
        assert found, header
        node = found[0]
        again = ast.parse(header + "\n" + ex.choices[ex.label]).body[0]
        if ast.get_docstring(node) is not None:  # the header is the def line(s) and the docstring
            assert ast.get_docstring(again) == ast.get_docstring(node)
            assert again.body[0].end_lineno == len(header.split("\n"))  # and ends with it
        else:  # the header is the def line(s) alone
            undocumented += 1
            assert [type(st) for st in ast.parse(header + "\n pass").body[0].body] == [ast.Pass]
        # no distractor is the body of a function with the very same header (it would fit as well)
        for k, c in enumerate(ex.choices):
            if k != ex.label:
                assert not any(_nonblank("\n".join(lines[s][n.lineno - 1:n.end_lineno])) == head + _nonblank(c)
                               for s in sources for n in _defs(texts[s]))
    assert undocumented > 10
    golds = Counter(ex.label for ex in task.train)
    assert set(golds) == {0, 1, 2, 3}


def test_code_body_distractors_are_of_similar_length(made):
    task = made["code-body"][0]
    off = [abs(len(c.split("\n")) - len(ex.choices[ex.label].split("\n")))
           for ex in task.train + task.val for k, c in enumerate(ex.choices) if k != ex.label]
    assert sum(d <= 1 for d in off) / len(off) > 0.9


def test_headers_and_bodies_of_functions_with_and_without_docstrings():
    src = ("class C:\n"
           "    def a(self,\n"
           "          x):  # the def's comment\n"
           "        # a comment before the body\n"
           "\n"
           "        return x\n"
           "    def b(self):\n"
           "        '''Doc.'''\n"
           "\n"
           "        @property\n"
           "        def c(s):\n"
           "            return 1\n"
           "        return c\n"
           "    def d(self): return 1\n"
           "    def e(self):\n"
           "        '''Only a docstring.'''\n")
    got = {fn.name: (fn.header, fn.body, fn.method) for fn in B._functions(src)}
    assert got == {
        "a": ("def a(self,\n      x):  # the def's comment", "    # a comment before the body\n\n    return x", True),
        "b": ("def b(self):\n    '''Doc.'''", "    @property\n    def c(s):\n        return 1\n    return c", True),
        "c": ("def c(s):", "    return 1", False),
        "d": ("", "", True),
        "e": ("", "", True),
    }


def test_an_unknown_task_is_refused_naming_the_built_ins(docs):
    with pytest.raises(TaskError, match="code-package, code-follows, code-renamed, code-body"):
        builtin_from_documents("code-nope", docs[:3], FRACTION)
    with pytest.raises(TaskError, match="unknown built-in"):
        builtin_task("code-nope", DataConfig())  # refused before reading the corpus


def test_a_corpus_that_yields_no_items_is_refused():
    flat = [(f"mod{i}.py", f"x = {i}\n" * 20) for i in range(5)]
    with pytest.raises(TaskError, match="code-package needs at least 2 packages"):
        builtin_from_documents("code-package", flat, 0.5)
    with pytest.raises(TaskError, match="yield no code-renamed items"):
        builtin_from_documents("code-renamed", flat, 0.5)
    with pytest.raises(TaskError, match="yield no code-body items"):
        builtin_from_documents("code-body", flat, 0.5)


def test_a_small_corpus_gives_fewer_items_without_failing():
    fns = "".join(f"def f{i}(a, b):\n    \"\"\"Doc {i}.\"\"\"\n    c = a + b * {i}\n    return c - {i}\n\n"
                  for i in range(12))
    docs = [(f"pkg{i % 2}/m{i}.py", fns.replace("def f", f"def m{i}_f")) for i in range(8)]
    task = builtin_from_documents("code-body", docs, 0.0)  # the last document held out
    assert 0 < len(task.val) < 500 and len(task.train) < 2000


def test_packages_of_files_named_by_absolute_paths_start_below_their_common_folder():
    body = "".join(f"def f{i}(a):\n    return a + {i}\n\n" for i in range(30))
    docs = [(f"/home/u/proj/{pkg}/m{i}.py", f"# {pkg} {i}\n" + body) for pkg in ("alpha", "beta") for i in range(6)]
    docs.append(("/home/u/proj/top.py", body))  # a top-level module: no package
    task = builtin_from_documents("code-package", docs, 0.3)
    assert task.labels == ("alpha", "beta")
    assert all("alpha" not in ex.segments[0] and "beta" not in ex.segments[0] for ex in task.train + task.val)


def test_builtin_task_reads_the_corpus_of_its_data_config(tmp_path):
    for i in range(6):
        (tmp_path / f"m{i}.py").write_text("".join(
            f"def f{i}_{j}(a, b):\n    \"\"\"Add {j}.\"\"\"\n    c = a + b * {j}\n    return c - {i}\n\n"
            for j in range(10)))
    cfg = DataConfig(source="text", paths=(str(tmp_path / "*.py"),), val_fraction=0.4)
    task = builtin_task("code-body", cfg, n_train=20, n_val=10, seed=3)
    assert task == builtin_from_documents("code-body", list(iter_documents(cfg)), 0.4, n_train=20, n_val=10, seed=3)
    assert 0 < len(task.train) <= 20 and 0 < len(task.val) <= 10
