"""Interrupted runs: a run killed with SIGKILL and resumed replays the uninterrupted one exactly; a
half-written checkpoint is skipped; a diverging run stops without touching its checkpoints; SIGTERM saves
and exits 143."""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import finished_steps, read_losses, read_metrics, run_and_kill, run_script, start_script, wait_for_checkpoint

from gptjax.checkpoint import Checkpoints

STEPS, EVERY = 40, 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_overrides, prepared):
    """Run A uninterrupted; run B, identical but for its directory, killed with SIGKILL just after its first
    checkpoint and then rerun to completion. Both start together (they share the compile cache)."""
    root = tmp_path_factory.mktemp("resume")
    a, b = root / "a", root / "b"
    args = tiny_overrides + [f"steps={STEPS}", f"checkpoint.every={EVERY}", "checkpoint.keep=2"]
    proc_a, out_a, proc_b, steps_at_kill = run_and_kill("train.py", args + [f"run_dir={a}"], args + [f"run_dir={b}"],
                                                        b, root / "b_first.log", timeout=240)
    assert proc_a.returncode == 0, out_a[-5000:]
    assert proc_b.returncode == -signal.SIGKILL
    assert not (b / "summary.json").exists() and max(steps_at_kill) < STEPS, "run B finished before the kill"
    killed_losses = read_losses(b)
    resumed = run_script("train.py", *args, f"run_dir={b}")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    return {"a": a, "b": b, "steps_at_kill": steps_at_kill, "killed_losses": killed_losses,
            "resumed": resumed, "args": args}


def test_killed_run_resumes_exactly(runs):
    a, b = runs["a"], runs["b"]
    start = max(runs["steps_at_kill"])
    assert f"resuming from checkpoint at step {start}" in runs["resumed"].stdout
    ma, mb = read_metrics(a), read_metrics(b)
    assert sorted(ma) == sorted(mb) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert mb[step]["loss"] == ma[step]["loss"], f"step {step}"
        assert mb[step]["grad_norm"] == ma[step]["grad_norm"], f"step {step}"
        assert mb[step]["lr"] == ma[step]["lr"], f"step {step}"
    # the steps B logged before it was killed were the same too
    assert runs["killed_losses"] and all(ma[s]["loss"] == v for s, v in runs["killed_losses"].items())
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["val_loss"] == sb["val_loss"]
    assert finished_steps(a) == finished_steps(b) == [STEPS - EVERY, STEPS]


def copy_run(src: Path, dst: Path, keep_through: int) -> Path:
    """A copy of a finished run as it was at step `keep_through`: later checkpoints and metrics removed."""
    shutil.copytree(src, dst)
    for p in (dst / "checkpoints").iterdir():
        if p.name.isdigit() and int(p.name) > keep_through:
            shutil.rmtree(p)
    lines = (dst / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if "loss" in json.loads(line) and json.loads(line)["step"] <= keep_through]
    (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    (dst / "summary.json").unlink()
    return dst


def test_half_written_checkpoint_is_skipped(runs, tmp_path):
    a = runs["a"]
    run = copy_run(a, tmp_path / "run", STEPS - EVERY)
    assert finished_steps(run) == [STEPS - EVERY]
    # what a save cut short leaves: orbax's temporary directory, holding some of the files
    junk = run / "checkpoints" / f"{STEPS}.orbax-checkpoint-tmp"
    shutil.copytree(a / "checkpoints" / str(STEPS), junk)
    (junk / "_CHECKPOINT_METADATA").unlink()
    for f in (junk / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0junk")
    proc = run_script("train.py", *runs["args"], f"run_dir={run}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "half-written" in proc.stdout and f"step {STEPS}" in proc.stdout
    assert f"resuming from checkpoint at step {STEPS - EVERY}" in proc.stdout
    assert not junk.exists()
    assert finished_steps(run) == [STEPS - EVERY, STEPS]
    # and the steps it redid are the uninterrupted run's steps
    want = read_losses(a)
    assert read_losses(run) == want


def test_non_finite_loss_stops_and_keeps_the_checkpoints(runs, tmp_path, trainer1):
    a = runs["a"]
    run = copy_run(a, tmp_path / "run", STEPS)
    proc = run_script("train.py", *runs["args"], f"run_dir={run}", f"steps={STEPS + 20}", "optim.lr=1e30",
                      "optim.warmup_steps=0")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "non-finite" in line or "loss became" in line
    assert f"(step {STEPS})" in line  # names the last good checkpoint
    assert finished_steps(run) == [STEPS - EVERY, STEPS]
    assert not (run / "summary.json").exists()
    # the checkpoints left behind are the good ones, byte for byte the same state
    abstract = trainer1.abstract_state()
    for step in (STEPS - EVERY, STEPS):
        got = Checkpoints(run, read_only=True, log=lambda _: None).restore(abstract, step)[1]
        want = Checkpoints(a, read_only=True, log=lambda _: None).restore(abstract, step)[1]
        assert int(got["step"]) == step
        for x, y in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(jax.device_get(want))):
            assert np.isfinite(x).all()
            np.testing.assert_array_equal(x, y)


def test_sigterm_saves_and_exits_143(tiny_overrides, prepared, tmp_path):
    run = tmp_path / "run"
    log_path = tmp_path / "log"
    with open(log_path, "w") as log:
        proc = start_script("train.py", *tiny_overrides, f"run_dir={run}", "steps=5000", "checkpoint.every=10",
                            stdout=log)
        try:
            wait_for_checkpoint(proc, run)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = log_path.read_text()
    assert rc == 143, out[-5000:]
    assert "Traceback" not in out
    (line,) = [x for x in out.splitlines() if "received signal" in x]
    stopped = int(line.split("saved a checkpoint at step ")[1].split()[0])
    assert 10 <= stopped < 5000
    assert max(finished_steps(run)) == stopped
    assert max(read_losses(run)) == stopped  # every step it took was logged
    # a rerun resumes from there
    assert f"{stopped}" in line and "rerun the same command to resume" in line
