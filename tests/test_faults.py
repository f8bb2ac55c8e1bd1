"""Faults a long run meets, and what it must do: an unreadable latest checkpoint is passed over in one line (and
set aside, never deleted, so its step can be saved again); a full disk during a save stops the run in one line
with the earlier checkpoints intact; and SIGKILL at random points (starting up, during a step, during an
asynchronous save, during the final evaluation) never costs more than a rerun: the resumed run ends with the
uninterrupted run's losses exactly."""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
from conftest import finished_steps, read_losses, read_metrics, run_script, start_script

from gptjax import config as config_lib
from gptjax.checkpoint import CORRUPT_DIR, Checkpoints
from gptjax.errors import CheckpointError
from gptjax.train import loop

# 24 steps: more than the kill test's few kills can get through before it aims one at the final evaluation (each
# rerun gets a checkpoint or two further before it is killed), and 16 fewer steps for every run that trains them all
STEPS, EVERY, KEEP = 24, 2, 3
FAULT_MODEL = ["model.n_layer=1"]  # the smallest model: restarts and steps cost as little as they can


def one_line(proc) -> str:
    """The one 'error:' line of a failed command, checking that nothing else (no traceback) was printed."""
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    return line


@pytest.fixture(scope="module")
def args(tiny_overrides):
    return tiny_overrides + FAULT_MODEL + [f"steps={STEPS}", f"checkpoint.every={EVERY}", f"checkpoint.keep={KEEP}"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, args, prepared) -> dict:
    """The uninterrupted run, timed by phase from its output (the kill test scales its delays by these)."""
    run_dir = tmp_path_factory.mktemp("faults") / "reference"
    child = Child(args + [f"run_dir={run_dir}"], run_dir)
    assert child.wait_for("first_step", 300) and child.wait_for("evaluating", 300), child.text()[-5000:]
    rc = child.wait(300)
    assert rc == 0, child.text()[-5000:]
    m = child.marks
    return {"run_dir": run_dir, "losses": read_losses(run_dir), "summary": summary(run_dir),
            "to_training": m["training"] - child.t0, "step_s": (m["evaluating"] - m["first_step"]) / STEPS,
            "eval_s": child.t_exit - m["evaluating"]}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def training_records(run_dir: Path) -> dict[int, dict]:
    """step -> loss, lr and grad norm of its last training record (conftest.read_metrics)."""
    return {step: {k: rec[k] for k in ("loss", "lr", "grad_norm")} for step, rec in read_metrics(run_dir).items()}


# ----------------------------------------------------------------------------------------------
# An unreadable latest checkpoint


def corrupt(step_dir: Path) -> Path:
    """Overwrite the largest array file of a checkpoint's parameters with garbage, as a disk fault would."""
    victim = max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    victim.write_bytes(b"garbage " * 64)
    return victim


@pytest.fixture(scope="module")
def corrupted(reference, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("corrupted") / "run"
    shutil.copytree(reference["run_dir"], run_dir)
    corrupt(run_dir / "checkpoints" / str(STEPS))
    return run_dir


def test_eval_passes_over_an_unreadable_latest_checkpoint_in_one_line(corrupted):
    proc = run_script("eval.py", corrupted)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    lines = [x for x in out.splitlines() if "cannot be read" in x]
    assert len(lines) == 1 and f"checkpoint step {STEPS} in " in lines[0], out[-3000:]
    assert lines[0].endswith(f"using step {STEPS - EVERY}") and len(lines[0]) < 500
    assert f"val @ step {STEPS - EVERY}:" in proc.stdout
    # no TensorStore spec dumps, asyncio tracebacks or 'Event loop is closed'
    assert "Traceback" not in out and "TensorStore" not in out and "Event loop" not in out, out[-3000:]
    assert finished_steps(corrupted) == [STEPS - 2 * EVERY, STEPS - EVERY, STEPS]  # eval moves nothing


def test_eval_of_an_unreadable_step_asked_for_by_number_fails_in_one_line(corrupted):
    proc = run_script("eval.py", corrupted, "--step", STEPS)
    assert proc.returncode == 2
    line = one_line(proc)
    assert f"checkpoint step {STEPS} in " in line and "cannot be read" in line and "using step" not in line
    assert f"choose another of its steps ([{STEPS - 2 * EVERY}, {STEPS - EVERY}])" in line
    assert "TensorStore" not in proc.stderr and len(line) < 500


@pytest.fixture(scope="module")
def abstract(args, mesh1):
    """The training state of the fault tests' model, abstract, on one device."""
    from gptjax.train.steps import make_train_steps

    return make_train_steps(config_lib.resolve("tiny", args + ["run_dir=/nonexistent"]), mesh1).abstract_state()


def test_no_readable_checkpoint_is_one_error(corrupted, tmp_path, abstract):
    run_dir = tmp_path / "run"
    shutil.copytree(corrupted, run_dir)
    for step in finished_steps(run_dir):
        corrupt(run_dir / "checkpoints" / str(step))
    for read_only in (True, False):
        ckpts = Checkpoints(run_dir, read_only=read_only, log=pytest.fail)
        with pytest.raises(CheckpointError, match="no checkpoint in .* can be read") as e:
            ckpts.restore(abstract)
        assert f"step {STEPS}: " in str(e.value) and "TensorStore" not in str(e.value)
        ckpts.close()
    # nothing was moved: with no step to resume from, the user decides
    assert finished_steps(run_dir) == [STEPS - 2 * EVERY, STEPS - EVERY, STEPS]
    assert not (run_dir / "checkpoints" / CORRUPT_DIR).exists()


def test_training_resumes_past_an_unreadable_checkpoint_and_saves_its_step_again(corrupted, reference, args,
                                                                                  tmp_path, abstract):
    run_dir = tmp_path / "run"
    shutil.copytree(corrupted, run_dir)
    (run_dir / "summary.json").unlink()
    last = run_dir / "checkpoints" / str(STEPS)
    bad = {p.relative_to(last): p.read_bytes() for p in last.rglob("*") if p.is_file()}
    proc = run_script("train.py", *args, f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout + proc.stderr
    (line,) = [x for x in out.splitlines() if "cannot be read" in x]
    assert f"checkpoint step {STEPS} in " in line and f"/{CORRUPT_DIR}/{STEPS}-" in line
    assert line.endswith(f"using step {STEPS - EVERY}")
    assert f"resuming from checkpoint at step {STEPS - EVERY}" in proc.stdout
    assert "Traceback" not in out and "TensorStore" not in out and "Event loop" not in out, out[-3000:]
    # step 40 saved afresh; the unreadable one kept whole beside the checkpoints, out of Orbax's sight
    assert finished_steps(run_dir) == [STEPS - 2 * EVERY, STEPS - EVERY, STEPS]
    (aside,) = (run_dir / "checkpoints" / CORRUPT_DIR).iterdir()
    assert aside.name.startswith(f"{STEPS}-")
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == bad
    assert read_losses(run_dir) == reference["losses"]
    assert summary(run_dir)["val_loss"] == reference["summary"]["val_loss"]
    # and the new step 40 reads, byte for byte the uninterrupted run's
    got = Checkpoints(run_dir, read_only=True, log=pytest.fail).restore(abstract, STEPS)[1]
    want = Checkpoints(reference["run_dir"], read_only=True, log=pytest.fail).restore(abstract, STEPS)[1]
    for x, y in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(jax.device_get(want))):
        assert x.tobytes() == y.tobytes()


# ----------------------------------------------------------------------------------------------
# A full disk during a save, in process: a toy stage through the real loop and the real Orbax saves


def toy_stage(steps: int) -> loop.Stage:
    def step_fn(state, batch):
        w = state["params"]["w"] * 0.5 + batch
        m = state["opt_state"]["m"] + w
        return ({"params": {"w": w}, "opt_state": {"m": m}, "step": state["step"] + 1},
                {"loss": jnp.sum(w), "lr": jnp.float32(1e-3), "grad_norm": jnp.sum(m)})

    return loop.Stage(steps=steps, step_fn=step_fn, batch=lambda step: jnp.full((8,), float(step), jnp.float32),
                      all_finite=lambda p: jnp.isfinite(p["w"]).all(), tokens_per_step=8, checkpoint_every=1)


def toy_fresh():
    return {"params": {"w": jnp.arange(8, dtype=jnp.float32)}, "opt_state": {"m": jnp.zeros((8,), jnp.float32)},
            "step": jnp.int32(0)}


def toy_abstract():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), toy_fresh())


def toy_state_after(step: int) -> dict:
    stage, state = toy_stage(step), toy_fresh()
    for s in range(step):
        state, _ = stage.step_fn(state, stage.batch(s))
    return jax.device_get(state)


def train_toy(run_dir: Path, steps: int, log) -> loop.LoopResult:
    ckpts = Checkpoints(run_dir, keep=10, log=log)
    metrics = loop.MetricsLog(run_dir / "metrics.jsonl", True)
    try:
        return loop.run(toy_stage(steps), ckpts, metrics, fresh_state=toy_fresh, abstract_state=toy_abstract, log=log)
    finally:
        metrics.close()


class _FailedCommit:
    """A commit future that fails the way a write to a full disk does."""

    def result(self, timeout=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def cancel(self):
        pass


@pytest.mark.parametrize("when", ["blocking", "background"])
def test_full_disk_during_a_save_stops_in_one_line_and_keeps_the_checkpoints(tmp_path, monkeypatch, caplog, when):
    """`blocking`: the write fails inside save(); `background`: in Orbax's commit thread, surfacing at the next
    save or at the final wait. Either way: one CheckpointError line naming the fix and the step a rerun resumes
    from, the earlier checkpoints untouched, and the rerun finishing as if nothing had happened."""
    run_dir, fail_at, lines = tmp_path / "run", 3, []
    run_dir.mkdir()
    original = ocp.StandardCheckpointHandler.async_save

    async def async_save(self, directory, *a, **kw):
        item = kw["args"].item if "args" in kw else a[0].item
        if isinstance(item, dict) and "step" in item and int(item["step"]) == fail_at:
            if when == "blocking":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return list(await original(self, directory, *a, **kw) or []) + [_FailedCommit()]
        return await original(self, directory, *a, **kw)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", async_save)
    for steps in (5, fail_at):  # fail mid-run (surfacing at the next save) and at the last step (the final wait)
        shutil.rmtree(run_dir)
        run_dir.mkdir()
        caplog.clear()
        with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError) as e:
            train_toy(run_dir, steps, lines.append)
        msg = str(e.value)
        assert msg.startswith(f"saving checkpoint step {fail_at} in {run_dir.absolute() / 'checkpoints'} failed: "
                              f"no space left on device; free space there and rerun"), msg
        assert msg.endswith(f"resume from step {fail_at - 1}, the last complete checkpoint") and "\n" not in msg
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "Orbax's tracebacks were shown"
        assert finished_steps(run_dir) == [1, 2]
        left = [p.name for p in (run_dir / "checkpoints").iterdir() if not p.name.isdigit()]
        assert all(re.match(rf"^{fail_at}\.orbax-checkpoint-tmp", n) for n in left), left
        # the earlier checkpoints restore byte for byte
        for step in (1, 2):
            got = Checkpoints(run_dir, read_only=True, log=pytest.fail).restore(toy_abstract(), step)[1]
            for x, y in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(toy_state_after(step))):
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    monkeypatch.undo()
    # space freed: the rerun sweeps the half-written save and resumes from the last complete step
    lines.clear()
    result = train_toy(run_dir, 5, lines.append)
    assert result.start == 2 and f"resuming from checkpoint at step {fail_at - 1}" in lines
    assert finished_steps(run_dir) == [1, 2, 3, 4, 5]
    for x, y in zip(jax.tree.leaves(jax.device_get(result.state)), jax.tree.leaves(toy_state_after(5))):
        assert x.tobytes() == y.tobytes()


# ----------------------------------------------------------------------------------------------
# SIGKILL at many random points


class Child:
    """train.py in a subprocess, its output read as it comes and the moments of its landmarks noted:
    training (its progress bar appears: restored and about to compile), first_step (the first metrics line this
    run writes), save (a save this run began, after its first, is in progress), evaluating (the held-out
    evaluation after the last step has begun)."""

    OUTPUT_MARKS = (("training", b"training:"), ("evaluating", b"evaluating:"))

    def __init__(self, argv: list, run_dir: Path):
        self.run_dir, self.out, self.marks, self.t_exit = run_dir, bytearray(), {}, None
        self.before = finished_steps(run_dir)  # the complete checkpoints it starts from
        self.tmp_before = tmp_dirs(run_dir)
        self.metrics_at_start = metrics_size(run_dir)
        self.t0 = time.monotonic()
        self.proc = start_script("train.py", *argv, stdout=subprocess.PIPE)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 1 << 16):
            now = time.monotonic()
            self.out += chunk
            for name, mark in self.OUTPUT_MARKS:
                if name not in self.marks and mark in self.out:
                    self.marks[name] = now

    def _look(self) -> None:
        now = time.monotonic()
        if "first_step" not in self.marks and metrics_size(self.run_dir) > self.metrics_at_start:
            self.marks["first_step"] = now
        if "save" not in self.marks and "first_step" in self.marks:
            first = (self.before[-1] if self.before else 0) + EVERY
            if any(int(n.split(".")[0]) > first for n in tmp_dirs(self.run_dir) - self.tmp_before):
                self.marks["save"] = now

    def wait_for(self, name: str, timeout: float) -> bool:
        """Until landmark `name`; False if the run exited first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            self._look()
            if name in self.marks:
                return True
            time.sleep(0.003)
        return False

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout)
        self.t_exit = time.monotonic()
        self.reader.join(10)
        return rc

    def kill(self) -> bool:
        """SIGKILL now; False if the run had already exited by itself."""
        if self.proc.poll() is not None:
            return False
        self.proc.send_signal(signal.SIGKILL)
        return True

    def text(self) -> str:
        return self.out.decode(errors="replace")


def metrics_size(run_dir: Path) -> int:
    try:
        return (run_dir / "metrics.jsonl").stat().st_size
    except FileNotFoundError:
        return 0


def tmp_dirs(run_dir: Path) -> set[str]:
    try:
        return {p.name for p in (run_dir / "checkpoints").iterdir() if ".orbax-checkpoint-tmp" in p.name}
    except FileNotFoundError:
        return set()


def landed(child: Child) -> str:
    """Roughly where a kill landed, from the run directory and what the run had printed."""
    if STEPS in child.before:  # nothing left to train: the rerun restores and evaluates
        return "final evaluation" if "training" in child.marks else "before the first step"
    if STEPS in finished_steps(child.run_dir):
        return "final evaluation"  # the last save is waited for before the held-out evaluation begins
    if metrics_size(child.run_dir) == child.metrics_at_start:
        return "before the first step"  # starting up, restoring, compiling, or within this run's first step
    return "during a save" if tmp_dirs(child.run_dir) - child.tmp_before else "between steps"


def check_resumed(child: Child) -> None:
    """A rerun that got as far as restoring resumed from the last complete checkpoint left on disk."""
    text = child.text()
    assert "error:" not in text and "Traceback" not in text, text[-5000:]
    m = re.search(r"resuming from checkpoint at step (\d+)", text)
    if m:
        assert child.before and int(m.group(1)) == child.before[-1], (child.before, text[-3000:])
    elif "training" in child.marks:
        assert not child.before, (child.before, text[-3000:])


PHASES = ("before the first step", "between steps", "during a save", "final evaluation")
# The landmark a kill aimed at a phase waits for (a kill after 'first_step' lands between steps or during a save).
AIM = {"before the first step": "start", "between steps": "first_step", "during a save": "save",
       "final evaluation": "evaluating"}
# Kills after training began: the three phases after it must each be hit, and two kills more. Every kill costs a
# restart of train.py (~4 s on the 2-core CI machine).
KILLS_AFTER_TRAINING = 5
MAX_RUNS = 16  # the runs (killed or not) the kill loop may start before it gives up


def test_sigkill_at_random_points_then_rerun_replays_the_uninterrupted_run(reference, args, tmp_path):
    """SIGKILL after a random delay from a random landmark, until at least KILLS_AFTER_TRAINING kills have landed
    after training began and every phase has been hit; each time the same command is rerun and must resume from
    the last complete checkpoint. At the end the losses and the held-out loss are the uninterrupted run's, bit for
    bit. The delays and landmarks are seeded draws; only when the kills left would otherwise run out before every
    phase is hit is the landmark of a missing phase taken (the final evaluation last: once training has ended there
    is no step left to kill)."""
    run_dir, rng, ref = tmp_path / "run", random.Random(16), reference
    argv = args + [f"run_dir={run_dir}"]
    longest = {"start": ref["to_training"], "first_step": 3 * ref["step_s"], "save": ref["step_s"],
               "evaluating": ref["eval_s"]}
    tried = survived = 0
    places, log, killed = {p: 0 for p in PHASES}, [], False
    deadline = time.monotonic() + 300
    while True:
        after_training = tried - places["before the first step"]
        missing = [p for p in PHASES if not places[p]]
        if (after_training >= KILLS_AFTER_TRAINING and not missing) or len(log) >= MAX_RUNS:
            break
        assert time.monotonic() < deadline, f"out of time after {tried} kills: {places}\n" + "\n".join(log)
        child = Child(argv, run_dir)
        missing_after = [p for p in missing if p != "before the first step"]
        if STEPS in child.before:
            mark = "evaluating"
        elif missing and after_training + len(missing_after) >= KILLS_AFTER_TRAINING:
            mark = AIM[missing[0]]  # PHASES order: the final evaluation last
        else:
            mark = rng.choice(["start"] * 2 + ["first_step"] * 5 + ["save"] * 2)
        delay = rng.uniform(0, longest[mark])
        if mark == "start" or child.wait_for(mark, 120):
            time.sleep(max(0.0, (child.t0 if mark == "start" else child.marks[mark]) + delay - time.monotonic()))
        was_killed, killed = killed, child.kill()
        rc = child.wait(120)
        check_resumed(child)
        survived += was_killed  # the previous kill cost nothing but this rerun
        if not killed:  # it finished first (and must have succeeded)
            assert rc == 0, child.text()[-5000:]
            log.append(f"{len(log)}: {mark}: finished before the kill")
            continue
        tried += 1
        where = landed(child)
        places[where] += 1
        log.append(f"{len(log)}: {mark}+{delay:.2f}s -> {where} (complete: {finished_steps(run_dir)[-1:]}; "
                   f"run {child.t_exit - child.t0:.1f} s)")
    # the last rerun, left alone
    child = Child(argv, run_dir)
    assert child.wait(300) == 0, child.text()[-5000:]
    check_resumed(child)
    survived += killed
    print(f"\nkills survived / tried: {survived}/{tried}; where they landed: {places}\n" + "\n".join(log))
    assert training_records(run_dir) == training_records(ref["run_dir"])  # loss, lr and grad norm of every step
    assert summary(run_dir)["val_loss"] == ref["summary"]["val_loss"]
    assert finished_steps(run_dir) == finished_steps(ref["run_dir"]) and not tmp_dirs(run_dir)
    assert tried - places["before the first step"] >= KILLS_AFTER_TRAINING and all(places.values()), (places, log)


def test_full_disk_while_writing_metrics_is_one_line(tmp_path):
    from gptjax.errors import CheckpointError
    from gptjax.train.loop import MetricsLog

    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (Linux) to produce ENOSPC")
    log = MetricsLog(Path("/dev/full"), main=True)
    with pytest.raises(CheckpointError, match=r"writing /dev/full failed: No space left on device; free space"):
        log.write({"step": 1, "loss": 2.0}, group="train")


def test_files_beside_the_checkpoints_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import os

    from gptjax import config as config_lib

    p = tmp_path / "summary.json"
    config_lib.write_json(p, {"v": 1})

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        config_lib.write_json(p, {"v": 2})
    assert config_lib.read_json(p, "x") == {"v": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind
