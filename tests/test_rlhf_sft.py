"""InstructGPT SFT: the loss counts response tokens only (and equals a hand computation from the model's logits),
packing puts every example in exactly once per epoch and never overfills a row, a run from a tiny parent records
its lineage and the parent's held-out loss at step 0 and resumes exactly, and bad demonstrations are one line."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import finished_steps, read_losses, run_script

from gptjax.rlhf import sft as sft_lib
from gptjax.rlhf.config import resolve_sft

BLOCK = 128  # the parent's context: room for a couple of short functions' signatures, docstrings and first lines
STEPS, EVERY = 6, 2


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tiny_overrides, prepared) -> Path:
    from gptjax import config
    from gptjax.train.pretrain import pretrain

    run = tmp_path_factory.mktemp("sft-parent") / "run"
    pretrain(config.resolve("tiny", tiny_overrides + [f"model.block_size={BLOCK}", "steps=4", f"run_dir={run}"]),
             log=lambda *_: None)
    return run


def stdlib_demos(corpus_dir: Path, limit: int = 120) -> list[dict]:
    """Demonstrations made from the fixed copy of stdlib files: prompt = a function's def line (and docstring when
    short), response = the next line or two of its body."""
    out = []
    for path in sorted(corpus_dir.glob("*.py")):
        src = path.read_text()
        lines = src.splitlines()
        for node in ast.walk(ast.parse(src)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body, head_end = node.body, node.body[0].lineno - 1
            first = body[0]
            has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and \
                isinstance(first.value.value, str)
            if has_doc and len(body) == 1:
                continue
            rest = body[1] if has_doc else first
            prompt = "\n".join(lines[node.lineno - 1:first.end_lineno if has_doc else head_end]) + "\n"
            if len(prompt) > 160:
                prompt = "\n".join(lines[node.lineno - 1:head_end]) + "\n"
            response = "\n".join(lines[rest.lineno - 1:min(node.end_lineno, rest.lineno + 1)]) + "\n"
            if len(prompt) <= 120 and response.strip():
                out.append({"prompt": prompt, "response": response})
    assert len(out) >= limit, "the corpus fixture holds unexpectedly few functions"
    return out[:limit]


@pytest.fixture(scope="module")
def demo_file(tmp_path_factory, corpus_dir) -> Path:
    path = tmp_path_factory.mktemp("sft-data") / "demos.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in stdlib_demos(corpus_dir)))
    return path


def _quiet(*_):
    pass


# ----------------------------------------------------------------------------------------------
# (1) the loss


def test_sft_loss_counts_exactly_the_response_tokens_and_equals_a_hand_computation(parent):
    from gptjax import config
    from gptjax.data import load_tokenizer
    from gptjax.model import forward, init_params
    from gptjax.train.steps import token_nats

    tok = load_tokenizer(parent)
    mcfg = config.load_json(parent / "config.json").model
    demos = [sft_lib.Demo("def add(a, b):\n", "    return a + b\n", "a"),
             sft_lib.Demo("class Point:\n    \"\"\"A point.\"\"\"\n", "    x = 0\n", "b"),
             sft_lib.Demo("import os\n", "print(os.sep)\n", "c")]
    ex = sft_lib.encode_demos(tok, demos, BLOCK, BLOCK)
    rows = sft_lib.pack(np.asarray([len(e) for e in ex]), np.arange(3), BLOCK + 1)
    assert rows == [[0, 1, 2]]  # all three fit in one row
    tokens, weights = sft_lib.fill_rows(rows, ex, BLOCK + 1, pad_id=0)
    # weight t scores the prediction of token t+1: 1 exactly on each response token and its EOT
    want = np.zeros(BLOCK, np.float32)
    o = 0
    for e in ex:
        assert list(e.tokens[-1:]) == [tok.eot_id] and not e.truncated
        np.testing.assert_array_equal(tokens[0, o:o + len(e)], e.tokens)
        want[o + e.n_prompt - 1:o + len(e) - 1] = 1.0
        o += len(e)
    np.testing.assert_array_equal(weights[0], want)
    o = 0
    for e in ex:  # prompt targets (and the EOT -> next prompt transition) weigh exactly 0, responses exactly 1
        assert np.all(weights[0, max(o - 1, 0):o + e.n_prompt - 1] == 0.0)
        assert np.all(weights[0, o + e.n_prompt - 1:o + len(e) - 1] == 1.0)
        o += len(e)
    assert np.all(weights[0, o - 1:] == 0.0)  # padding
    assert weights.sum() == sum(len(e) - e.n_prompt for e in ex)

    params = init_params(mcfg, jax.random.key(3))
    t = jnp.asarray(tokens)
    w = jnp.asarray(weights)
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, targets: sft_lib.sft_loss(mcfg, p, t[:, :-1], targets, w)))
    loss = float(loss_and_grad(params, t[:, 1:])[0])
    # by hand from the logits
    logits = np.asarray(jax.jit(lambda p: forward(mcfg, p, t[:, :-1]))(params), np.float64)[..., :mcfg.vocab_size]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nats = -np.take_along_axis(logp, tokens[:, 1:, None].astype(np.int64), -1)[..., 0]
    assert loss == pytest.approx(float((nats * weights).sum() / weights.sum()), rel=1e-5)
    # = pretraining's per-token loss averaged over exactly the response + EOT positions
    pre = np.asarray(jax.jit(lambda p: token_nats(mcfg, p, t))(params))
    assert loss == pytest.approx(float(pre[weights == 1].mean()), rel=1e-5)
    # changing the targets where the weight is 0 (the inputs stay) changes neither the loss nor its gradient
    junk = jnp.asarray(np.random.default_rng(0).integers(0, mcfg.vocab_size, tokens[:, 1:].shape), jnp.int32)
    other = jnp.where(w > 0, t[:, 1:], junk)
    assert not np.array_equal(np.asarray(other), tokens[:, 1:])
    (la, ga), (lb, gb) = loss_and_grad(params, t[:, 1:]), loss_and_grad(params, other)
    assert float(la) == float(lb)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_long_response_loses_its_end_and_a_long_prompt_is_refused(parent):
    from gptjax.data import load_tokenizer
    from gptjax.errors import DataError

    tok = load_tokenizer(parent)
    prompt = "def f(x):\n"
    e = sft_lib.encode_demo(tok, sft_lib.Demo(prompt, "    x = x + 1\n" * 40, "r"), 32, BLOCK)
    assert e.truncated and len(e) == 33 and e.n_prompt == len(tok.encode(prompt))
    assert list(e.tokens[:e.n_prompt]) == tok.encode(prompt) and tok.eot_id not in e.tokens[e.n_prompt:]
    with pytest.raises(DataError, match="the prompt is .* tokens, more than max_len=32"):
        sft_lib.encode_demo(tok, sft_lib.Demo("x = 1\n" * 40, "pass\n", "r"), 32, BLOCK)


# ----------------------------------------------------------------------------------------------
# (2) packing


def _examples(n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, r = int(rng.integers(1, 6)), int(rng.integers(1, 10))
        out.append(sft_lib.Example(np.arange(p + r, dtype=np.int32), p, False))
    return out


def test_packing_puts_every_example_once_per_epoch_in_rows_that_fit():
    ex = _examples(50)
    row_len = 33
    stream = sft_lib.RowStream(ex, row_len, seed=1, packed=True, pad_id=0)
    lengths = stream.lengths
    for e in range(3):
        rows = stream.epoch(e)
        assert sorted(i for row in rows for i in row) == list(range(len(ex)))  # each example exactly once
        assert all(lengths[row].sum() <= row_len for row in rows)  # no row over max_len + 1 tokens
        assert len(rows) < len(ex) / 1.5 and max(map(len, rows)) >= 3  # several per row where they fit
        # greedy: a row was closed only because its successor's first example did not fit
        assert all(lengths[a].sum() + lengths[b[0]] > row_len for a, b in zip(rows, rows[1:]))
    assert stream.epoch(0) != stream.epoch(1)  # a fresh order each epoch
    # the stream: epochs back to back, a batch a pure function of (seed, step)
    n0 = len(stream.epoch(0))
    assert stream.rows(0, n0 + 2) == stream.epoch(0) + stream.epoch(1)[:2]
    again = sft_lib.RowStream(ex, row_len, seed=1, packed=True, pad_id=0)
    for step in (7, 2, 0):  # in any order, from a fresh stream
        for x, y in zip(again.batch(step, 4), stream.batch(step, 4)):
            np.testing.assert_array_equal(x, y)
    tokens, weights = stream.batch(1, 4)
    assert tokens.shape == (4, row_len) and weights.shape == (4, row_len - 1)
    assert weights.sum() == sum(len(ex[i]) - ex[i].n_prompt for row in stream.rows(4, 4) for i in row)
    # pack=False: one example per row
    single = sft_lib.RowStream(ex, row_len, seed=1, packed=False, pad_id=0).epoch(0)
    assert all(len(r) == 1 for r in single) and sorted(r[0] for r in single) == list(range(len(ex)))


# ----------------------------------------------------------------------------------------------
# (3) a run end to end, and its exact resume


def _cfg(parent, demo_file, run_dir, *extra):
    return resolve_sft([f"init_from={parent}", f"data={demo_file}", f"run_dir={run_dir}", f"steps={STEPS}",
                        "batch_size=4", "eval_batch_size=8", "eval_every=3", f"checkpoint.every={EVERY}",
                        "checkpoint.keep=10", "optim.lr=3e-3", "log_every=1", *extra])


def _copy_as_killed(src: Path, dst: Path, step: int) -> Path:
    """`src` as a SIGKILL just after step `step + 1` leaves it: checkpoints through `step`, metrics through
    `step + 1`, no summary."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > step:
            shutil.rmtree(p)
    lines = (dst / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= step + 1))
    (dst / "summary.json").unlink()
    return dst


@pytest.fixture(scope="module")
def runs(tmp_path_factory, parent, demo_file):
    root = tmp_path_factory.mktemp("sft-runs")
    a = root / "a"
    out_a: list[str] = []
    summary_a = sft_lib.sft(_cfg(parent, demo_file, a), devices=jax.devices()[:1], log=out_a.append)
    b = _copy_as_killed(a, root / "b", EVERY)
    assert finished_steps(b) == [EVERY]
    out_b: list[str] = []
    summary_b = sft_lib.sft(_cfg(parent, demo_file, b), devices=jax.devices()[:1], log=out_b.append)
    return {"a": a, "b": b, "out_a": out_a, "out_b": out_b, "summary_a": summary_a, "summary_b": summary_b}


def test_sft_run_records_its_parent_and_the_parents_held_out_loss_at_step_0(runs, parent):
    a = runs["a"]
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["stage"] == "sft" and cfg["init_from"] == str(parent)
    (first,) = cfg["lineage"][:1]
    assert first["run_dir"] == str(parent.absolute()) and first["step"] == 4 and first["params_fingerprint"]
    recs = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in recs if "val_loss" in r}
    assert sorted(evals) == [0, 3, STEPS]  # the parent, every eval_every, the end
    summary = runs["summary_a"]
    assert summary == json.loads((a / "summary.json").read_text())
    assert summary["val_loss_at_step_0"] == evals[0]["val_loss"] > summary["val_loss"]  # it learnt something
    assert summary["val_perplexity"] == pytest.approx(np.exp(summary["val_loss"]))
    assert summary["lineage"] == cfg["lineage"] and summary["n_val"] >= 1
    assert summary["rows_per_epoch"] < summary["n_train"] / 1.5  # packed: several demonstrations a row
    assert sorted(read_losses(a)) == list(range(1, STEPS + 1))
    assert any("held-out response loss" in line and "at step 0" in line for line in runs["out_a"])
    # an SFT run is a language model eval.py and sample.py read like any other
    from gptjax.eval.scoring import load_run

    run = load_run(a)
    assert run.step == STEPS and run.cfg.model.resid_pdrop == 0.2 and run.cfg.model.block_size == BLOCK


def test_killed_sft_run_resumes_to_exactly_the_uninterrupted_run(runs):
    a, b = runs["a"], runs["b"]
    assert any(f"resuming from checkpoint at step {EVERY}" in line for line in runs["out_b"])
    assert read_losses(a) == read_losses(b)
    assert runs["summary_a"]["val_loss"] == runs["summary_b"]["val_loss"]
    assert runs["summary_a"]["val_loss_at_step_0"] == runs["summary_b"]["val_loss_at_step_0"]
    assert finished_steps(a) == finished_steps(b)


def test_eight_devices_equal_one_device(parent, demo_file, tmp_path):
    out = {}
    for n in (1, 8):
        cfg = resolve_sft([f"init_from={parent}", f"data={demo_file}", f"run_dir={tmp_path / str(n)}", "steps=3",
                           "batch_size=8", "eval_batch_size=8", "mesh.fsdp=-1", "optim.lr=3e-3"])
        out[n] = sft_lib.sft(cfg, devices=jax.devices()[:n], log=_quiet)
        out[n]["losses"] = read_losses(tmp_path / str(n))
    assert sorted(out[1]["losses"]) == [1, 2, 3]
    for s in out[1]["losses"]:
        assert out[8]["losses"][s] == pytest.approx(out[1]["losses"][s], rel=2e-5), s
    assert out[8]["val_loss"] == pytest.approx(out[1]["val_loss"], rel=2e-5)


def test_resuming_with_another_identity_setting_is_refused(runs, parent, demo_file):
    from gptjax.errors import CheckpointError

    with pytest.raises(CheckpointError, match="with seed=0, not 1"):
        sft_lib.sft(_cfg(parent, demo_file, runs["a"], "seed=1"), devices=jax.devices()[:1], log=_quiet)


# ----------------------------------------------------------------------------------------------
# (4) bad input: one line each


@pytest.mark.parametrize("lines, fragment", [
    ([{"prompt": "def f():\n", "response": "    pass\n"}, {"prompt": "def g():\n"}],
     'line 2: the record needs a string "response" (missing'),
    ([{"prompt": "x = 1\n" * 200, "response": "pass\n"}] + [{"prompt": f"def f{i}():\n", "response": "    pass\n"}
                                                              for i in range(3)], "line 1: the prompt is"),
    ([], "holds no records"),
])
def test_bad_demonstrations_are_one_line(parent, tmp_path, capsys, lines, fragment):
    from gptjax.cli.rlhf import main

    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    rc = main(["sft", str(parent), "--data", str(data), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert fragment in line and str(data) in line
    if "prompt is" in line:
        assert f"more than max_len={BLOCK}" in line and "shorten the prompt" in line


def test_rlhf_script_reports_a_typo_in_one_line(parent, demo_file, tmp_path):
    proc = run_script("rlhf.py", "sft", parent, "--data", demo_file, "--run-dir", tmp_path / "r", "epochz=2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "unknown key 'epochz'; did you mean 'epochs'" in line


def test_a_builtin_set_keeps_the_demonstrations_that_fit_whole(parent, demo_file):
    """A built-in set is cut from a corpus for any context: what does not fit whole (end-of-text included) is left
    out, so nothing is truncated; a file keeps its records (and truncates or refuses them)."""
    from gptjax import config as config_lib
    from gptjax.data import load_tokenizer
    from gptjax.errors import DataError
    from gptjax.rlhf.config import BUILTIN, SFTConfig

    tok = load_tokenizer(parent)
    demos = sft_lib.read_demos(demo_file)
    kept = sft_lib.fitting(tok, demos, 24)
    assert 0 < len(kept) < len(demos)
    assert all(len(tok.encode(d.prompt)) + len(tok.encode(d.response)) + 1 <= 25 for d in kept)
    records = [{"prompt": d.prompt, "response": d.response} for d in demos]
    parent_cfg = config_lib.load_json(parent / "config.json")
    with pytest.MonkeyPatch.context() as m:
        m.setitem(BUILTIN, "tiny-set", lambda data_cfg, seed: (records[:100], records[100:]))
        p = sft_lib.prepare(SFTConfig(init_from=str(parent), data="tiny-set", max_len=40), parent_cfg, tok)
        assert len(p.train) == len(sft_lib.fitting(tok, demos[:100], 40)) < 100
        assert not any(e.truncated for e in p.train + p.val)
        with pytest.raises(DataError, match="no demonstration of the built-in set 'tiny-set' fits max_len=4"):
            sft_lib.prepare(SFTConfig(init_from=str(parent), data="tiny-set", max_len=4), parent_cfg, tok)
