"""The code task: prompts come from their split's documents only, each mutation lowers the feature it breaks,
features never raise, labelers are deterministic and calibrated to the paper's agreement, and ranking records are
what the reward model reads."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gptjax.config import DataConfig
from gptjax.rlhf import code_task as ct

N = 60


@pytest.fixture(scope="module")
def docs():
    return ct._documents(DataConfig())


@pytest.fixture(scope="module")
def train():
    return ct.prompts("train", limit=N, seed=0)


@pytest.fixture(scope="module")
def val():
    return ct.prompts("val", limit=N, seed=0)


@pytest.fixture(scope="module")
def items(train):
    return ct.synthetic_items(train, k=7, seed=1)


def _located(doc: str, ex: ct.Example) -> bool:
    """Whether the example's function is a run of the document's lines, all indented by the def's indentation."""
    want = ex.function.split("\n")[:-1]
    lines = doc.split("\n")
    for i, ln in enumerate(lines):
        if ln.lstrip(" ") != want[0] or i + len(want) > len(lines):
            continue
        col = len(ln) - len(want[0])
        got = lines[i:i + len(want)]
        if all(g[col:] == w if g.strip() else not w.strip() for g, w in zip(got, want)) and \
                all(not g.strip() or g[:col] == " " * col for g in got):
            return True
    return False


def test_prompts_come_only_from_their_splits_documents(docs, train, val):
    train_docs, val_docs = docs
    assert len(train) == N and len(val) == min(N, len(ct.prompts("val"))) > 0  # the stdlib holds out 15
    assert all(_located(train_docs[ex.source], ex) for ex in train)
    assert all(_located(val_docs[ex.source], ex) for ex in val)
    # no held-out prompt occurs (at any indentation) in any training document
    wants = [[ln.strip() for ln in ex.prompt.split("\n")[:-1]] for ex in val]
    firsts = {w[0] for w in wants}
    hits = set()
    for text in train_docs:
        lines = [ln.strip() for ln in text.split("\n")]
        for i, s in enumerate(lines):
            if s in firsts:
                hits.update(k for k, w in enumerate(wants) if w[0] == s and lines[i:i + len(w)] == w)
    assert not hits, [val[k].name for k in sorted(hits)]
    assert not {ex.function for ex in ct.prompts("train")} & {ex.function for ex in ct.prompts("val")}


def test_prompt_and_response_reassemble_the_dedented_function(train, val):
    for ex in train + val:
        assert ex.prompt.endswith("\n") and ex.response.endswith("\n") and ex.response.strip()
        assert _located(ex.function, ex)
        assert ct._parse(ex.function) is not None and not ex.function[0].isspace()
        fn = ct._parse(ex.function).body[0]
        assert fn.name == ex.name and ast_docstring(fn)
        assert 2 <= fn.end_lineno - ct._first_line(fn.body[1]) + 1 <= 12
        assert ct._first_line(fn.body[1]) == ex.prompt.count("\n")  # the prompt ends with the first body line
        assert ex.params == tuple(p for p in ct._param_names(fn.args) if p not in ("self", "cls"))
        assert "\t" not in ex.function and "<|" not in ex.function


def ast_docstring(fn) -> bool:
    import ast

    return ast.get_docstring(fn) is not None


def test_limit_and_seed_subsample_deterministically_in_corpus_order(train):
    everything = ct.prompts("train")
    assert ct.prompts("train", limit=N, seed=0) == train
    assert ct.prompts("train", limit=N, seed=1) != train
    at = {ex: i for i, ex in enumerate(everything)}
    assert [at[ex] for ex in train] == sorted(at[ex] for ex in train)
    with pytest.raises(ValueError, match="split"):
        ct.prompts("test")


def test_real_bodies_score_one_on_the_checkable_features(train, val):
    names = ("parses", "defined", "uses_params", "no_repeats")
    feats = [ct.features(ex, ex.response, True) for ex in train + val]
    for name in names:
        assert np.mean([f[name] == 1.0 for f in feats]) >= 0.9, name
    assert all(f["parses"] == 1.0 and f["length"] == 1.0 and f["ends"] == 1.0 for f in feats)


BREAKS = {  # mutation -> the features it lowers
    "duplicate": ("no_repeats",),
    "undefined": ("defined",),
    "drop_params": ("uses_params",),
    "indent": ("parses",),
    "junk": ("parses", "defined"),
    "truncate": ("ends",),
    "empty": ("length",),
    "ramble": ("length", "ends"),
}


@pytest.mark.parametrize("kind", sorted(BREAKS))
def test_each_mutation_lowers_its_own_feature(train, val, kind):
    applied, real_true, mutated_true = 0, [], []
    for ex in train + val:
        c = ct.mutate(ex, kind, np.random.default_rng(0))
        if c is None:
            continue
        applied += 1
        f, real = ct.features(ex, *c), ct.features(ex, ex.response, True)
        assert all(f[name] < real[name] for name in BREAKS[kind]), (kind, ex.name, c, f)
        if kind in ("indent", "junk"):
            assert f["parses"] == 0
        real_true.append(ct.true_score(ex, ex.response, True))
        mutated_true.append(ct.true_score(ex, *c))
    assert applied >= 0.25 * len(train + val), (kind, applied)
    assert np.mean(mutated_true) < np.mean(real_true) - 0.02


def test_features_never_raise_on_garbage(train):
    rng = np.random.default_rng(0)
    garbage = [bytes(rng.integers(0, 256, size=n, dtype=np.uint8)).decode("utf-8", errors=err)
               for n in (1, 50, 2000) for err in ("replace", "surrogateescape")]
    garbage += ["", "\n", "\x00", "(" * 3000, "    " + "[" * 300 + "\n", "    '''\n", "\tx = 1\n  y\n",
                "    x = 1\n" * 2000, "    " + "a" * 100_000, "    return f'{x!r:{y}}'\n", "\r\n\r"]
    for prompt in (train[0], train[0].prompt, "", "not a def(\n", "def f(a, *, b=1, **kw):\n"):
        for g in garbage:
            f = ct.features(prompt, g, False)
            assert tuple(f) == ct.FEATURES and all(0.0 <= v <= 1.0 for v in f.values()), (prompt, g[:40], f)
            assert np.isfinite(ct.LABELERS[0].score(prompt, g, True, item_key="k"))


def test_bare_prompts_find_the_same_parameters_and_scores(train):
    for ex in train:
        assert ct._prompt_params(ex.prompt) == ex.params
        f, g = ct.features(ex, ex.response, True), ct.features(ex.prompt, ex.response, True)
        assert {k: v for k, v in f.items() if k != "length"} == {k: v for k, v in g.items() if k != "length"}


def test_text_after_the_function_closes_changes_nothing(train):
    ex = train[0]
    body, closed = ct.function_part(ex.response + "def other():\n    lorem ipsum\n")
    assert (body, closed) == (ex.response, True)
    assert ct.function_part(ex.response) == (ex.response, False)
    assert ct.features(ex, ex.response + "\nclass X:\n  zork zork\n", True) == ct.features(ex, ex.response, True)


def test_labeler_scores_are_deterministic_and_differ_across_labelers(items):
    ex, comps = items[0]
    for c, e in comps:
        scores = [lab.score(ex, c, e, item_key=3) for lab in ct.LABELERS]
        assert scores == [lab.score(ex, c, e, item_key=3) for lab in ct.LABELERS]
        assert len(set(scores)) == len(scores)
        assert ct.LABELERS[0].score(ex, c, e, item_key=4) != scores[0]  # another item: another draw
    weights = {tuple(lab.vector()) for lab in ct.LABELERS}
    assert len(weights) == len(ct.LABELERS) == 6
    assert ct.TRAIN_LABELERS + ct.HELDOUT_LABELERS == ct.LABELERS and len(ct.HELDOUT_LABELERS) == 2
    with pytest.raises(ValueError, match="unknown features"):
        ct.Labeler("x", {"parse": 1.0})


def test_ranks_tie_exactly_where_scores_are_equal(items):
    quiet = ct.with_noise(ct.LABELERS, 0.0)
    for key, (ex, comps) in enumerate(items[:20]):
        comps = list(comps) + [comps[0], comps[-1]]  # the same completion twice: a tie for any labeler
        for lab in ct.LABELERS + quiet:
            scores = [lab.score(ex, c, e, item_key=key) for c, e in comps]
            ranks = lab.rank(ex, comps, key)
            assert min(ranks) == 0
            for i in range(len(comps)):
                for j in range(len(comps)):
                    assert (ranks[i] == ranks[j]) == (scores[i] == scores[j])
                    assert (ranks[i] < ranks[j]) == (scores[i] > scores[j])


def test_calibrate_noise_hits_its_target(items):
    for target in (0.75, 0.82):
        noise = ct.calibrate_noise(items, target)
        assert noise > 0
        got = ct.agreement(ct.with_noise(ct.LABELERS, noise), ct.with_noise(ct.LABELERS, noise), items)
        assert abs(got - target) <= 0.03, (target, noise, got)
    assert ct.calibrate_noise(items, 0.999) == 0.0  # weights alone already disagree more than that


def test_default_noise_lets_labelers_disagree_on_synthetic_completions(items):
    # NOISE is calibrated to the paper's ~75% on an SFT policy's samples (code_task's docstring); synthetic
    # mutations differ by more, so on them the labelers agree more than that, and less than with no noise
    assert 0.78 <= ct.agreement(ct.LABELERS, ct.LABELERS, items) <= 0.88
    quiet = ct.with_noise(ct.LABELERS, 0.0)
    assert ct.agreement(quiet, quiet, items) > ct.agreement(ct.LABELERS, ct.LABELERS, items)


def test_ranking_records_round_trip_through_json(items):
    ex, comps = items[0]
    tied = (ex, [comps[0]] * 4)  # every rank ties: dropped
    records = ct.ranking_records(items + [tied])
    assert len(records) == len(items)
    for rec, (ex, comps) in zip(records, items):
        assert json.loads(json.dumps(rec)) == rec
        assert set(rec) == {"prompt", "completions", "ended", "ranks", "labeler"}
        assert rec["prompt"] == ex.prompt and rec["completions"] == [c for c, _ in comps]
        assert rec["ended"] == [e for _, e in comps] and 4 <= len(rec["ranks"]) <= 9
        assert rec["labeler"] in {lab.name for lab in ct.TRAIN_LABELERS} and len(set(rec["ranks"])) > 1
    assert [r["labeler"] for r in records[:4]] == [lab.name for lab in ct.TRAIN_LABELERS]
    assert ct.ranking_records(items) == records
    with pytest.raises(ValueError, match="K = 4..9"):
        ct.ranking_records([(ex, comps[:3])])
