"""Zero- and few-shot tasks: file formats, built-in tasks, prompts, and log-likelihood scoring checked
against the model's own forward pass."""

from __future__ import annotations

import json
import math
import re

import jax
import numpy as np
import pytest

from gptjax import data
from gptjax.eval import tasks
from gptjax.eval.scoring import Run, Scorer
from gptjax.model import forward, vocab_mask


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------------------------
# Formats


def test_native_formats_and_detection(tmp_path):
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"context": "2 + 2 =", "choices": ["4", "5"], "gold": 0}])
    cl = write_jsonl(tmp_path / "cl.jsonl", [{"context": "x = 1; print(", "target": "x"}])
    px = write_jsonl(tmp_path / "px.jsonl", [{"text": "some text"}])
    txt = tmp_path / "doc.txt"
    txt.write_text("plain text file")
    assert tasks.load_file(mc) == ("multiple_choice", [{"context": "2 + 2 =", "choices": ["4", "5"], "gold": 0}])
    assert tasks.load_file(cl)[0] == "cloze"
    assert tasks.load_file(px) == ("perplexity", [{"text": "some text"}])
    assert tasks.load_file(txt) == ("perplexity", [{"text": "plain text file"}])
    t = tasks.resolve(f"cloze:{cl}")
    assert t.kind == "cloze" and t.target_delimiter == " "


def test_public_formats_convert_as_downloaded(tmp_path):
    hs = write_jsonl(tmp_path / "hellaswag_val.jsonl", [{
        "activity_label": "Baking cookies", "ctx_a": "A woman mixes dough.", "ctx_b": "she",
        "ctx": "A woman mixes dough. she", "endings": ["puts it in the oven [title] Bake.", "eats a shoe."],
        "label": "0"}])
    kind, (r,) = tasks.load_file(hs)
    assert kind == "multiple_choice" and r["gold"] == 0
    assert r["context"] == "Baking cookies: A woman mixes dough. She"
    assert r["choices"] == ["puts it in the oven. Bake.", "eats a shoe."]

    nested = {"id": "q1", "question": {"stem": "What is hot?", "choices": [
        {"text": "ice", "label": "A"}, {"text": "fire", "label": "B"}]}, "answerKey": "B"}
    flat = {"id": "q2", "question": "What is cold?", "choices": {"text": ["ice", "fire"], "label": ["1", "2"]},
            "answerKey": "1"}
    kind, rows = tasks.load_file(write_jsonl(tmp_path / "arc.jsonl", [nested, flat]))
    assert kind == "multiple_choice"
    assert rows == [{"context": "Question: What is hot?\nAnswer:", "choices": ["ice", "fire"], "gold": 1},
                    {"context": "Question: What is cold?\nAnswer:", "choices": ["ice", "fire"], "gold": 0}]

    lam = write_jsonl(tmp_path / "lambada_test.jsonl", [{"text": "he opened the door and saw his dog"}])
    assert tasks.load_file(lam) == ("cloze", [{"context": "he opened the door and saw his", "target": "dog"}])
    # the same rows under a neutral name are plain text, unless the format is named
    other = write_jsonl(tmp_path / "x.jsonl", [{"text": "he opened the door"}])
    assert tasks.load_file(other)[0] == "perplexity"
    assert tasks.resolve(f"lambada:{other}").kind == "cloze"


@pytest.mark.parametrize("rows,fmt,match", [
    ([{"context": "a", "choices": ["x"], "gold": 0}], "auto", "at least two"),
    ([{"context": "a", "choices": ["x", "y"], "gold": 2}], "auto", "index into its 2 choices"),
    ([{"question": "q", "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "C"}], "auto", "answerKey 'C'"),
    ([{"foo": 1}], "auto", "cannot tell the task format"),
    ([{"text": "t"}], "hellaswag", "does not look like hellaswag"),
    ([{"context": "c"}], "cloze", "no target"),
])
def test_bad_task_files_get_one_clear_error(tmp_path, rows, fmt, match):
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(tasks.TaskError, match=match):
        tasks.load_file(path, fmt)


def test_task_names_and_specs(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "target": "b"}\nnot json\n')
    with pytest.raises(tasks.TaskError, match="bad.jsonl:2 is not valid JSON"):
        tasks.resolve(str(tmp_path / "bad.jsonl"))
    with pytest.raises(tasks.TaskError, match="not a built-in .*code-nextline"):
        tasks.resolve("hellaswagg")
    write_jsonl(tmp_path / "test.jsonl", [{"context": f"q{i}", "choices": ["a", "b"], "gold": i % 2} for i in range(3)])
    write_jsonl(tmp_path / "train.jsonl", [{"context": f"t{i}", "choices": ["a", "b"], "gold": 1} for i in range(4)])
    (tmp_path / "spec.json").write_text(json.dumps({"name": "mine", "test": "test.jsonl", "train": "train.jsonl",
                                                    "description": "Answer.\n\n", "fewshot_delimiter": "\n"}))
    t = tasks.resolve(str(tmp_path / "spec.json"))
    assert (t.name, t.kind, len(t.test), len(t.train)) == ("mine", "multiple_choice", 3, 4)
    p = tasks.prompt(t, 1, shots=2)
    assert p.startswith("Answer.\n\n") and p.endswith("q1") and p.count(" b\n") == 2
    assert tasks.prompt(t, 1, shots=2) == p  # seeded
    assert len({tasks.prompt(t, 1, shots=2, seed=s) for s in range(10)}) > 1
    (tmp_path / "spec2.json").write_text(json.dumps({"test": "test.jsonl", "shots": 3}))
    with pytest.raises(tasks.TaskError, match="only the keys"):
        tasks.resolve(str(tmp_path / "spec2.json"))


def test_few_shot_examples_come_from_the_pool_and_never_the_item_itself(tmp_path):
    rows = [{"context": f"item{i}:", "target": f"ans{i}"} for i in range(6)]
    t = tasks.Task("t", "cloze", rows)
    for i in range(6):
        p = tasks.prompt(t, i, shots=5)
        assert p.endswith(f"item{i}:") and p.count("item") == 6 and f"ans{i}" not in p
    assert tasks.prompt(t, 0, 0) == "item0:"
    with pytest.raises(tasks.TaskError, match="5 examples to draw 6 shots"):
        tasks.prompt(t, 0, shots=6)


class CharTokenizer:
    """Each character is a token: enough to check the context / continuation split."""
    eot_id = 0

    def encode(self, text):
        return [ord(c) for c in text]


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    tok = CharTokenizer()
    ctx, cont = tasks.encode_pair(tok, "Answer: ", "yes")
    assert ctx == tok.encode("Answer:") and cont == tok.encode(" yes")
    assert tasks.encode_pair(tok, "", "x") == ([0], [ord("x")])
    assert tasks.encode_pair(tok, "def f():\n", "    pass") == (tok.encode("def f():"), tok.encode("\n    pass"))
    # all whitespace: the whole context moves over and end-of-text stands in for it
    assert tasks.encode_pair(tok, "\n\n  ", "x = 1") == ([0], tok.encode("\n\n  x = 1"))


# ----------------------------------------------------------------------------------------------
# Built-in tasks


@pytest.fixture(scope="module")
def data_cfg(tiny_cfg):
    return tiny_cfg.data


def test_builtin_tasks_are_deterministic_and_well_formed(data_cfg):
    nl = tasks.builtin("code-nextline", data_cfg, n=60, n_train=20)
    assert nl.kind == "multiple_choice" and len(nl.test) == 60 and len(nl.train) == 20
    assert nl.test == tasks.builtin("code-nextline", data_cfg, n=60, n_train=20).test
    for d in nl.test:
        gold = d["choices"][d["gold"]]
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        # same indentation for every candidate: indentation alone does not give the answer away
        assert len({c[: len(c) - len(c.lstrip())] for c in d["choices"]}) == 1
        assert d["context"].endswith("\n") and gold.strip()
    golds = [d["gold"] for d in nl.test]
    assert len(set(golds)) == 4  # the gold position is shuffled

    cz = tasks.builtin("code-cloze", data_cfg, n=60, n_train=20)
    assert cz.kind == "cloze" and len(cz.test) == 60
    for d in cz.test:
        before = d["context"].rsplit("\n", 1)[0]
        # the answer is recoverable from the context: it occurs in the lines before
        assert re.search(rf"\b{re.escape(d['target'])}\b", before) and len(d["target"]) >= 5
    # test items come from held-out files, few-shot examples from training files
    train_docs, val_docs = data.split_documents(data_cfg)
    assert val_docs and train_docs and not set(val_docs) & set(train_docs)
    val = "\n".join(val_docs)
    assert all(d["context"] in val for d in cz.test + nl.test)
    assert not any(d["context"] in val for d in cz.train + nl.train if len(d["context"]) > 200)


# ----------------------------------------------------------------------------------------------
# Scoring against the forward pass


@pytest.fixture(scope="module")
def run(train_cfg, trainer1, token_data):
    params = trainer1.init(jax.random.key(0))["params"]
    return Run(train_cfg, trainer1.mesh, trainer1, params, token_data.tokenizer, 0, None)


_forward = jax.jit(forward, static_argnums=0)


def logits_of(run, ids):
    """[len(ids), V] logits, from one fixed-shape compiled forward pass (causal: the padding is not seen)."""
    cfg = run.cfg.model
    window = np.zeros((1, cfg.block_size), np.int32)
    window[0, :len(ids)] = ids
    return np.asarray(_forward(cfg, run.params, window)[0, :len(ids)] + vocab_mask(cfg))


def by_hand(run, ctx, cont):
    cfg = run.cfg.model
    full = (ctx + cont)[-(cfg.block_size + 1):]
    logits = logits_of(run, full[:-1])[None]
    logp = np.asarray(jax.nn.log_softmax(logits[0], -1))
    n = min(len(cont), cfg.block_size)  # a continuation longer than the window: its last T tokens
    rows = range(len(full) - 1 - n, len(full) - 1)
    ll = sum(float(logp[r, full[r + 1]]) for r in rows)
    greedy = all(int(np.argmax(logits[0, r])) == full[r + 1] for r in rows)
    return ll, greedy


def test_scorer_matches_the_forward_pass(run):
    rng = np.random.default_rng(0)
    T = run.cfg.model.block_size
    pairs = [(list(rng.integers(1, 500, n)), list(rng.integers(1, 500, m)))
             for n, m in [(3, 2), (20, 1), (1, 5), (40, 3), (7, 7), (T, 4), (2, T + 3)]]
    # a greedy continuation: the model's own argmax after the context
    ctx = pairs[0][0]
    nxt = int(np.argmax(logits_of(run, ctx)[-1]))
    pairs.append((ctx, [nxt]))
    scorer = Scorer(run, batch_size=4, progress=False)
    got = scorer.loglikelihood(pairs)
    assert scorer.truncated == 3  # (40 + 3), (T + 4) and (2 + T + 3) exceed T + 1 tokens
    for (c, x), (ll, g) in zip(pairs, got):
        ref_ll, ref_g = by_hand(run, c, x)
        np.testing.assert_allclose(ll, ref_ll, rtol=1e-5, atol=1e-4)
        assert g == ref_g
    assert got[-1][1] is True
    # batch size and order do not change a score
    again = Scorer(run, batch_size=8, progress=False).loglikelihood(pairs[::-1])[::-1]
    np.testing.assert_allclose([a for a, _ in again], [a for a, _ in got], rtol=1e-5)
    with pytest.raises(ValueError, match="empty context"):
        scorer.loglikelihood([([], [1])])


def test_rolling_loglikelihood_sums_every_token(run):
    scorer = Scorer(run, batch_size=4, progress=False)
    T = run.cfg.model.block_size
    ids = list(np.random.default_rng(1).integers(1, 500, 2 * T + 5))
    eot = run.tokenizer.eot_id
    seq = [eot] + ids
    # lm-evaluation-harness's windows: full windows of T predictions; the last, partial one (5 tokens) is
    # conditioned on the T - 4 tokens before it
    windows = [(seq[0:1], seq[1:T + 1]), (seq[T:T + 1], seq[T + 1:2 * T + 1]), (seq[T + 5:2 * T + 1], seq[2 * T + 1:])]
    assert sum(len(c) for _, c in windows) == len(ids) and all(len(a) + len(c) == T + 1 for a, c in windows)
    ref = sum(by_hand(run, a, c)[0] for a, c in windows)
    np.testing.assert_allclose(scorer.rolling_loglikelihood(ids), ref, rtol=1e-5)


def test_task_metrics_follow_from_the_scores(run, tmp_path):
    tok = run.tokenizer
    rows = [{"context": "def f(x):\n    return", "choices": [" x", " y + 1", " None"], "gold": 0},
            {"context": "import", "choices": [" os", " sys"], "gold": 1},
            {"context": "for i in", "choices": [" range(10):", " x"], "gold": 0}]
    t = tasks.Task("mc", "multiple_choice", rows, target_delimiter="")
    scorer = Scorer(run, batch_size=4, progress=False)
    m = tasks.score_task(t, scorer, tok)
    acc = acc_norm = 0
    nll = []
    for r in rows:
        lls = [by_hand(run, *tasks.encode_pair(tok, r["context"], c))[0] for c in r["choices"]]
        acc += int(np.argmax(lls)) == r["gold"]
        acc_norm += int(np.argmax([ll / len(c) for ll, c in zip(lls, r["choices"])])) == r["gold"]
        nll.append(-(lls[r["gold"]] - np.logaddexp.reduce(lls)))  # -log softmax over the choices
    assert m["n"] == 3 and math.isclose(m["acc"], acc / 3) and math.isclose(m["acc_norm"], acc_norm / 3)
    assert math.isclose(m["nll_correct"], np.mean(nll), rel_tol=1e-5)
    assert math.isclose(m["nll_correct_stderr"], np.std(nll, ddof=1) / math.sqrt(3), rel_tol=1e-4)
    assert math.isclose(m["chance"], (1 / 3 + 1 / 2 + 1 / 2) / 3)

    cl = tasks.Task("cl", "cloze", [{"context": "x = 1\nprint(", "target": "x)"}], target_delimiter="")
    m = tasks.score_task(cl, scorer, tok)
    ll, greedy = by_hand(run, *tasks.encode_pair(tok, "x = 1\nprint(", "x)"))
    assert m["acc"] == float(greedy) and math.isclose(m["ppl"], math.exp(-ll), rel_tol=1e-5)
    assert math.isclose(m["nll_correct"], -ll, rel_tol=1e-5)  # -log p(target): the chance a sample is exactly it

    px = tasks.Task("px", "perplexity", [{"text": "def main():\n    pass\n"}])
    m = tasks.score_task(px, scorer, tok)
    ids = tok.encode("def main():\n    pass\n")
    nats = -scorer.rolling_loglikelihood(ids)
    assert math.isclose(m["token_perplexity"], math.exp(nats / len(ids)), rel_tol=1e-6)
    assert math.isclose(m["bits_per_byte"], nats / len(b"def main():\n    pass\n") / math.log(2), rel_tol=1e-6)
    assert "acc" in tasks.table({"mc": {0: tasks.score_task(t, scorer, tok)}})
