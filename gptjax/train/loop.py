"""The one training loop. Every stage (pretraining, and the fine-tuning and RLHF stages to come) hands it a
`Stage`: a jitted step function, a batch source that is a pure function of the step number (and the seed it
closes over), and what to evaluate and when. The loop owns everything with side effects: the progress bar,
metrics.jsonl and the trackers beside it (tracking.py), SIGTERM and its multi-process agreement, the non-finite
guard, checkpoint cadence, exact resume and the profiler trace. `RunDirLock` keeps a second live job out of a run
directory.

Order of work per step: dispatch step N, then fetch step N-1's metrics (so the host never waits on the
device in the steady state), then decide whether to evaluate, save or stop after step N.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from gptjax import distributed
from gptjax.checkpoint import Checkpoints, complete_steps
from gptjax import config as config_lib
from gptjax.config import LogConfig
from gptjax.errors import CheckpointError, NonFiniteLoss, Preempted, RunDirBusy
from gptjax.train import tracking

State = dict[str, Any]
FIRST_KEYS = ("loss", "lr", "grad_norm")  # metrics.jsonl's leading fields, in this order


@dataclass
class Stage:
    """What a stage hands the loop. Everything here is pure or jitted; the loop does the I/O."""

    steps: int  # train until this step
    step_fn: Callable[[State, Any], tuple[State, dict]]  # (state, batch) -> (state, metrics); state donated
    batch: Callable[[int], Any]  # step -> the global batch of that step: a pure function of (seed, step)
    all_finite: Callable[[Any], Any]  # params -> bool (array); guards every save
    tokens_per_step: int
    log_every: int = 10  # also how often several processes compare their preemption flags
    checkpoint_every: int = 200
    eval_every: int = 0  # 0: no evaluation inside the loop
    evaluate: Callable[[State], tuple[dict, str]] | None = None  # state -> (metrics record, one line to print)
    mfu: Callable[[float], float | None] = lambda tokens_per_s: None
    config: dict = field(default_factory=dict)  # stored with every checkpoint
    # a jax.profiler trace of these steps (0-based: the update from state step s; metrics.jsonl's step s+1)
    profile_steps: range = range(0)
    profile_dir: Path | None = None


@dataclass
class LoopResult:
    state: State
    start: int  # the step the loop started (or resumed) from
    train_seconds: float
    tokens_per_s: list[float]  # per logged interval, compilation excluded


class MetricsLog:
    """RUN_DIR/metrics.jsonl, appended to, and every record also to the trackers `log_cfg` turns on (TensorBoard,
    W&B: tracking.py, given `config` to record); process 0 alone writes. A line torn by a kill is closed first. The
    trackers open when the loop calls `begin(start)`; a missing tracker package is refused here, before anything
    trains."""

    def __init__(self, path: Path, main: bool, log_cfg: LogConfig | None = None, config: dict | None = None):
        torn = main and path.exists() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
        self.path = path
        self.trackers = tracking.Trackers(log_cfg, path.parent, config or {}) if main and log_cfg else None
        self.f = open(path, "a") if main else open(os.devnull, "w")
        if torn:
            self.f.write("\n")

    def begin(self, start: int) -> None:
        if self.trackers is not None:
            self.trackers.open(start)

    def write(self, rec: dict, group: str = "eval") -> None:
        """group: the trackers' tag prefix; the loop's step records are "train", a stage's own records "eval"."""
        try:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()
        except OSError as e:  # a full disk, a lost mount: stop with one line; the checkpoints are untouched
            raise CheckpointError(f"writing {self.path} failed: {e.strerror or e}; free space there and rerun the same "
                                  f"command to resume from the last complete checkpoint") from None
        if self.trackers is not None:
            self.trackers.write(group, rec)

    def close(self) -> None:
        self.f.close()
        if self.trackers is not None:
            self.trackers.close()


class RunDirLock:
    """An exclusive lock on RUN_DIR/.lock for as long as a job trains into it. A second job is refused before
    it touches anything (it would otherwise sweep the first one's in-progress save as half-written). The
    kernel drops the lock when the holder dies, even by SIGKILL, so a killed run resumes without cleanup.
    Where the file system cannot lock, the run goes on unguarded."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(self.fd)
            self.fd = None
            raise RunDirBusy(f"{run_dir} is in use by another training job ({holder}); wait for it to finish, "
                             f"stop it, or train into another run_dir=...") from None
        except OSError:
            pass
        os.ftruncate(self.fd, 0)
        os.write(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode())

    def _holder(self) -> str:
        try:
            h = json.loads(self.path.read_text())
            return f"pid {h['pid']} on {h['host']}, since {h['since']}"
        except (OSError, ValueError, KeyError):
            return "another process"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _Trace:
    """A jax.profiler trace of the loop steps in `window` into `out` (TensorBoard's profile tab, or Perfetto). It
    starts at the first step of the window this run reaches (none if a resumed run starts past it) and stops
    once the window's last step is done on the device, or where the run ends."""

    def __init__(self, window: range, out: Path | None, say: Callable[[str], None]):
        self.window, self.out, self.say = window, out, say
        self.first: int | None = None  # the step the trace started at, while it runs
        self.last = -1

    def at(self, step: int, state: State) -> None:
        """Before loop step `step`."""
        if self.first is None and step in self.window and self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.out), create_perfetto_trace=True)  # also a file ui.perfetto.dev opens
            self.first = step
        elif self.first is not None and step >= self.window.stop:
            self.stop(state)
        self.last = step

    def stop(self, state: State | None) -> None:
        """End the trace; with `state`, after the device has finished computing it (so the trace holds that work)."""
        if self.first is None:
            return
        if state is not None:
            jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.say(f"profile: traced steps {self.first}..{min(self.last, self.window.stop - 1)} into {self.out} "
                 f"(tensorboard --logdir {self.out}: the Profile tab; or perfetto_trace.json.gz at ui.perfetto.dev)")
        self.first = None
        self.window = range(0)  # once per run


class _Preemption:
    """SIGTERM sets a flag; with several processes, all agree on when to stop (the save is collective) although
    each gets its own signal, possibly steps apart: they compare flags every log_every steps."""

    def __init__(self, log_every: int):
        self.signal, self.log_every, self.old = None, log_every, None
        try:
            self.old = signal.signal(signal.SIGTERM, self._on)
        except ValueError:  # not the main thread (e.g. called from a worker): no preemption hook
            pass

    def _on(self, signum, frame):
        self.signal = signum

    def now(self, done: int) -> bool:
        if jax.process_count() == 1:
            return bool(self.signal)
        if done % self.log_every:
            return False
        return bool(multihost_utils.process_allgather(np.int32(self.signal is not None)).any())

    def restore(self) -> None:
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def run(stage: Stage, ckpts: Checkpoints, metrics: MetricsLog, *, fresh_state: Callable[[], State],
        abstract_state: Callable[[], State], on_fresh_start: Callable[[State], None] | None = None,
        main: bool = True, log: Callable[[str], None] = print) -> LoopResult:
    """Resume from the latest complete checkpoint (or start from `fresh_state()`), then train to stage.steps.

    Raises NonFiniteLoss (nothing non-finite is ever saved; the last good checkpoint is named) and Preempted
    (after saving the step it stopped at)."""
    t_start = time.time()

    def intact() -> str | None:  # for the line a lost peer ends the run with (a directory listing: no lock taken)
        s = complete_steps(ckpts.dir)
        return f"the last complete checkpoint (step {s[-1]}) in {ckpts.dir} is intact" if s else None

    distributed.set_resume_hint(intact)
    resuming = ckpts.latest_step() is not None
    if resuming:
        start, state = ckpts.restore(abstract_state())
        log(f"resuming from checkpoint at step {start}")
    else:
        start, state = 0, fresh_state()
    metrics.begin(start)  # the trackers learn which steps this run rewrites
    if not resuming and on_fresh_start is not None:
        on_fresh_start(state)

    preemption = _Preemption(stage.log_every)
    bar = tqdm(total=stage.steps, initial=start, desc="training", unit="step", dynamic_ncols=True, disable=not main)
    pending = None  # (step, metrics on device): fetched after the next step is dispatched
    last = {"time": time.time(), "step": start}
    last_good = ckpts.latest_step()
    rates: list[float] = []

    def record(item) -> dict:
        step, metrics_dev = item
        m = {k: float(v) for k, v in jax.device_get(metrics_dev).items()}
        if not all(math.isfinite(m[k]) for k in ("loss", "grad_norm") if k in m):
            bar.close()
            where = f"the last good checkpoint (step {last_good}) in {ckpts.dir} is intact" if last_good is not None \
                else "no checkpoint had been saved yet"
            raise NonFiniteLoss(f"loss became {m.get('loss')} (grad norm {m.get('grad_norm')}) at step {step}; "
                                f"stopping. {where}. Lower optim.lr or raise optim.warmup_steps and resume.")
        now = time.time()
        steps_done = step - last["step"]
        tps = steps_done * stage.tokens_per_step / max(now - last["time"], 1e-9) if steps_done else 0.0
        last.update(time=now, step=step)
        util = stage.mfu(tps)
        rec = {"step": step, **{k: m[k] for k in FIRST_KEYS if k in m},
               **{k: m[k] for k in sorted(m) if k not in FIRST_KEYS},
               "tokens_per_s": tps, "mfu": util, "time": now - t_start}
        metrics.write(rec, group="train")
        if step - steps_done > start:  # the first interval includes compilation
            rates.append(tps)
        shown = {k: f"{m[k]:.3f}" if k == "loss" else f"{m[k]:.2e}" for k in ("loss", "lr") if k in m}
        bar.set_postfix(**shown, tok_s=f"{tps:,.0f}", mfu="n/a" if util is None else f"{util:.1%}", refresh=False)
        return rec

    def save(step: int, *, force: bool = False):
        nonlocal last_good
        if not bool(stage.all_finite(state["params"])):
            raise NonFiniteLoss(f"parameters became non-finite by step {step}; not saving them. The last good "
                                f"checkpoint (step {last_good}) in {ckpts.dir} is intact. Lower optim.lr and resume.")
        if ckpts.save(step, state, stage.config, force=force):
            last_good = step

    trace = _Trace(stage.profile_steps, stage.profile_dir, bar.write if main else lambda _: None)
    t_loop = time.time()
    try:
        for step in range(start, stage.steps):
            trace.at(step, state)
            state, metrics_dev = stage.step_fn(state, stage.batch(step))
            done = step + 1
            if pending is not None:
                record(pending)
            pending = (done, metrics_dev)
            bar.update(1)
            is_ckpt = done % stage.checkpoint_every == 0 or done == stage.steps
            is_eval = bool(stage.eval_every and stage.evaluate and done % stage.eval_every == 0 and done != stage.steps)
            stopping = preemption.now(done)
            if is_ckpt or stopping or is_eval:
                rec = record(pending)  # checked finite before anything is saved
                pending = None
                if is_eval:
                    ev, line = stage.evaluate(state)
                    metrics.write({"step": done, **ev})
                    if main:
                        bar.write(f"step {done}: train loss {rec['loss']:.4f}, {line}")
                    last["time"] = time.time()  # don't count evaluation in tokens/s
                if is_ckpt or stopping:
                    save(done, force=stopping)
                if stopping:
                    ckpts.wait()
                    bar.close()
                    raise Preempted(f"received signal {preemption.signal or 'SIGTERM (on another process)'}: saved a "
                                    f"checkpoint at step {done} in {ckpts.dir}; rerun the same command to resume")
        if pending is not None:
            record(pending)
        trace.stop(state)  # the run ended inside the window
        bar.close()
        ckpts.wait()
    finally:
        trace.stop(None)  # after an exception the state may be donated: stop without waiting on it
        bar.close()
        ckpts.wait()  # never exit with a good checkpoint half-written
        preemption.restore()
    return LoopResult(state, start, time.time() - t_loop, rates)


def check_stage_run_dir(cfg, run_dir: Path, *, stage: str, record: str, identity: tuple[str, ...], what: str,
                        into: str, log) -> bool:
    """Whether `run_dir` holds this post-training run (`cfg`, a stage's root config) to resume. Refuses, before
    anything is written, a directory holding checkpoints of another kind of run (config.json's stage is not
    `stage`, or the stage's `record` file is missing) or of this kind with another `identity` setting (those
    that make the run what it is); other changed settings are noted. `what` names the kind ("an SFT run"),
    `into` the fix's verb ("fine-tune into")."""
    if not complete_steps(run_dir / "checkpoints"):
        return False
    path = run_dir / "config.json"
    stored = config_lib.read_config(path, f"run_dir={run_dir}") if path.exists() else {}
    if stored.get("stage") != stage or not (run_dir / record).exists():
        raise CheckpointError(f"{run_dir} holds checkpoints of a run that is not {what}; {into} another --run-dir")
    old = config_lib.to_dict(config_lib.from_dict(type(cfg), {k: v for k, v in stored.items()
                                                              if k not in config_lib.RECORD_KEYS}))
    new = config_lib.to_dict(cfg)
    changed = [k for k in identity if old.get(k) != new.get(k)]
    if changed:
        k = changed[0]
        raise CheckpointError(f"{run_dir} holds {what} with {k}={old.get(k)!r}, not {new.get(k)!r}; rerun it as it "
                              f"was, or {into} another --run-dir")
    other = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in old if k not in identity and k != "run_dir" and old[k] != new[k]]
    if other:
        log(f"note: resuming {run_dir} with changed settings: {'; '.join(other[:6])}")
    return True
