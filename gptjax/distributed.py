"""Several processes, one program: `jax.distributed.initialize` from flags or the environment.

Every process runs the same command. Where it learns it is one of several:
  1. flags `--coordinator HOST:PORT --num-processes N --process-id I` (all three), else
  2. the environment `GPTJAX_COORDINATOR`, `GPTJAX_NUM_PROCESSES`, `GPTJAX_PROCESS_ID`, else
  3. a cluster JAX knows how to read by itself: a SLURM job step with more than one task (srun), an
     Open MPI job (mpirun), a Cloud TPU VM (one process per host of a pod slice).
Otherwise the run is a plain single process and nothing is started. `--distributed on` makes JAX try its
own detection anyway (e.g. Kubernetes), `--distributed off` never starts it.

`initialize` must run before anything touches the JAX backend (jax.devices(), a jit, an array): the
device list of every process is exchanged when the backend starts.

A process that dies (SIGKILL, a lost host) would leave the others waiting in a collective until JAX's own
heartbeat timeout aborts them with a page of C++ log. `Watchdog` bounds that: every process stops within
`--heartbeat-timeout` seconds (default 60) of a peer's last heartbeat, with one line naming it. Process 0's
own death is beyond it: it hosts JAX's coordination service, and JAX stops the others within a second, in
its own words.
"""

from __future__ import annotations

import argparse
import atexit
import inspect
import math
import os
import sys
import threading
import time
from typing import Callable, Mapping

import jax
import numpy as np

from gptjax.config import ConfigError

ENV = {"coordinator": "GPTJAX_COORDINATOR", "num_processes": "GPTJAX_NUM_PROCESSES",
       "process_id": "GPTJAX_PROCESS_ID", "mode": "GPTJAX_DISTRIBUTED",
       "heartbeat_timeout": "GPTJAX_HEARTBEAT_TIMEOUT"}
MODES = ("auto", "on", "off")
# the variables JAX's SLURM detection reads; srun sets all of them inside a job step
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
HEARTBEAT_TIMEOUT_S = 60.0
LOST_PEER_EXIT = 1  # the exit code of a process stopped because a peer died


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("several processes (see the README; a single process needs none of these)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help=f"address of process 0, reachable from every process (env {ENV['coordinator']})")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help=f"how many processes run this command (env {ENV['num_processes']})")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help=f"this process, 0..N-1 (env {ENV['process_id']})")
    g.add_argument("--distributed", choices=MODES, default=None,
                   help="auto (default): flags, then environment, then SLURM / Open MPI / Cloud TPU; "
                        f"on: always ask JAX to detect the cluster; off: one process (env {ENV['mode']})")
    g.add_argument("--heartbeat-timeout", type=float, default=None, metavar="SECONDS",
                   help=f"stop every process this long after one stops responding (default {HEARTBEAT_TIMEOUT_S:g}; "
                        f"0: leave it to JAX's own, slower timeout) (env {ENV['heartbeat_timeout']})")


def _int(value, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be an integer, got {value!r}") from None


def _on_cloud_tpu_vm() -> bool:
    """JAX's own answer (set when jax is imported, without starting the backend): TPU chips and libtpu here."""
    try:
        from jax._src import cloud_tpu_init
        return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
    except Exception:  # a JAX without that module: no automatic TPU detection
        return False


def detect_cluster(env: Mapping[str, str], on_tpu_vm: bool) -> str | None:
    """The cluster JAX can read its process layout from, if this process is one of several there."""
    if all(v in env for v in SLURM_VARS) and (_int(env["SLURM_NTASKS"], "SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and (_int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or (on_tpu_vm and "TPU_SKIP_MDS_QUERY" not in env):
        return "tpu"
    return None


def process_plan(args, env: Mapping[str, str] | None = None, *, on_tpu_vm: bool | None = None) -> dict | None:
    """Keyword arguments for `jax.distributed.initialize` ({} = let JAX detect everything), or None for a
    single process. Pure: reads only `args` and `env`, so the rules are testable without starting anything."""
    env = os.environ if env is None else env
    mode = getattr(args, "distributed", None) or env.get(ENV["mode"]) or "auto"
    if mode not in MODES:
        raise ConfigError(f"{ENV['mode']}={mode!r}: choose one of {', '.join(MODES)}")
    flags = {"coordinator": getattr(args, "coordinator", None),
             "num_processes": getattr(args, "num_processes", None),
             "process_id": getattr(args, "process_id", None)}
    given = {k: v for k, v in flags.items() if v is not None}
    source = "--" + "/--".join(k.replace("_", "-") for k in flags)
    if not given:  # flags win as a whole: never mix a flag with a stale environment variable
        given = {k: env[ENV[k]] for k in flags if env.get(ENV[k], "") != ""}
        source = "/".join(ENV[k] for k in flags)
    if mode == "off":
        if given:
            raise ConfigError(f"--distributed off contradicts {', '.join(sorted(given))} given in {source}; drop one")
        return None
    n = _int(given.get("num_processes"), "the number of processes")
    i = _int(given.get("process_id"), "the process id")
    addr = given.get("coordinator")
    if given:
        if n is not None and n < 1:
            raise ConfigError(f"the number of processes must be at least 1, got {n}")
        if n == 1 and addr is None and i in (None, 0):
            return None  # one process, said explicitly
        if n is not None and i is not None and not 0 <= i < n:
            raise ConfigError(f"process id {i} is out of range for {n} processes (use 0..{n - 1})")
        missing = [k for k in flags if given.get(k) is None]
        if missing:
            names = ", ".join(("--" + k.replace("_", "-")) if source.startswith("--") else ENV[k] for k in missing)
            raise ConfigError(f"a multi-process run needs the coordinator address, the process count and this "
                              f"process's id ({source}); missing: {names}")
        host, sep, port = str(addr).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"coordinator {addr!r} must be HOST:PORT, e.g. 10.0.0.2:8476 (the address of process 0)")
        return {"coordinator_address": str(addr), "num_processes": n, "process_id": i}
    if mode == "on":
        return {}
    cluster = detect_cluster(env, _on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm)
    return {} if cluster else None


def heartbeat_timeout(args, env: Mapping[str, str] | None = None) -> float:
    """Seconds without a heartbeat after which a peer counts as dead (0: no watchdog); flag, then environment."""
    env = os.environ if env is None else env
    raw, where = getattr(args, "heartbeat_timeout", None), "--heartbeat-timeout"
    if raw is None:
        raw, where = env.get(ENV["heartbeat_timeout"]) or None, ENV["heartbeat_timeout"]
    if raw is None:
        return HEARTBEAT_TIMEOUT_S
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where} must be a number of seconds, got {raw!r}") from None
    if not math.isfinite(value) or (value != 0 and value < 1):
        raise ConfigError(f"{where} must be at least 1 second (or 0 to leave it to JAX), got {raw!r}")
    return value


def initialize(args) -> None:
    """Start JAX's distributed runtime if this process is one of several (see the module docstring), and the
    watchdog that stops every process when one dies; a plain single-process run returns at once. Call before
    anything touches the JAX backend."""
    kwargs = process_plan(args)
    if kwargs is None or jax.distributed.is_initialized():
        return
    timeout = heartbeat_timeout(args)
    if timeout and "heartbeat_timeout_seconds" in inspect.signature(jax.distributed.initialize).parameters:
        # JAX's own detection stays as the backstop, late enough that ours (with its one line) comes first
        kwargs = {**kwargs, "heartbeat_timeout_seconds": math.ceil(2 * timeout) + 10}
    # CPU processes exchange data through a collectives library: gloo, built into jaxlib and already the
    # default in jax 0.10; where a version defaults to "none", multi-process CPU runs would fail without it.
    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:
        pass
    try:
        jax.distributed.initialize(**kwargs)
    except (RuntimeError, ValueError) as e:
        where = kwargs.get("coordinator_address", "the address JAX detected")
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"could not start the multi-process run (coordinator {where}): {msg}; check that every "
                          f"process runs the same command with the same coordinator and process count") from e
    from jax._src import distributed as jax_distributed

    state, client = jax_distributed.global_state, _client()
    if timeout and client is not None and state.num_processes > 1:
        Watchdog(client, state.process_id, state.num_processes, timeout).start()


# ----------------------------------------------------------------------------------------------
# The watchdog: a dead process stops the others in bounded time, with one line.

_BEATS, _VERDICT, _EXITING = "gptjax/heartbeat", "gptjax/lost", "exiting"
_watchdog: Watchdog | None = None
_resume_hint: Callable[[], str] | None = None


def set_resume_hint(fn: Callable[[], str | None] | None) -> None:
    """What the lost-peer line says about resuming, e.g. lambda: "the last complete checkpoint (step 200) in
    runs/x is intact" (None: the generic words). Called from the watchdog's thread while the main thread may be
    stuck: list files, take no lock."""
    global _resume_hint
    _resume_hint = fn


class Watchdog:
    """Every process's daemon thread writes a counter into the coordination service's key-value store every
    `interval`; process 0's thread reads them all, and when one has not changed for `timeout` seconds it hands
    a verdict to each of the others, which are waiting on it; every live process prints the one line and exits.
    The beat comes from a thread, not the training loop, so long compiles and checkpoint saves do not look like
    a death; a peer that has begun exiting is not judged, so finishing steps apart is no death either.
    O(processes) requests per interval in all: process 0 reads every beat, each other process its own verdict."""

    def __init__(self, client, me: int, n: int, timeout: float):
        self.client, self.me, self.n, self.timeout = client, me, n, timeout
        self.interval = min(max(timeout / 6, 0.2), 10.0)
        self.seq, self.exiting, self.done = 0, False, threading.Event()
        self.seen: dict[int, tuple[str | None, float]] = {}  # peer -> (its beat, when we saw it change)
        self.last_look = None
        self.thread = threading.Thread(target=self._run, name="gptjax-watchdog", daemon=True)

    def start(self) -> None:
        global _watchdog
        _watchdog = self
        self.beat()
        self.thread.start()
        # atexit is last-in first-out: this runs before JAX's shutdown. The thread must be joined by then: a
        # daemon thread still inside a JAX call when the interpreter finalizes aborts the process
        # ("FATAL: exception not rethrown").
        atexit.register(self._at_exit)
        previous = sys.excepthook

        def hook(tp, value, tb):
            if issubclass(tp, Exception):
                self.settle()  # a collective that failed because a peer died: the verdict, not a traceback
            previous(tp, value, tb)
        sys.excepthook = hook

    def beat(self) -> None:
        self.seq += 1
        self.client.key_value_set(f"{_BEATS}/{self.me}", _EXITING if self.exiting else str(self.seq),
                                  allow_overwrite=True)

    def beats(self) -> dict[int, str]:
        return {int(k.rsplit("/", 1)[1]): v for k, v in self.client.key_value_dir_get(_BEATS + "/")}

    def lost(self) -> list[int]:
        """The peers whose beat has not changed for `timeout` seconds of our watching."""
        now, values = time.monotonic(), self.beats()
        if self.last_look is None or now - self.last_look > 3 * self.interval:
            self.seen.clear()  # we were not watching (our own thread starved): judge from now on
        self.last_look = now
        out = []
        for i in range(self.n):
            v = values.get(i)  # None: no beat yet
            if i == self.me or v == _EXITING:
                continue
            if i not in self.seen or self.seen[i][0] != v:
                self.seen[i] = (v, now)
            elif now - self.seen[i][1] > self.timeout:
                out.append(i)
        return out

    def _run(self) -> None:
        while not self.done.is_set():
            t = time.monotonic()
            try:
                self.beat()
                if self.me == 0:
                    lost = self.lost()
                    if lost:
                        self._verdict(lost)
                else:
                    line = self.client.blocking_key_value_get(f"{_VERDICT}/{self.me}", int(self.interval * 1000))
                    if self.done.is_set():
                        return
                    self.stop(line)
            except Exception:  # no verdict yet, or a failed request: JAX itself handles a lost coordinator
                self.last_look = None  # (process 0) a gap in what we saw is no evidence of a death
            self.done.wait(max(0.0, self.interval - (time.monotonic() - t)))

    def _verdict(self, lost: list[int]) -> None:
        who = f"process {lost[0]}" if len(lost) == 1 else f"processes {', '.join(map(str, lost))}"
        hint = _call_briefly(_resume_hint) if _resume_hint else None
        then = (f"{hint[:1].upper()}{hint[1:]}; restart all processes with the same command to resume" if hint else
                "Restart all processes with the same command to resume from the last complete checkpoint")
        line = f"error: {who} of {self.n} stopped responding (no heartbeat for {self.timeout:g} s); stopping. {then}"
        alive = [i for i in range(1, self.n) if i not in lost]
        try:
            for i in alive:
                self.client.key_value_set(f"{_VERDICT}/{i}", line, allow_overwrite=True)
            if alive:
                time.sleep(1.0)  # the others stop first: once process 0 is gone JAX aborts them noisily
        except Exception:
            pass
        self.stop(line)

    def stop(self, line: str) -> None:
        """Print the line and end the process now: the main thread may be stuck in a collective for good."""
        _call_briefly(lambda: (sys.stdout.flush(), sys.stderr.flush()))
        os.write(2, f"\n{line}\n".encode())
        os._exit(LOST_PEER_EXIT)

    def settle(self) -> None:
        """Wait until every peer is seen beating again (return), or until process 0's verdict ends this process;
        at most the time a verdict takes."""
        deadline = time.monotonic() + self.timeout + 3 * self.interval + 2
        try:
            first = self.beats()
            while time.monotonic() < deadline:
                time.sleep(self.interval)
                now = self.beats()
                if all(now.get(i) == _EXITING or now.get(i) != first.get(i) for i in range(self.n) if i != self.me):
                    return
        except Exception:
            return

    def _at_exit(self) -> None:
        """Stop the thread, then say we are exiting: no peer judges us while we wait at JAX's shutdown."""
        self.exiting = True
        self.done.set()
        try:
            if self.me:
                self.client.key_value_set(f"{_VERDICT}/{self.me}", "", allow_overwrite=True)  # wakes our thread
        except Exception:
            pass
        if self.thread.is_alive():
            self.thread.join(5)
        try:
            self.beat()  # after the join: a beat of the thread's in flight must not overwrite this one
        except Exception:
            pass


def _call_briefly(fn, seconds: float = 2.0):
    """fn() from a helper thread, or None if it fails or takes longer (it may wait on a lock the stuck main
    thread holds)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    return out[0] if out else None


# ----------------------------------------------------------------------------------------------
# Helpers for code that runs in every process.


def is_main() -> bool:
    """Process 0 writes files and prints; every process computes."""
    return jax.process_index() == 0


_sync = {"count": 0}


def _client():
    """The coordination-service client that jax.distributed.initialize made (None without it)."""
    from jax._src import distributed as jax_distributed

    return getattr(jax_distributed.global_state, "client", None)


def _key(name: str) -> str:
    _sync["count"] += 1  # every process passes the same synchronisation points in the same order
    return f"gptjax/{_sync['count']}/{name}"


def barrier(name: str, timeout_s: float = 3600) -> None:
    """Every process waits here until all arrive (nothing to wait for with one process). Waits on JAX's
    coordination service rather than a device collective, whose wait is short."""
    if jax.process_count() == 1:
        return
    key, client = _key(name), _client()
    try:
        if client is None:  # several processes without jax.distributed (older TPU runtimes)
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(key)
        else:
            client.wait_at_barrier(key, int(timeout_s * 1000))
    except Exception as e:
        if _watchdog is not None:
            _watchdog.settle()  # a dead peer: its verdict rather than this message
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"process {jax.process_index()} waited for the others at '{name}' in vain ({first}); "
                          f"another process probably stopped with an error: see process 0's output") from None


def process0_first(fn, what: str, timeout_s: float = 24 * 3600, *, others=None):
    """fn() on process 0, then on the others once it has finished (e.g. build a cache, then read it). If it
    fails on process 0, the others stop at once with a one-line error instead of waiting for a lost peer.
    With `others`, process 0's result (a str) is passed to the others, which call others(result) instead of
    fn() (e.g. open the cache process 0 built without looking at the corpus again)."""
    client = _client() if jax.process_count() > 1 else None
    if client is None:
        if jax.process_count() > 1:  # no coordination service to pass a message: a plain barrier
            out = fn() if is_main() else None
            barrier(what, timeout_s)
            return out if is_main() else fn()
        return fn()
    key = _key(what)
    if is_main():
        try:
            out = fn()
        except BaseException as e:
            client.key_value_set(key, f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500])
            raise
        client.key_value_set(key, "done" + (":" + out if others is not None else ""))
        return out
    status = client.blocking_key_value_get(key, int(timeout_s * 1000))
    if not status.startswith("done"):
        raise ConfigError(f"process 0 failed to {what} ({status[len('error: '):]}); see its output")
    return others(status[len("done:"):]) if others is not None else fn()


def check_same(value: bytes, what: str) -> None:
    """Raise if `value` differs between processes (e.g. each host built its own, different token cache)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        digest = np.frombuffer(value.ljust(32, b"\0")[:32], np.uint8)
        try:
            multihost_utils.assert_equal(digest, what)
        except AssertionError:
            raise ConfigError(f"process {jax.process_index()}: {what} differs from process 0's; give every process "
                              f"the same files (a shared directory)") from None


def local_rows(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...], axis: int) -> slice:
    """The rows along `axis` of a global array of `global_shape` that this process's devices hold: the part
    of a batch it must read (all of it where the batch is replicated over processes)."""
    n = global_shape[axis]
    spans = {idx[axis].indices(n)[:2] for idx in sharding.addressable_devices_indices_map(tuple(global_shape)).values()}
    lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
    if sum(e - s for s, e in spans) != hi - lo:
        raise ConfigError(f"process {jax.process_index()} holds non-contiguous rows {sorted(spans)} of the batch; "
                          f"order the mesh so each process's devices are adjacent along data x fsdp")
    return slice(lo, hi)


def host_to_global(arr, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host array that every process holds whole (evaluation windows, fine-tuning
    batches): each process hands over only the rows, along axis 0, that its own devices hold."""
    rows = local_rows(sharding, arr.shape, axis=0)
    return jax.make_array_from_process_local_data(sharding, arr[rows], arr.shape)
