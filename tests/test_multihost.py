"""Several processes, one run: 2 processes x 4 CPU devices train exactly what 1 process x 8 devices trains
(JAX's CPU collectives over loopback), write one set of run files and a checkpoint that restores; and the
rules that decide when `jax.distributed.initialize` runs, with their one-line errors."""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import REPO, finished_steps, read_losses, run_main, subprocess_env

from gptjax import config, distributed, sharding
from gptjax.config import ConfigError
from gptjax.train.pretrain import batch_for_step

STEPS = 4
MESH = ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "mesh.rules=fsdp_tp"]  # fsdp spans the two processes
# A long run that is stopped from outside; the two tests that need one share these settings, so the second finds
# the train step its processes compile in the compilation cache.
LONG_RUN = ["--config", "tiny", *MESH, "steps=5000"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Output goes to a file, not a pipe: a process blocked on a full pipe would stall its peers."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def launch(args: list[str], logs: Path, devices: int = 4, processes: int = 2,
           extra_env: dict | None = None, script: tuple[str, ...] = ("train.py",)) -> list[subprocess.Popen]:
    """`processes` copies of one train.py command on the loopback address: process 0 learns its place from
    flags, the others from the environment. Every one also gets `extra_env`. Output goes to logs/p<i>.log."""
    port = free_port()
    procs = []
    for i in range(processes):
        env, cmd = subprocess_env(devices) | (extra_env or {}), [*script, *args]
        if i == 0:
            cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes), "--process-id", "0"]
        else:
            env |= {"GPTJAX_COORDINATOR": f"127.0.0.1:{port}", "GPTJAX_NUM_PROCESSES": str(processes),
                    "GPTJAX_PROCESS_ID": str(i)}
        procs.append(start(cmd, env, logs / f"p{i}.log"))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    """(exit code, output) of each process, once all have exited; none outlives the test."""
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, p.log.read_text()) for p in procs]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_overrides, prepared):
    """The same command as 2 processes x 4 devices and as 1 process x 8, all three processes at once.
    Process 0 learns its place from flags, process 1 from the environment."""
    root = tmp_path_factory.mktemp("multihost")
    args = ["--config", "tiny", *tiny_overrides, *MESH, f"steps={STEPS}", "checkpoint.every=2", "sample_tokens=6"]
    # the two processes run train.py under an audit hook that records every file opened in the corpus
    corpus = next(a.split("=", 1)[1] for a in tiny_overrides if a.startswith("data.paths=")).rsplit("/", 1)[0]
    two = launch(args + [f"run_dir={root / 'two'}"], root, script=("-c", AUDITED, str(root / "opened"), corpus))
    one = start(["train.py", *args, f"run_dir={root / 'one'}"], subprocess_env(8), root / "one.log")
    results = finish(two + [one])
    for name, (rc, out) in zip(("process 0", "process 1", "one process"), results):
        assert rc == 0, f"{name} exited {rc}:\n{out[-5000:]}"
    return {"two": root / "two", "one": root / "one", "out": [out for _, out in results], "opened": root / "opened"}


# train.py with Python's audit hook on "open": each process appends the corpus files it opens to OUT-<process id>
AUDITED = r"""
import os, runpy, sys
out, corpus = sys.argv[1], sys.argv[2]
me = os.environ.get("GPTJAX_PROCESS_ID", "0")
def hook(event, args):
    path = os.fspath(args[0]) if event == "open" and isinstance(args[0], (str, os.PathLike)) else ""
    if isinstance(path, str) and path.startswith(corpus):
        with open(f"{out}-{me}", "a") as f:
            f.write(path + "\n")
sys.addaudithook(hook)
sys.argv = ["train.py"] + sys.argv[3:]
runpy.run_path("train.py", run_name="__main__")
"""


def test_on_a_shared_disk_only_process_zero_reads_the_corpus(runs):
    """The others open the token cache process 0 names; they never look at the corpus itself."""
    assert (runs["opened"].parent / "opened-0").read_text()  # process 0 did (its fingerprint's sample reads)
    assert not (runs["opened"].parent / "opened-1").exists()


def test_two_processes_train_what_one_process_trains(runs):
    two, one = read_losses(runs["two"]), read_losses(runs["one"])
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5)
    assert len(set(two.values())) == STEPS  # the losses move: the steps really trained
    s2, s1 = (json.loads((runs[k] / "summary.json").read_text()) for k in ("two", "one"))
    assert s2["val_loss"] == pytest.approx(s1["val_loss"], rel=1e-5)  # the held-out evaluation, multi-process
    assert s2["sample"] == s1["sample"] and len(s2["sample"]) > len(config.TrainConfig().sample_prompt)


def test_only_process_zero_writes_and_prints(runs):
    # one record per step (not one per process), the final evaluation once
    lines = (runs["two"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS + 1
    assert {"config.json", "tokenizer.model", "summary.json", "metrics.jsonl"} <= {p.name for p in runs["two"].iterdir()}
    assert "held-out (step 4)" in runs["out"][0] and "sample:" in runs["out"][0]
    assert "held-out" not in runs["out"][1] and "training" not in runs["out"][1]


def test_checkpoint_of_two_processes_restores_and_evaluates(runs, tiny_overrides, token_data):
    """Restored here in one process on 8 devices: the same parameters as the 1-process run's checkpoint,
    and the same held-out loss as the run reported."""
    from gptjax.checkpoint import Checkpoints
    from gptjax.eval.scoring import heldout
    from gptjax.train.steps import make_train_steps

    assert finished_steps(runs["two"]) == finished_steps(runs["one"]) == [2, 4]
    cfg = config.load_json(runs["two"] / "config.json")
    trainer = make_train_steps(cfg, sharding.make_mesh(cfg.mesh))
    restored = {}
    for k in ("two", "one"):
        ck = Checkpoints(runs[k], read_only=True)
        step, restored[k] = ck.restore(trainer.abstract_state(), params_only=True)
        ck.close()
        assert step == STEPS
    # atol: Adam moves an element whose gradient is ~0 by up to lr per step, so summation order (which differs
    # between CPUs: AVX2 vs AVX-512 kernels) can move it ~1e-6; a wrong gradient moves elements by ~lr = 2e-3
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5),
                 restored["two"]["params"], restored["one"]["params"])
    ev = heldout(trainer, restored["two"]["params"], token_data)
    summary = json.loads((runs["two"] / "summary.json").read_text())
    assert ev["loss"] == pytest.approx(summary["val_loss"], rel=1e-5)


def test_a_failure_on_process_zero_stops_every_process_with_one_line(tiny_overrides, tmp_path):
    """Process 0 prepares the data while the others wait: when it fails they stop at once, not at a timeout."""
    results = finish(launch([*tiny_overrides, "data.paths=/nonexistent/*.py", f"run_dir={tmp_path / 'run'}"],
                            tmp_path), timeout=120)
    assert [rc for rc, _ in results] == [2, 2], [out[-2000:] for _, out in results]
    errors = [[line for line in out.splitlines() if line.startswith("error:")] for _, out in results]
    assert errors[0] == ["error: data.paths entry '/nonexistent/*.py' matches no file; check the path or quote the glob"]
    assert len(errors[1]) == 1 and errors[1][0].startswith("error: process 0 failed to prepare the run (DataError: data.paths")
    assert not any("Traceback" in out for _, out in results)


# ----------------------------------------------------------------------------------------------
# When to start the distributed runtime: flags, then environment, then a recognised cluster.

SLURM = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "16", "SLURM_PROCID": "3",
         "SLURM_LOCALID": "3"}


def flags(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    distributed.add_cli_flags(p)
    return p.parse_args(list(argv))


def plan(*argv, env=None, tpu=False):
    return distributed.process_plan(flags(*argv), env or {}, on_tpu_vm=tpu)


def test_a_plain_run_starts_nothing():
    assert plan() is None
    assert plan("--num-processes", "1") is None
    assert plan(env={"GPTJAX_NUM_PROCESSES": "1"}) is None
    assert plan(env={"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}) is None  # a one-task job


def test_explicit_flags_and_environment():
    want = {"coordinator_address": "10.0.0.2:8476", "num_processes": 4, "process_id": 3}
    assert plan("--coordinator", "10.0.0.2:8476", "--num-processes", "4", "--process-id", "3") == want
    env = {"GPTJAX_COORDINATOR": "10.0.0.2:8476", "GPTJAX_NUM_PROCESSES": "4", "GPTJAX_PROCESS_ID": "3"}
    assert plan(env=env) == want
    # flags win as a whole over the environment, and over cluster detection
    got = plan("--coordinator", "[::1]:9000", "--num-processes", "2", "--process-id", "0", env=env | SLURM)
    assert got == {"coordinator_address": "[::1]:9000", "num_processes": 2, "process_id": 0}


def test_clusters_are_left_to_jax_detection():
    assert plan(env=SLURM) == {}
    batch_script = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"}  # sbatch's shell, not srun
    assert plan(env=batch_script) is None
    assert plan(env={"OMPI_MCA_orte_hnp_uri": "1;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "8"}) == {}
    assert plan(tpu=True) == {}
    assert plan(env={"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}) == {}
    assert plan(env={"TPU_SKIP_MDS_QUERY": "1"}, tpu=True) is None
    assert plan("--distributed", "on") == {}
    assert plan("--distributed", "off", env=SLURM) is None
    assert plan(env=SLURM | {"GPTJAX_DISTRIBUTED": "off"}) is None


@pytest.mark.parametrize("argv, env, message", [
    (["--num-processes", "2"], {}, "missing: --coordinator, --process-id"),
    (["--process-id", "1"], {}, "missing: --coordinator, --num-processes"),
    (["--coordinator", "h:1"], {}, "missing: --num-processes, --process-id"),
    ([], {"GPTJAX_NUM_PROCESSES": "2", "GPTJAX_PROCESS_ID": "0"}, "missing: GPTJAX_COORDINATOR"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], {}, "process id 2 is out of range"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "-1"], {}, "out of range for 2 processes"),
    (["--num-processes", "2", "--process-id", "2"], {}, "process id 2 is out of range"),
    (["--coordinator", "h:1", "--num-processes", "0", "--process-id", "0"], {}, "at least 1"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], {}, "must be HOST:PORT"),
    (["--coordinator", "h:99999", "--num-processes", "2", "--process-id", "0"], {}, "must be HOST:PORT"),
    ([], {"GPTJAX_COORDINATOR": "h:1", "GPTJAX_NUM_PROCESSES": "two", "GPTJAX_PROCESS_ID": "0"}, "must be an integer"),
    (["--distributed", "off", "--num-processes", "2"], {}, "contradicts"),
    ([], {"GPTJAX_DISTRIBUTED": "maybe"}, "choose one of auto, on, off"),
])
def test_inconsistent_settings_are_one_line_errors(argv, env, message):
    with pytest.raises(ConfigError, match=message) as e:
        plan(*argv, env=env)
    assert "\n" not in str(e.value)


def test_initialize_leaves_a_single_process_alone(monkeypatch):
    for k in list(distributed.ENV.values()) + list(distributed.SLURM_VARS) + ["OMPI_MCA_orte_hnp_uri",
                                                                            "TPU_WORKER_HOSTNAMES"]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")  # should the tests ever run on a TPU VM
    distributed.initialize(flags())
    assert not jax.distributed.is_initialized() and jax.process_count() == 1


def test_train_py_reports_bad_flags_in_one_line(tiny_overrides, tmp_path):
    from gptjax.cli import train as train_cli

    # train.py's main, in this process: the flags are refused before anything starts
    proc = run_main(train_cli.main, *tiny_overrides, f"run_dir={tmp_path}", "--num-processes", "2", "--process-id", "5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: process id 5 is out of range for 2 processes (use 0..1)"]


# ----------------------------------------------------------------------------------------------
# Which rows of a batch each process reads.


class FakeSharding:
    """What a 2-process mesh looks like from one process: the row spans of its devices."""

    def __init__(self, spans):
        self.spans = spans

    def addressable_devices_indices_map(self, shape):
        return {i: (slice(a, b), slice(None)) for i, (a, b) in enumerate(self.spans)}


def test_local_rows_follow_the_devices_of_this_process(train_cfg, token_data):
    assert distributed.local_rows(FakeSharding([(4, 6), (6, 8), (4, 6)]), (8, 33), 0) == slice(4, 8)
    assert distributed.local_rows(FakeSharding([(0, 8)] * 4), (8, 33), 0) == slice(0, 8)  # replicated
    with pytest.raises(ConfigError, match="non-contiguous rows"):
        distributed.local_rows(FakeSharding([(0, 2), (4, 6)]), (8, 33), 0)
    # one process: the whole global batch, micro-batches in order, as before
    cfg = dataclasses.replace(train_cfg, micro_batches=2)
    mesh = sharding.make_mesh(config.MeshConfig(data=2, fsdp=2, tensor=2))
    got = batch_for_step(token_data, cfg, 7, sharding.batch_sharding(mesh, "fsdp", ndim=3, leading=1))
    want = token_data.batch(cfg.seed, 7, 8, 32).reshape(2, 4, 33)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_sigterm_to_one_process_stops_all_at_one_checkpoint(tmp_path, tiny_overrides, prepared):
    """Preemption reaches hosts at different moments: a signal to process 1 alone still makes both processes
    save the same step together and exit 143 (rather than one saving while the other trains on: a hang)."""
    import signal
    import time

    run = tmp_path / "run"
    procs = launch([*LONG_RUN, *tiny_overrides, "log_every=2", "checkpoint.every=1000", f"run_dir={run}"], tmp_path)
    try:
        deadline = time.time() + 240
        while len(read_losses(run) if (run / "metrics.jsonl").exists() else {}) < 4:
            assert time.time() < deadline and all(p.poll() is None for p in procs), procs[0].log.read_text()[-3000:]
            time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        results = finish(procs, timeout=180)
    for rc, out in results:
        assert rc == 143, out[-3000:]
    stopped = finished_steps(run)
    assert len(stopped) == 1 and stopped[0] % 2 == 0 and 4 <= stopped[0] < 5000, stopped
    assert max(read_losses(run)) == stopped[0]
    assert f"saved a checkpoint at step {stopped[0]}" in results[0][1]


HEARTBEAT_S = 4  # the detection time under test, lowered from the default


def test_a_killed_process_stops_the_others_with_one_line_naming_it(tmp_path, tiny_overrides, prepared):
    """SIGKILL leaves process 1 no chance to say anything: process 0 must notice by itself and stop within the
    heartbeat timeout (not at JAX's own, much later one) with one line naming process 1, and the checkpoint a
    restart resumes from (the latest complete one) must restore. Restored here, in one process: a rerun of
    both would cost twice the test."""
    import signal
    import time

    from gptjax.checkpoint import Checkpoints
    from gptjax.train.steps import make_train_steps

    run = tmp_path / "run"
    procs = launch([*LONG_RUN, *tiny_overrides, "checkpoint.every=2", f"run_dir={run}"], tmp_path,
                   extra_env={"GPTJAX_HEARTBEAT_TIMEOUT": str(HEARTBEAT_S)})
    try:
        deadline = time.time() + 120
        while not finished_steps(run):
            assert time.time() < deadline and all(p.poll() is None for p in procs), procs[0].log.read_text()[-3000:]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=60)  # without the watchdog: a traceback, then JAX's abort 100 s later
    finally:
        (rc, out), _ = finish(procs, timeout=10)
    assert rc == distributed.LOST_PEER_EXIT, out[-3000:]
    errors = [line for line in out.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"error: process 1 of 2 stopped responding (no heartbeat for "
                                                     f"{HEARTBEAT_S} s); stopping."), out[-3000:]
    assert "restart all processes with the same command" in errors[0].lower() and "Traceback" not in out
    saved = finished_steps(run)
    assert saved and saved[-1] < 5000
    cfg = config.load_json(run / "config.json")
    trainer = make_train_steps(cfg, sharding.make_mesh(cfg.mesh))
    ck = Checkpoints(run, read_only=True)
    step, state = ck.restore(trainer.abstract_state())
    ck.close()
    assert step == saved[-1] == int(state["step"])


class FakeKV:
    """The coordination service's key-value store, as far as the watchdog uses it."""

    def __init__(self):
        self.kv = {}

    def key_value_set(self, key, value, allow_overwrite=False):
        self.kv[key] = value

    def key_value_dir_get(self, prefix):
        return [(k, v) for k, v in self.kv.items() if k.startswith(prefix)]


def test_the_watchdog_judges_only_a_peer_whose_heartbeat_stops(monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(distributed.time, "monotonic", lambda: clock["t"])
    kv = FakeKV()
    dog, peers = distributed.Watchdog(kv, 0, 3, timeout=6), [distributed.Watchdog(kv, i, 3, timeout=6) for i in (1, 2)]

    def tick(seconds, beating=(1, 2)):
        for _ in range(int(seconds / dog.interval)):
            clock["t"] += dog.interval
            for p in peers:
                if p.me in beating:
                    p.beat()
            dog.beat()
            lost = dog.lost()
        return lost

    assert tick(60) == []  # beating peers are never lost, however long the run
    assert tick(5, beating=(2,)) == []  # silent for less than the timeout
    assert tick(2, beating=(2,)) == [1]
    peers[0].beat()
    assert tick(1) == []  # back: no longer lost
    # a gap in process 0's own watching (its thread starved) is no evidence: judged from then on
    clock["t"] += 100
    assert dog.lost() == [] and tick(5, beating=(2,)) == []
    # a peer that has begun exiting is waiting for the others at JAX's shutdown: never lost
    peers[1]._at_exit()
    assert tick(20, beating=()) == [1]


def test_heartbeat_timeout_comes_from_flag_then_environment():
    assert distributed.heartbeat_timeout(flags(), {}) == distributed.HEARTBEAT_TIMEOUT_S
    assert distributed.heartbeat_timeout(flags(), {"GPTJAX_HEARTBEAT_TIMEOUT": "5"}) == 5
    assert distributed.heartbeat_timeout(flags("--heartbeat-timeout", "0"), {"GPTJAX_HEARTBEAT_TIMEOUT": "5"}) == 0
    for raw in ("0.5", "-3", "soon"):
        with pytest.raises(ConfigError, match="GPTJAX_HEARTBEAT_TIMEOUT must be"):
            distributed.heartbeat_timeout(flags(), {"GPTJAX_HEARTBEAT_TIMEOUT": raw})
