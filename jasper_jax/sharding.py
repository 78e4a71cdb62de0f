"""Sharding in one place: the device mesh, the logical-axis rules table, parameter shardings.

Every parameter is created with `nn.with_logical_partitioning(init, names)`, where `names` come
from the logical axes below. `LOGICAL_AXIS_RULES` maps each logical axis to mesh axes of the
`(data, fsdp, tensor)` mesh. A dimension that the mesh axes do not divide stays replicated on
that axis (e.g. BERT's 30522-row vocabulary on a 4-way tensor axis), so any model runs on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jasper_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. Parameters: vocab, embed, heads (fused heads*head_dim), kv_heads,
# mlp, head_out (projection head output), norm, pos, patch. Activations: act_batch.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("act_batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_out", "tensor"),
    ("norm", None),
    ("pos", None),
    ("patch", None),
    ("type", None),
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a `(data, fsdp, tensor)` mesh; one entry of `shape` may be -1 (all the rest).

    Args:
      shape: three ints, e.g. (2, 1, 4) or (-1, 1, 1) for pure data parallelism.
      devices: defaults to all of `jax.devices()` (every process's devices on a multi-host run).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise UserError(f"mesh shape {tuple(shape)} must have 3 entries for axes {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise UserError(f"mesh shape {tuple(shape)}: use positive sizes and at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise UserError(
                f"mesh shape {tuple(shape)}: {len(devices)} devices are not divisible by {known}"
            )
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) < len(devices) and jax.process_count() == 1:
        devices = devices[: math.prod(shape)]  # e.g. a 1-device run on a multi-device host
    if math.prod(shape) != len(devices):
        raise UserError(
            f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices but {len(devices)} "
            "are available; set config.mesh_shape so its product equals the device count "
            "(-1 takes the rest)"
        )
    grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _mesh_axes_for(logical: str | None) -> tuple[str, ...]:
    if logical is None:
        return ()
    for name, axes in LOGICAL_AXIS_RULES:
        if name == logical:
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)
    raise ValueError(f"logical axis {logical!r} has no rule in LOGICAL_AXIS_RULES")


def spec_for(shape: Sequence[int], logical: Sequence[str | None], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array of `shape` with logical axis names, dropping any mesh axis that
    does not divide its dimension or is already used by an earlier dimension."""
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, logical, strict=True):
        kept = []
        for axis in _mesh_axes_for(name):
            size = mesh.shape[axis]
            if axis in used or size == 1 or dim % (size * math.prod(mesh.shape[a] for a in kept)):
                continue
            kept.append(axis)
        used.update(kept)
        spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return PartitionSpec(*spec)


def logical_axes(abstract_boxed: Any) -> Any:
    """Tree of logical-axis tuples from a boxed (`nn.LogicallyPartitioned`) variable tree."""
    return nn.get_partition_spec(abstract_boxed)


def param_shardings(abstract_boxed: Any, mesh: Mesh) -> Any:
    """NamedSharding tree for the unboxed parameters, from `jax.eval_shape(model.init, ...)`."""
    specs = logical_axes(abstract_boxed)
    shapes = nn.meta.unbox(abstract_boxed)

    def one(shape_struct, logical):
        logical = tuple(logical) if logical is not None else (None,) * len(shape_struct.shape)
        return NamedSharding(mesh, spec_for(shape_struct.shape, logical, mesh))

    return jax.tree.map(
        one, shapes, specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch array: leading axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(batch: dict, mesh: Mesh, keys: tuple[str, ...]) -> dict:
    """Per-process numpy batch -> global jax arrays, leading axis sharded over (data, fsdp).

    batch: {key: [local_rows, ...]}; returns {key: [local_rows * process_count, ...]} for `keys`.
    """
    out = {}
    for name in keys:
        local = batch[name]
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        out[name] = jax.make_array_from_process_local_data(
            batch_sharding(mesh, local.ndim), local, global_shape
        )
    return out


def host_value(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-host, sharded) array, on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
