"""Independent runs in child Python processes, a few at a time, each pinned to a core of its own.

On a small CPU machine two single-core runs side by side do more work than one run spread over both cores:
XLA's CPU backend does not keep two threads busy on a small model. Measured on the 2-core machine: 1.28x the
throughput for the GPT-1 fine-tuning runs of bench/finetune_analyses.py, 1.3x the tokens/s for the scaling
sweep's small points (docs/finetune.md, docs/scaling.md). A pinned run's results match an unpinned one's up to
float summation order (one thread sums in another order than two).

Used by bench/finetune_analyses.py and `python scaling.py sweep --jobs N`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from gptjax.errors import DataError


@dataclass
class Job:
    name: str  # what messages call it
    code: str  # Python run in the child once it is pinned; the child's sys.argv[1:] is `args`
    args: list[str] = field(default_factory=list)
    log: Path = Path("job.log")  # the child's stdout and stderr
    env: dict[str, str] = field(default_factory=dict)  # added to the parent's environment


def pool_cores(n_procs: int) -> list[int | None]:
    """The cores the children are pinned to: the first `n_procs` this process may use; [None] (no pinning,
    one child at a time) for n_procs <= 1."""
    return sorted(os.sched_getaffinity(0))[:n_procs] if n_procs > 1 else [None]


def run_pool(jobs: list[Job], n_procs: int, *, on_done: Callable[[Job, float], None] | None = None,
             what: str = "run", error: type[Exception] = DataError, poll_s: float = 0.5) -> None:
    """Run every job, `n_procs` at a time in the order given, each child pinned to one core when n_procs > 1;
    `on_done(job, seconds)` runs in this process as each one finishes.

    A child that exits non-zero stops the pool: the children still running are killed and reaped (each run
    resumes from its checkpoint when started again), and `error` says which job failed and where its log is.
    Ctrl-C does the same."""
    todo = list(jobs)
    free = pool_cores(n_procs)
    running: dict = {}
    try:
        while todo or running:
            while todo and free:
                job = todo.pop(0)
                core = free.pop(0)
                job.log.parent.mkdir(parents=True, exist_ok=True)
                fh = open(job.log, "w")
                pin = f"os.sched_setaffinity(0, {{{core}}}); " if core is not None else ""
                cmd = [sys.executable, "-c", f"import os, sys; {pin}{job.code}", *job.args]
                proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **job.env})
                running[proc] = (job, core, fh, time.time())
            time.sleep(poll_s)
            for proc in [p for p in running if p.poll() is not None]:
                job, core, fh, t0 = running.pop(proc)
                fh.close()
                if proc.returncode != 0:
                    raise error(f"{what} {job.name} failed (exit {proc.returncode}); its log: {job.log}")
                free.append(core)
                if on_done is not None:
                    on_done(job, time.time() - t0)
    finally:  # a failure or Ctrl-C stops the other runs too
        for proc, (_, _, fh, _) in running.items():
            proc.kill()
            proc.wait()
            fh.close()
