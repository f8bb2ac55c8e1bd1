"""GPT-1 fine-tuning: the head reads only the extract position, similarity is symmetric, multiple choice does not
care about the order of its choices, λ = 0 is the task loss alone and the LM term is the pretraining loss; a
fine-tuning run on 8 devices equals one on 1 device, a killed run resumes exactly, the command line works end
to end (and eval.py reads the result), and bad input is one line."""

from __future__ import annotations

import dataclasses
import functools
import json
import random
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import finished_steps, read_losses, run_main, run_script, run_then_kill
from gptjax.finetune import stage as ft
from gptjax.finetune import transform
from gptjax.finetune.config import resolve
from gptjax.finetune.task import Example, FinetuneTask

STEPS = 12


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tiny_overrides, prepared) -> Path:
    from gptjax import config
    from gptjax.train.pretrain import pretrain

    run = tmp_path_factory.mktemp("ft-parent") / "run"
    pretrain(config.resolve("tiny", tiny_overrides + ["steps=6", f"run_dir={run}"]), log=lambda *_: None)
    return run


@pytest.fixture(scope="module")
def task_files(tmp_path_factory, corpus_dir) -> tuple[Path, Path]:
    """An SST-2-shaped file made here: does a line of code mention `self`?"""
    lines = [ln.strip() for p in sorted(corpus_dir.glob("*.py"))[:6] for ln in p.read_text().splitlines()
             if 12 < len(ln.strip()) < 60]
    random.Random(0).shuffle(lines)
    recs = [{"sentence": ln, "label": int("self" in ln)} for ln in lines[:360]]
    d = tmp_path_factory.mktemp("ft-task")
    (d / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[:280]))
    (d / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs[280:]))
    return d / "train.jsonl", d / "dev.jsonl"


# the settings of the command-line runs (and of the 8-device run compared with one of them)
SETTINGS = [f"steps={STEPS}", "batch_size=8", "eval_batch_size=8", "optim.lr=1e-3", "checkpoint.every=4", "log_every=2"]


def ft_args(parent: Path, files, run_dir: Path, *extra) -> list[str]:
    return [str(parent), "--task", str(files[0]), "--val", str(files[1]), "--run-dir", str(run_dir), *SETTINGS,
            *extra]


@pytest.fixture(scope="module")
def prep(parent, task_files):
    cfg = resolve([f"init_from={parent}", f"task={task_files[0]}", f"val={task_files[1]}", "run_dir=/nonexistent"])
    return ft.prepare(cfg, devices=jax.devices()[:1], log=lambda *_: None)


def _params(p, kind="classification", outputs=2):
    task = dataclasses.replace(p.task, kind=kind, labels=("a", "b") if outputs == 2 else ())
    return ft.starting_params(p.cfg, p.parent, p.mcfg, task, p.mesh, lambda *_: None)[0]


def test_head_sees_only_the_extract_position(prep):
    params = _params(prep)
    mcfg = prep.mcfg
    tokens = jnp.asarray(np.random.default_rng(0).integers(5, 400, (1, 1, 24)), jnp.int32)
    ext = 10
    extract, rows = jnp.asarray([[ext]]), jnp.ones((1, 1))

    def logit(offset, params):
        out, _ = ft.task_outputs(mcfg, "classification", params, tokens, extract, rows, offset_NTD=offset)
        return out[0, 1] - out[0, 0]

    # compiled: one program instead of hundreds of op-by-op ones (the same functions, the same numbers)
    g = jax.jit(jax.grad(logit))(jnp.zeros((1, 24, mcfg.d_model)), params)
    assert np.all(np.asarray(g[0, ext + 1:]) == 0.0)  # exactly zero after the extract token
    assert np.abs(np.asarray(g[0, :ext + 1])).sum() > 0
    changed = tokens.at[0, 0, ext + 1:].set(7)
    outputs = jax.jit(functools.partial(ft.task_outputs, mcfg, "classification"))
    a = outputs(params, tokens, extract, rows)[0]
    b = outputs(params, changed, extract, rows)[0]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_similarity_is_symmetric_in_its_two_inputs(prep):
    params = _params(prep, "similarity")
    task = FinetuneTask("s", "similarity", [], [], labels=("no", "yes"))
    tok = prep.parent.tokenizer
    ab = transform.encode(task, [Example(("def f(x):", "return x + 1"), 0)], tok, prep.ids, 32, length=32)
    ba = transform.encode(task, [Example(("return x + 1", "def f(x):"), 0)], tok, prep.ids, 32, length=32)
    outputs = jax.jit(functools.partial(ft.task_outputs, prep.mcfg, "similarity"))  # compiled, not op by op
    out = [np.asarray(outputs(params, jnp.asarray(e.tokens), jnp.asarray(e.extract), jnp.asarray(e.rows))[0])
           for e in (ab, ba)]
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6, atol=1e-6)
    assert not np.array_equal(ab.tokens[0, 0], ba.tokens[0, 0])  # the rows did differ


def test_multiple_choice_is_invariant_to_the_order_of_the_choices(prep):
    params = _params(prep, "multiple_choice", outputs=1)
    task = FinetuneTask("m", "multiple_choice", [], [])
    tok = prep.parent.tokenizer
    choices = ("return 1", "pass", "raise KeyError", "yield x")
    perm = (2, 0, 3, 1)
    a = transform.encode(task, [Example(("def f():", ""), 0, choices)], tok, prep.ids, 32, length=32)
    b = transform.encode(task, [Example(("def f():", ""), 1, tuple(choices[i] for i in perm))], tok, prep.ids, 32,
                         length=32)
    outputs = jax.jit(functools.partial(ft.task_outputs, prep.mcfg, "multiple_choice"))  # compiled, not op by op
    la, lb = (np.asarray(outputs(params, jnp.asarray(e.tokens), jnp.asarray(e.extract), jnp.asarray(e.rows))[0][0])
              for e in (a, b))
    np.testing.assert_allclose(lb, la[list(perm)], rtol=1e-6, atol=1e-6)
    # and so is the loss of the gold choice (index 0 in a, 1 in b)
    loss = [float(ft.task_loss("multiple_choice", False, jnp.asarray(x)[None], jnp.asarray([g]))) for x, g in
            ((la, 0), (lb, 1))]
    assert loss[0] == pytest.approx(loss[1], abs=1e-6)


def test_lambda_zero_is_the_task_loss_and_the_lm_term_is_the_pretraining_loss(prep):
    from gptjax.train.steps import token_nats

    params = _params(prep)
    enc = prep.train
    batch = [jnp.asarray(a[:4]) for a in (enc.tokens, enc.extract, enc.rows, enc.labels)]

    @jax.jit  # compiled, as in training, rather than op by op
    def outputs_and_lm_loss(params, tokens, extract, rows):
        out, h = ft.task_outputs(prep.mcfg, "classification", params, tokens, extract, rows)
        return out, ft.lm_loss(prep.mcfg, params, h, tokens, extract, rows)

    out, l1 = outputs_and_lm_loss(params, *batch[:3])
    l1 = float(l1)
    # the same tokens through the pretraining loss: each row up to its extract token
    pretraining_nats = jax.jit(functools.partial(token_nats, prep.mcfg))
    nats = []
    for i in range(4):
        row = enc.tokens[i, 0, :enc.extract[i, 0] + 1]
        nats += list(np.asarray(pretraining_nats(params, jnp.asarray(row)[None]))[0])
    assert l1 == pytest.approx(float(np.mean(nats)), rel=1e-5)
    l2 = float(ft.task_loss("classification", False, out, batch[3]))
    cfg0 = dataclasses.replace(prep.cfg, lm_coef=0.0, clf_pdrop=0.0, dropout=0.0)
    p0 = dataclasses.replace(prep, cfg=cfg0, mcfg=dataclasses.replace(prep.mcfg, embd_pdrop=0.0, attn_pdrop=0.0,
                                                                      resid_pdrop=0.0))
    c = ft.compile_stage(p0, 10)
    state = c.init_state(params)
    _, m = c.step(state, tuple(batch))
    assert float(m["loss"]) == pytest.approx(l2, rel=1e-5) and float(m["task_loss"]) == pytest.approx(l2, rel=1e-5)
    assert float(m["lm_loss"]) == pytest.approx(l1, rel=1e-5)


def test_truncation_keeps_the_protected_segment_and_refuses_what_cannot_fit(prep):
    from gptjax.errors import TaskError

    tok, ids = prep.parent.tokenizer, prep.ids
    task = FinetuneTask("e", "entailment", [], [], labels=("a", "b"))
    long_premise = "x = 1\n" * 200
    (row,) = transform.example_rows(task, Example((long_premise, "y = 2"), 0), tok, ids, 32)
    h = tok.encode("y = 2")
    assert len(row) == 32 and row[-1] == ids.extract and row[-2 - len(h):-1] == [ids.delim] + h
    with pytest.raises(TaskError, match="does not fit"):
        transform.example_rows(task, Example(("a", "z = 3\n" * 100), 0), tok, ids, 32)


def test_batches_are_a_pure_function_of_seed_and_step_and_walk_epochs():
    a = ft.batch_indices(0, 5, 8, 20)
    np.testing.assert_array_equal(a, ft.batch_indices(0, 5, 8, 20))
    epoch0 = np.concatenate([ft.batch_indices(0, s, 4, 20) for s in range(5)])
    assert sorted(epoch0) == list(range(20))  # every example once per epoch


def test_eight_devices_equal_one_device(cli_runs, parent, task_files, tmp_path):
    """The 1-device run is run A of `cli_runs` (finetune.py, in a process with one device); the same settings
    fine-tuned here on 8 devices, fsdp across all of them, give the same loss at every step."""
    out = {1: read_losses(cli_runs["a"])}
    cfg = resolve([f"init_from={parent}", f"task={task_files[0]}", f"val={task_files[1]}", f"run_dir={tmp_path / '8'}",
                   *SETTINGS, "mesh.fsdp=-1"])
    ft.finetune(cfg, devices=jax.devices()[:8], log=lambda *_: None)
    out[8] = read_losses(tmp_path / "8")
    settings = [{k: v for k, v in json.loads((d / "config.json").read_text()).items() if k != "run_dir"}
                for d in (cli_runs["a"], tmp_path / "8")]
    assert settings[0] == settings[1]  # the same run, but for its directory
    assert sorted(out[1]) == sorted(out[8]) == list(range(1, STEPS + 1))
    for s in out[1]:
        assert out[8][s] == pytest.approx(out[1][s], rel=2e-5), s


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, parent, task_files):
    """Run A uninterrupted through finetune.py; run B the same, killed by SIGKILL after its first checkpoint and
    rerun (B after A: it finds A's programs in the compilation cache)."""
    root = tmp_path_factory.mktemp("ft-cli")
    a, b = root / "a", root / "b"
    proc_a, out_a, _, _ = run_then_kill("finetune.py", ft_args(parent, task_files, a), ft_args(parent, task_files, b),
                                        b, root / "b.log")
    assert proc_a.returncode == 0, out_a[-4000:]
    assert not (b / "summary.json").exists() and max(finished_steps(b)) < STEPS
    resumed = run_script("finetune.py", *ft_args(parent, task_files, b), timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"a": a, "b": b, "out_a": out_a, "resumed": resumed}


def test_killed_finetuning_run_resumes_exactly(cli_runs):
    a, b = cli_runs["a"], cli_runs["b"]
    assert "resuming from checkpoint at step" in cli_runs["resumed"].stdout
    assert read_losses(a) == read_losses(b) and sorted(read_losses(a)) == list(range(1, STEPS + 1))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["val_acc"] == sb["val_acc"] and sa["best"] == sb["best"]


def test_finetune_command_writes_a_run_that_eval_reads(cli_runs, parent, task_files):
    a = cli_runs["a"]
    out = cli_runs["out_a"]
    assert "fine-tuning train (classification)" in out and "baseline (majority class" in out
    summary = json.loads((a / "summary.json").read_text())
    info = json.loads((a / "finetune.json").read_text())
    assert info["labels"] == ["0", "1"] and info["kind"] == "classification"
    best = json.loads((a / "best.json").read_text())
    assert best == summary["best"] and best["metric"] == "acc" and (a / "best" / "checkpoints").is_dir()
    assert json.loads((a / "config.json").read_text())["lineage"][0]["run_dir"] == str(parent.absolute())
    # the task loss falls
    recs = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    task_losses = [r["task_loss"] for r in recs if "task_loss" in r]
    assert np.mean(task_losses[-4:]) < np.mean(task_losses[:4])
    proc = run_script("eval.py", a, "--json", a / "eval.json")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads((a / "eval.json").read_text())
    assert got["step"] == best["step"] and got["metrics"]["acc"] == pytest.approx(best["value"], abs=1e-9)


@pytest.mark.parametrize("extra, fragment", [
    (["--fields", "text=nope"], "nope"),
    (["max_len=3"], "max_len must be 0"),
    (["lm_coef=-1"], "lm_coef"),
    (["epochz=2"], "unknown key 'epochz'; did you mean 'epochs'"),
])
def test_bad_finetune_input_is_one_line(parent, task_files, tmp_path, extra, fragment):
    from gptjax.cli import finetune as finetune_cli

    proc = run_main(finetune_cli.main, *ft_args(parent, task_files, tmp_path / "r"), *extra)  # finetune.py, here
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert fragment in line


def test_a_label_outside_the_saved_vocabulary_is_refused(cli_runs, parent, task_files, tmp_path):
    bad = tmp_path / "dev.jsonl"
    bad.write_text(json.dumps({"sentence": "x = 1", "label": 7}) + "\n")
    from gptjax.cli import eval as eval_cli

    proc = run_main(eval_cli.main, cli_runs["a"], "--tasks", bad)  # eval.py, in this process: refused before it runs
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "7" in line and "vocabulary" in line


def test_zero_shot_thresholds_recover_a_separable_order():
    from gptjax.finetune.zeroshot import _fit_thresholds

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = np.asarray([2.0, 0.0, 1.0])[y] + 0.1 * rng.standard_normal(300)  # label 1 lowest, then 2, then 0
    order, cuts = _fit_thresholds(x, y, 3)
    assert order == (1, 2, 0) and len(cuts) == 2
    pred = np.asarray(order)[np.searchsorted(cuts, x)]
    assert (pred == y).mean() > 0.99


def test_zero_shot_multiple_choice_picks_the_highest_mean_log_probability(parent):
    from gptjax.eval.scoring import Scorer, load_run
    from gptjax.eval.tasks import encode_pair
    from gptjax.finetune.zeroshot import zero_shot

    run = load_run(parent)
    scorer = Scorer(run, batch_size=8, progress=False)
    tok = run.tokenizer
    items = [Example(("def add(a, b):", ""), 0, ("    return a + b", "    raise KeyError(name)", "    pass")),
             Example(("class Point:", ""), 2, ("    yield x", "  )]", "    def __init__(self, x, y):"))]
    task = FinetuneTask("mc", "multiple_choice", items, items)
    got = zero_shot(task, scorer, tok)
    want = []
    for e in items:
        means = []
        for c in e.choices:
            ctx, cont = encode_pair(tok, e.segments[0] + "\n", c)
            means.append(scorer.loglikelihood([(ctx, cont)])[0][0] / len(cont))
        want.append(int(np.argmax(means)))
    assert got["acc"] == pytest.approx(np.mean([w == e.label for w, e in zip(want, items)]))
    assert got["n"] == 2


def test_finetune_refuses_run_dirs_it_would_damage(cli_runs, parent, task_files, tmp_path):
    from gptjax.cli import finetune as finetune_cli
    from gptjax.cli import train as train_cli

    def line(*args):
        proc = run_main(finetune_cli.main, *args)  # finetune.py, in this process
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        (x,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        return x

    before = {p: p.read_bytes() for p in parent.rglob("*") if p.is_file() and p.name != ".lock"}
    assert "is the pretrained run itself" in line(*ft_args(parent, task_files, parent))
    other = tmp_path / "pretrained-copy"
    import shutil

    shutil.copytree(parent, other)
    assert "not a fine-tuning run" in line(*ft_args(parent, task_files, other))
    assert not (other / "finetune.json").exists()
    assert {p: p.read_bytes() for p in parent.rglob("*") if p.is_file() and p.name != ".lock"} == before
    # resuming a fine-tuning run with another identity setting
    a = cli_runs["a"]
    assert "with lm_coef=0.5, not 0.0" in line(*ft_args(parent, task_files, a), "lm_coef=0")
    # a fine-tuned run is not a language model to continue pretraining from
    proc = run_main(train_cli.main, f"init_from={a}", f"run_dir={tmp_path / 'c'}", "steps=2")  # train.py, here
    assert proc.returncode == 2 and "finetune run" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("variant", [
    ["model.norm=post", "model.final_norm=false", "model.scaled_resid_init=false"],  # GPT-1
    ["model.attention_pattern=dense,banded", "model.local_window=4"],  # GPT-3's alternating layers
])
def test_every_architecture_reads_only_the_extract_state(variant):
    from gptjax import config
    from gptjax.heads import init_task_head
    from gptjax.model import init_params

    mcfg = config.resolve("tiny", ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.block_size=16",
                                   "model.vocab_size=300"] + variant).model
    params = {**init_params(mcfg, jax.random.key(0)), "head": init_task_head(mcfg, 3, jax.random.key(1))}
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 300, (1, 1, 16)), jnp.int32)
    ext = 9

    def logit(offset, params):
        out, _ = ft.task_outputs(mcfg, "classification", params, tokens, jnp.asarray([[ext]]), jnp.ones((1, 1)),
                                 offset_NTD=offset)
        return out[0].sum()

    g = np.asarray(jax.jit(jax.grad(logit))(jnp.zeros((1, 16, mcfg.d_model)), params))  # compiled, not op by op
    assert np.all(g[0, ext + 1:] == 0.0) and np.abs(g[0, :ext + 1]).sum() > 0
    if "model.attention_pattern=dense,banded" in variant:  # the dense layer still sees the first position
        assert np.abs(g[0, 0]).sum() > 0
