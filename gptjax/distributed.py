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
"""

from __future__ import annotations

import argparse
import os
from typing import Mapping

import jax
import numpy as np

from gptjax.config import ConfigError

ENV = {"coordinator": "GPTJAX_COORDINATOR", "num_processes": "GPTJAX_NUM_PROCESSES",
       "process_id": "GPTJAX_PROCESS_ID", "mode": "GPTJAX_DISTRIBUTED"}
MODES = ("auto", "on", "off")
# the variables JAX's SLURM detection reads; srun sets all of them inside a job step
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


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


def initialize(args) -> None:
    """Start JAX's distributed runtime if this process is one of several (see the module docstring);
    a plain single-process run returns at once. Call before anything touches the JAX backend."""
    kwargs = process_plan(args)
    if kwargs is None or jax.distributed.is_initialized():
        return
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
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ConfigError(f"process {jax.process_index()} waited for the others at '{name}' in vain ({first}); "
                          f"another process probably stopped with an error: see process 0's output") from None


def process0_first(fn, what: str, timeout_s: float = 24 * 3600):
    """fn() on process 0, then on the others once it has finished (e.g. build a cache, then read it). If it
    fails on process 0, the others stop at once with a one-line error instead of waiting for a lost peer."""
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
        client.key_value_set(key, "done")
        return out
    status = client.blocking_key_value_get(key, int(timeout_s * 1000))
    if status != "done":
        raise ConfigError(f"process 0 failed to {what} ({status[len('error: '):]}); see its output")
    return fn()


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
