"""Starting a run from another run's weights, and the run directory's guards: init_from reports the parent's
held-out loss at step 0 and records its lineage; a killed init_from run resumes exactly; overrides that would
change the parent's parameters, a tokenizer that changed under a run, and a second live job on one run_dir
are each refused with one line and leave the checkpoints as they were."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import finished_steps, read_losses, run_main, run_script, run_then_kill, start_script, wait_for_checkpoint
from gptjax import config as config_lib
from gptjax.cli import train as train_cli
from gptjax.errors import ConfigError, RunDirBusy
from gptjax.train.loop import RunDirLock

PARENT_STEPS, CHILD_STEPS, EVERY = 12, 16, 4
# what decides the parent's compiled train step (its schedule): a run with the same settings finds it compiled
PARENT_SETTINGS = [f"steps={PARENT_STEPS}", f"checkpoint.every={EVERY}"]


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    return line


def checkpoint_bytes(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted((run_dir / "checkpoints").rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tiny_overrides, prepared) -> Path:
    run = tmp_path_factory.mktemp("parent") / "run"
    proc = run_script("train.py", *tiny_overrides, *PARENT_SETTINGS, f"run_dir={run}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def children(tmp_path_factory, tiny_overrides, parent):
    """Child A from the parent, uninterrupted; child B the same, killed by SIGKILL after its first checkpoint
    and rerun to completion (B after A: it finds A's programs in the compilation cache)."""
    root = tmp_path_factory.mktemp("children")
    a, b = root / "a", root / "b"
    args = tiny_overrides + [f"init_from={parent}", f"steps={CHILD_STEPS}", f"checkpoint.every={EVERY}",
                             "optim.lr=1e-3", "optim.warmup_steps=3"]
    proc_a, out_a, proc_b, _ = run_then_kill("train.py", args + [f"run_dir={a}"], args + [f"run_dir={b}"], b,
                                             root / "b.log", timeout=240)
    assert proc_a.returncode == 0, out_a[-5000:]
    assert not (b / "summary.json").exists() and max(finished_steps(b)) < CHILD_STEPS
    killed = read_losses(b)
    resumed = run_script("train.py", *args, f"run_dir={b}")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {"a": a, "b": b, "out_a": out_a, "killed": killed, "resumed": resumed, "args": args}


def test_init_from_starts_at_the_parents_held_out_loss_with_a_fresh_optimizer(parent, children):
    a = children["a"]
    parent_summary = json.loads((parent / "summary.json").read_text())
    records = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and "loss" not in records[0]  # evaluated before any update
    assert records[0]["val_loss"] == pytest.approx(parent_summary["val_loss"], abs=1e-6)
    assert "held-out loss" in children["out_a"] and f"step {PARENT_STEPS}" in children["out_a"]
    # a fresh schedule: the child's first step runs at its own warmup's first learning rate, not the parent's
    child_cfg = config_lib.load_json(a / "config.json")
    from gptjax.optim import schedule
    assert records[1]["step"] == 1 and records[1]["lr"] == pytest.approx(float(schedule(child_cfg.optim, CHILD_STEPS)(0)))
    assert sorted(read_losses(a)) == list(range(1, CHILD_STEPS + 1))
    # the model and the tokenizer came from the parent
    assert (a / "tokenizer.model").read_bytes() == (parent / "tokenizer.model").read_bytes()
    assert child_cfg.model == config_lib.load_json(parent / "config.json").model


def test_lineage_names_the_parent_step_and_a_hash_of_its_parameters(parent, children):
    import jax

    from gptjax.checkpoint import Checkpoints
    from gptjax.sharding import make_mesh
    from gptjax.train.lineage import params_fingerprint
    from gptjax.train.steps import make_train_steps

    (entry,) = json.loads((children["a"] / "config.json").read_text())["lineage"]
    assert entry["run_dir"] == str(parent.absolute()) and entry["step"] == PARENT_STEPS
    cfg = config_lib.load_json(parent / "config.json")
    steps = make_train_steps(cfg, make_mesh(cfg.mesh, devices=jax.devices()[:1]))
    ckpts = Checkpoints(parent, read_only=True, log=lambda _: None)
    _, state = ckpts.restore(steps.abstract_state(), PARENT_STEPS)
    assert entry["params_fingerprint"] == params_fingerprint(state["params"])
    # the fingerprint sees a change in any parameter
    bumped = jax.tree.map(lambda x: x, state["params"])
    bumped["ln_f"]["bias"] = bumped["ln_f"]["bias"].at[0].add(1e-3)
    assert params_fingerprint(bumped) != entry["params_fingerprint"]
    # the checkpoints carry the lineage too
    child = Checkpoints(children["a"], read_only=True, log=lambda _: None)
    assert child.config(CHILD_STEPS)["lineage"] == [entry]


def test_killed_init_from_run_resumes_exactly(children):
    a, b = children["a"], children["b"]
    assert "resuming from checkpoint at step" in children["resumed"].stdout
    la, lb = read_losses(a), read_losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, CHILD_STEPS + 1))
    assert la == lb
    assert children["killed"] and all(la[s] == v for s, v in children["killed"].items())
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["val_loss"] == sb["val_loss"]
    assert json.loads((a / "config.json").read_text())["lineage"] == json.loads((b / "config.json").read_text())["lineage"]


@pytest.mark.parametrize("override, key", [("model.n_layer=3", "model.n_layer"), ("model.d_model=32", "model.d_model"),
                                           ("model.block_size=64", "model.block_size"),
                                           ("model.vocab_size=1024", "model.vocab_size")])
def test_shape_changing_override_with_init_from_is_one_line(parent, children, override, key):
    b = children["b"]
    before = checkpoint_bytes(b)
    line = error_line(run_main(train_cli.main, *children["args"], f"run_dir={b}", f"steps={CHILD_STEPS + 4}",
                               override))  # train.py, in this process
    assert f"{override} cannot be used with init_from" in line and "parent has" in line
    assert checkpoint_bytes(b) == before


def test_init_from_config_rules(parent, tiny_overrides):
    # dropout and compute settings may change; the run dir may not be the parent's own
    cfg = config_lib.resolve("tiny", [f"init_from={parent}", "model.resid_pdrop=0.1", "model.remat=full",
                                      f"run_dir={parent.parent / 'x'}"])
    assert cfg.model.resid_pdrop == 0.1 and cfg.model.d_model == 64 and cfg.model.vocab_size == 512
    with pytest.raises(ConfigError, match="names the run directory itself"):
        config_lib.resolve("tiny", [f"init_from={parent}", f"run_dir={parent}"])
    with pytest.raises(ConfigError, match="holds no config.json"):
        config_lib.resolve("tiny", [f"init_from={parent / 'nope'}", "run_dir=x"])
    assert config_lib.split_init_from(f"{parent}@8") == (str(parent), 8)


def test_init_from_a_missing_step_is_one_line(parent, tiny_overrides, tmp_path):
    line = error_line(run_main(train_cli.main, *tiny_overrides, f"init_from={parent}@7", f"run_dir={tmp_path / 'c'}",
                               "steps=2"))  # train.py, in this process
    assert "init_from=" in line and "no checkpoint for step 7" in line


def test_resume_after_the_corpus_changed_its_tokenizer_is_refused(tmp_path, tiny_overrides, corpus_dir):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    run = tmp_path / "run"
    args = [o for o in tiny_overrides if not o.startswith(("data.paths", "data.cache_dir"))] + [
        f"data.paths={corpus}/*.py", f"data.cache_dir={tmp_path / 'cache'}", f"run_dir={run}"]
    # the parent's settings: its train step is in the compilation cache already
    first = run_script("train.py", *args, *PARENT_SETTINGS)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = finished_steps(run)
    assert saved and saved[-1] == PARENT_STEPS
    tokenizer_before = (run / "tokenizer.model").read_bytes()
    before = checkpoint_bytes(run)
    shutil.copyfile(Path(json.__file__).parent / "decoder.py", corpus / "zz_new.py")  # the corpus changes
    for f in sorted(corpus.glob("0*.py"))[:4]:
        f.unlink()
    # train.py (in this process: refused before any device work) asked to train on
    line = error_line(run_main(train_cli.main, *args, f"checkpoint.every={EVERY}", f"steps={PARENT_STEPS + 4}"))
    assert "trained with another tokenizer" in line and f"init_from={run}" in line
    assert checkpoint_bytes(run) == before and finished_steps(run) == saved
    assert (run / "tokenizer.model").read_bytes() == tokenizer_before


def test_second_live_job_on_a_run_dir_is_refused(tmp_path, tiny_overrides, prepared):
    run = tmp_path / "run"
    args = tiny_overrides + [f"run_dir={run}", "checkpoint.every=5"]
    first = start_script("train.py", *args, "steps=100000")
    try:
        wait_for_checkpoint(first, run)
        second = run_main(train_cli.main, *args, "steps=100000")  # train.py, in this process
        line = error_line(second)
        assert f"{run} is in use by another training job (pid {first.pid}" in line
        assert first.poll() is None  # the first job goes on
        assert "half-written" not in second.stdout
    finally:
        first.send_signal(signal.SIGTERM)
        rc = first.wait(120)
    assert rc == 143
    assert max(finished_steps(run)) == max(read_losses(run))  # its last save completed


def test_run_dir_lock_is_exclusive_and_released(tmp_path):
    lock = RunDirLock(tmp_path / "run")
    with pytest.raises(RunDirBusy, match=r"in use by another training job \(pid \d+"):
        RunDirLock(tmp_path / "run")
    lock.release()
    RunDirLock(tmp_path / "run").release()  # free again


def test_init_from_needs_its_own_run_dir_and_a_child_resumes_after_its_parent_moved(parent, children, tmp_path,
                                                                                    tiny_overrides):
    with pytest.raises(ConfigError, match="give it its own run_dir"):
        config_lib.resolve("tiny", [f"init_from={parent}"])
    # the child needs nothing of its parent to resume: move the parent away and resume a copy of child A from its
    # next-to-last checkpoint, as if killed after it (with A's own settings: its train step is compiled already)
    moved = tmp_path / "moved"
    child = tmp_path / "child"
    shutil.copytree(children["a"], child)
    *_, resume_at, last = finished_steps(child)
    shutil.rmtree(child / "checkpoints" / str(last))
    (child / "summary.json").unlink()
    metrics = child / "metrics.jsonl"
    metrics.write_text("".join(line + "\n" for line in metrics.read_text().splitlines()
                               if json.loads(line)["step"] <= resume_at))
    shutil.move(str(parent), str(moved))
    try:
        proc = run_script("train.py", *children["args"], f"run_dir={child}")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert f"resuming from checkpoint at step {resume_at}" in proc.stdout
        assert max(read_losses(child)) == CHILD_STEPS and (child / "summary.json").exists()
        assert read_losses(child) == read_losses(children["a"])  # the steps after the checkpoint, trained again
    finally:
        shutil.move(str(moved), str(parent))
