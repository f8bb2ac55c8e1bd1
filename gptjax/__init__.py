"""gptjax: the GPT lineage in JAX and Flax NNX, one code path from one CPU to a TPU pod."""

import glob as _glob
import importlib.metadata as _metadata
import importlib.util as _util
import os as _os
import sys as _sys


def tpu_present() -> bool:
    """Whether this host has TPU chips: the device files JAX itself looks for."""
    return bool(_glob.glob("/dev/accel*") or _glob.glob("/dev/vfio/[0-9]*"))


def _quiet_libtpu() -> None:
    """With libtpu installed (the `tpu` extra, for AOT compilation to TPU topologies) on a machine without a TPU,
    JAX still tries the TPU backend, and libtpu prints a block of `E0000 ... could not determine TPU worker
    hostnames` lines that read as a failure. When there is no TPU here, no other accelerator plugin is installed
    and the user chose no platform, run on the CPU. AOT compilation loads libtpu itself, so it keeps working."""
    if "JAX_PLATFORMS" in _os.environ or "JAX_FORCE_TPU_INIT" in _os.environ:
        return
    if tpu_present():
        return
    if _util.find_spec("libtpu") is None:
        return
    try:  # a GPU (or other) plugin: leave platform choice to JAX
        if list(_metadata.entry_points(group="jax_plugins")) or _util.find_spec("jax_plugins") is not None:
            return
    except Exception:
        return
    _os.environ["JAX_PLATFORMS"] = "cpu"  # read when jax is imported, and by every child process
    if "jax" in _sys.modules:  # jax came first: its config is already read; the backends start lazily
        try:
            _sys.modules["jax"].config.update("jax_platforms", "cpu")
        except Exception:
            pass


_quiet_libtpu()
