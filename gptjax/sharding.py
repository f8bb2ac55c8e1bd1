"""The device mesh, logical-axis rule sets, and the constrain() helper.

The model names every array dimension with a logical axis (batch, seq, embed, heads, head_dim, mlp,
vocab, layers). A rule set maps logical names onto the mesh axes (data, fsdp, tensor); one short table
per strategy. One device is the mesh (1, 1, 1): there is no separate single-device path.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis or tuple of mesh axes (None: replicated)
RULES: dict[str, dict[str, Any]] = {
    # pure data parallel: parameters replicated, the batch split over every device
    "dp": {"batch": ("data", "fsdp")},
    # ZeRO-3: parameters (and so gradients and optimizer state) split along embed over fsdp
    "fsdp": {"batch": ("data", "fsdp"), "embed": "fsdp"},
    # FSDP + Megatron tensor parallel: heads / mlp / vocab split over tensor (column- then row-parallel)
    "fsdp_tp": {"batch": ("data", "fsdp"), "embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor"},
}


def resolve_mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes must be positive or -1, got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise ConfigError(f"{n_devices} devices cannot be split into a mesh with fixed axes of product {known}")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, but "
            f"{n_devices} are present; set one axis to -1 (e.g. mesh.fsdp=-1)")
    return tuple(sizes)  # type: ignore[return-value]


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(cfg, len(devices))
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except Exception:  # e.g. shapes make_mesh cannot lay out physically; fall back to device order
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


def logical_to_spec(names: Sequence[str | None], rules: str | dict, mesh: Mesh,
                    shape: Sequence[int] | None = None) -> P:
    """Map logical names to a PartitionSpec. A mesh axis is used at most once (first dimension wins),
    and an axis that does not divide its dimension is dropped, leaving that dimension replicated."""
    table = RULES[rules] if isinstance(rules, str) else rules
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = table.get(name) if name else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        keep = []
        for ax in axes:
            size = mesh.shape[ax]
            if ax in used or size == 1:
                continue
            width = math.prod(mesh.shape[a] for a in keep) * size
            if shape is not None and shape[i] % width:
                continue
            keep.append(ax)
        used.update(keep)
        spec.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def tree_shardings(logical_tree, shape_tree, mesh: Mesh, rules: str):
    """NamedShardings for a tree of arrays given a matching tree of logical-name tuples."""
    return jax.tree.map(
        lambda names, x: NamedSharding(mesh, logical_to_spec(names, rules, mesh, x.shape)),
        logical_tree, shape_tree, is_leaf=lambda t: isinstance(t, tuple))


# ----------------------------------------------------------------------------------------------
# Activation constraints: active only inside `use_mesh(...)`, a no-op elsewhere.

_ACTIVE: contextvars.ContextVar[tuple[Mesh, str] | None] = contextvars.ContextVar("gptjax_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: str):
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, str] | None:
    """The (mesh, rule set) of the enclosing `use_mesh`, if any."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules, mesh, x.shape)))


def batch_sharding(mesh: Mesh, rules: str, ndim: int, leading: int = 0) -> NamedSharding:
    """Sharding of a token batch: `leading` unsharded axes (micro-batches), then batch, then the rest."""
    names = (None,) * leading + ("batch",) + (None,) * (ndim - leading - 1)
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh))
