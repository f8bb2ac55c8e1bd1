"""Shared fixtures. CPU only, 8 simulated devices, every cache and run directory under a temp dir.

The environment is set before anything imports jax: the device count is fixed when the backend starts.
"""

from __future__ import annotations

import os
import shutil
import tempfile

# The tests compile many tiny programs and run each briefly: trade XLA's backend optimisation (which
# does not change results) for compile time, about 2-3x faster on a small CPU.
FAST_COMPILE = ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"] + FAST_COMPILE).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
# Nothing a test runs (in process or in a subprocess) may write to ~/.cache/gptjax.
_SESSION_CACHE = tempfile.mkdtemp(prefix="gptjax-test-cache-")
os.environ["GPTJAX_CACHE"] = _SESSION_CACHE
# A compilation cache private to this session: subprocesses that run the same config (a run and its
# resumption) compile the train step once between them.
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_SESSION_CACHE, "jax")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# No test may reach the network: the Hugging Face datasets / hub clients (lm-eval, transformers) refuse to,
# so a task that needed a download fails at once instead of hanging.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# A model small enough to train in milliseconds per step on a CPU core.
TINY_MODEL = ["model.n_layer=2", "model.d_model=64", "model.n_head=2", "model.block_size=32",
              "model.vocab_size=512", "batch_size=8"]
VOCAB = 512


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """About 20 mid-sized standard-library files (~280 KB), copied so their content is fixed."""
    from gptjax.data import stdlib_files

    mid = [p for p in stdlib_files() if 8000 < p.stat().st_size < 30000]
    assert len(mid) >= 20, "this interpreter's standard library is unexpectedly small"
    chosen = mid[:: len(mid) // 20][:20]
    out = tmp_path_factory.mktemp("corpus")
    for i, p in enumerate(chosen):
        shutil.copyfile(p, out / f"{i:02d}_{p.name}")
    return out


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def tiny_overrides(corpus_dir, data_cache) -> list[str]:
    """Overrides for a tiny model on the small corpus; the token cache is shared by every test."""
    return TINY_MODEL + [
        "data.source=text", f"data.paths={corpus_dir}/*.py", f"data.cache_dir={data_cache}",
        "data.tokenizer_sample_bytes=300000", "optim.warmup_steps=2", "sample_tokens=0",
    ]


@pytest.fixture(scope="session")
def tiny_cfg(tiny_overrides, tmp_path_factory):
    from gptjax import config

    return config.resolve("tiny", tiny_overrides + [f"run_dir={tmp_path_factory.mktemp('run')}"])


@pytest.fixture(scope="session")
def prepared(tiny_cfg) -> Path:
    """The prepared token cache of the small corpus (built once per session)."""
    from gptjax import data

    return data.prepare(tiny_cfg.data, tiny_cfg.model.vocab_size, log=lambda _: None)


@pytest.fixture(scope="session")
def token_data(prepared):
    from gptjax import data

    return data.TokenData(prepared)


@pytest.fixture(scope="session")
def train_cfg(tiny_overrides):
    """The tiny model with a learning rate that overfits one batch in ~100 steps."""
    from gptjax import config

    return config.resolve("tiny", tiny_overrides + ["run_dir=/nonexistent", "steps=150", "optim.lr=3e-3",
                                                    "optim.warmup_steps=10"])


@pytest.fixture(scope="session")
def trainer1(train_cfg, mesh1):
    """`train_cfg` compiled for one device, shared by every test that needs the reference numbers."""
    from gptjax.train import steps as train_steps

    return train_steps.make_train_steps(train_cfg, mesh1)


@pytest.fixture(scope="session")
def mesh1():
    import jax

    from gptjax import sharding
    from gptjax.config import MeshConfig

    assert len(jax.devices()) == 8, "conftest must set up 8 simulated CPU devices"
    return sharding.make_mesh(MeshConfig(), devices=jax.devices()[:1])


# ----------------------------------------------------------------------------------------------
# Subprocesses: train.py / eval.py run from the repository root, on 1 CPU device unless told.


def subprocess_env(devices: int = 1) -> dict:
    env = dict(os.environ)
    flags = [f for f in env["XLA_FLAGS"].split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["GPTJAX_CACHE"] = _SESSION_CACHE
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_script(script: str, *args, devices: int = 1, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=REPO, env=subprocess_env(devices),
                          capture_output=True, text=True, timeout=timeout)


def start_script(script: str, *args, devices: int = 1, stdout=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, script, *map(str, args)], cwd=REPO, env=subprocess_env(devices),
                            stdout=stdout or subprocess.DEVNULL, stderr=subprocess.STDOUT, text=True)


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """step -> its training record from metrics.jsonl: the last record per step wins (a resumed run rewrites
    the steps after its checkpoint); records without a loss (evaluations) and a torn last line are skipped."""
    out: dict[int, dict] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in rec:
            out[int(rec["step"])] = rec
    return out


def read_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss (see read_metrics)."""
    return {step: rec["loss"] for step, rec in read_metrics(run_dir).items()}


def finished_steps(run_dir: Path) -> list[int]:
    d = Path(run_dir) / "checkpoints"
    if not d.exists():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit() and (p / "_CHECKPOINT_METADATA").exists())


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, timeout: float = 180) -> list[int]:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = finished_steps(run_dir)
        if steps:
            return steps
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) before writing a checkpoint")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no checkpoint appeared in time")


def _stop(*procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def _kill_after_first_checkpoint(proc_b, run_b: Path) -> int:
    """SIGKILL run B just after its first checkpoint; returns the steps it had finished."""
    import signal

    wait_for_checkpoint(proc_b, run_b)
    proc_b.send_signal(signal.SIGKILL)
    proc_b.wait(30)
    return finished_steps(run_b)


def run_and_kill(script: str, args_a: list, args_b: list, run_b: Path, log_b: Path, timeout: float = 300):
    """Start run A and run B of `script` together (they share the compile cache); SIGKILL B just after its first
    checkpoint, then let A finish. Returns (A's process, its output, B's process, B's steps at the kill)."""
    with open(log_b, "w") as log:
        proc_a = start_script(script, *args_a, stdout=subprocess.PIPE)
        proc_b = start_script(script, *args_b, stdout=log)
        try:
            steps_at_kill = _kill_after_first_checkpoint(proc_b, run_b)
            out_a, _ = proc_a.communicate(timeout=timeout)
        finally:
            _stop(proc_a, proc_b)
    return proc_a, out_a, proc_b, steps_at_kill


def run_then_kill(script: str, args_a: list, args_b: list, run_b: Path, log_b: Path, timeout: float = 300):
    """`run_and_kill` one run after the other: run A to its end, then start run B and SIGKILL it just after its
    first checkpoint. B then finds A's compiled programs in the session's compilation cache (started together,
    both compile them: twice the CPU time on a small machine). Returns what `run_and_kill` returns."""
    proc_a = start_script(script, *args_a, stdout=subprocess.PIPE)
    try:
        out_a, _ = proc_a.communicate(timeout=timeout)
    finally:
        _stop(proc_a)
    with open(log_b, "w") as log:
        proc_b = start_script(script, *args_b, stdout=log)
        try:
            steps_at_kill = _kill_after_first_checkpoint(proc_b, run_b)
        finally:
            _stop(proc_b)
    return proc_a, out_a, proc_b, steps_at_kill


def run_main(main, *args) -> subprocess.CompletedProcess:
    """A command's `main` (gptjax.cli.train.main, ...) called in this process, as `run_script` would run its
    script: exit code, stdout and stderr. For commands that stop before any device work (a refusal, a bad
    input): no interpreter to start, no jax to import again."""
    import contextlib
    import io

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())
