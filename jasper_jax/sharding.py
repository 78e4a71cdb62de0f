"""Sharding in one place: the device mesh, the logical-axis rules table, parameter shardings.

Every parameter is created with `nn.with_logical_partitioning(init, names)`, where `names` come
from the logical axes below. `LOGICAL_AXIS_RULES` maps each logical axis to mesh axes of the
`(data, fsdp, tensor)` mesh. A dimension that the mesh axes do not divide stays replicated on
that axis (e.g. BERT's 30522-row vocabulary on a 4-way tensor axis), so any model runs on any mesh.
"""

from __future__ import annotations

import contextlib
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
Rules = tuple[tuple[str, Any], ...]

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

# Inference (teacher passes, encode): no optimizer state to spread, so the data axis shards the
# weights too (ZeRO-3 over every device); batch rows are still split over (data, fsdp).
INFERENCE_AXIS_RULES: tuple[tuple[str, Any], ...] = tuple(
    (name, ("fsdp", "data")) if name == "embed" else (name, axes)
    for name, axes in LOGICAL_AXIS_RULES
)


def make_mesh(
    shape: Sequence[int],
    devices: Sequence[jax.Device] | None = None,
    flag: str = "config.mesh_shape",
) -> Mesh:
    """Builds a `(data, fsdp, tensor)` mesh; one entry of `shape` may be -1 (all the rest).

    Args:
      shape: three ints, e.g. (2, 1, 4) or (-1, 1, 1) for pure data parallelism.
      devices: defaults to all of `jax.devices()` (every process's devices on a multi-host run).
      flag: the setting errors name (``--mesh-shape`` for the CLI).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = list(shape)
    if len(shape) != len(MESH_AXES):
        raise UserError(f"{flag} {tuple(shape)} must have 3 entries for the axes {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise UserError(f"{flag} {tuple(shape)}: use positive sizes and at most one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise UserError(
                f"{flag} {tuple(shape)}: {len(devices)} devices are not divisible by {known}; "
                "fix: choose sizes that divide the device count"
            )
        shape[shape.index(-1)] = len(devices) // known
    if len(devices) % math.prod(shape) and math.prod(shape) < len(devices):
        raise UserError(
            f"{flag} {tuple(shape)}: {math.prod(shape)} devices do not divide the "
            f"{len(devices)} available; fix: choose sizes whose product divides {len(devices)} "
            "(-1 takes the rest)"
        )
    if math.prod(shape) < len(devices) and jax.process_count() == 1:
        devices = devices[: math.prod(shape)]  # e.g. a 1-device run on a multi-device host
    if math.prod(shape) != len(devices):
        raise UserError(
            f"{flag} {tuple(shape)} needs {math.prod(shape)} devices but {len(devices)} "
            f"are available; fix: set {flag} so its product equals the device count "
            "(-1 takes the rest)"
        )
    grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


def _mesh_axes_for(logical: str | None, rules: Rules) -> tuple[str, ...]:
    if logical is None:
        return ()
    for name, axes in rules:
        if name == logical:
            if axes is None:
                return ()
            return (axes,) if isinstance(axes, str) else tuple(axes)
    raise ValueError(f"logical axis {logical!r} has no rule in the axis rules")


def spec_for(
    shape: Sequence[int],
    logical: Sequence[str | None],
    mesh: Mesh,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array of `shape` with logical axis names, dropping any mesh axis that
    does not divide its dimension or is already used by an earlier dimension."""
    used: set[str] = set()
    spec = []
    for dim, name in zip(shape, logical, strict=True):
        kept = []
        for axis in _mesh_axes_for(name, rules):
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


def spread(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """`spec` with every mesh axis it leaves unused added to the largest dimension that axis
    still divides: a weight whose rule could not apply (an odd vocabulary on `tensor`) is still
    split over every device instead of being copied."""
    entries = [(e,) if isinstance(e, str) else tuple(e or ()) for e in spec]
    entries += [()] * (len(shape) - len(entries))
    used = {a for e in entries for a in e}
    for axis in MESH_AXES:
        if axis in used or mesh.shape[axis] == 1:
            continue
        fits = [
            i
            for i, dim in enumerate(shape)
            if dim % (mesh.shape[axis] * math.prod(mesh.shape[a] for a in entries[i])) == 0
        ]
        if fits:
            i = max(fits, key=lambda j: shape[j])
            entries[i] += (axis,)
            used.add(axis)
    return PartitionSpec(*(e if len(e) > 1 else (e[0] if e else None) for e in entries))


def param_shardings(abstract_boxed: Any, mesh: Mesh, inference: bool = False) -> Any:
    """NamedSharding tree for the unboxed parameters, from `jax.eval_shape(model.init, ...)`:
    by LOGICAL_AXIS_RULES (training), or with `inference` by INFERENCE_AXIS_RULES and `spread`,
    every weight split over every mesh axis it can use (nothing else needs the memory)."""
    specs = logical_axes(abstract_boxed)
    shapes = nn.meta.unbox(abstract_boxed)
    rules = INFERENCE_AXIS_RULES if inference else LOGICAL_AXIS_RULES

    def one(shape_struct, logical):
        shape = shape_struct.shape
        logical = tuple(logical) if logical is not None else (None,) * len(shape)
        spec = spec_for(shape, logical, mesh, rules)
        return NamedSharding(mesh, spread(spec, shape, mesh) if inference else spec)

    return jax.tree.map(
        one, shapes, specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None
    )


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a batch array: leading axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def place(tree: Any, shardings: Any, dtype: Any = None) -> Any:
    """Host arrays -> global jax arrays laid out by `shardings` (a matching tree), cast to
    `dtype` if given. Each process builds only its own devices' pieces, so this works across
    hosts and never materialises a cast copy of the whole tree."""

    def one(x, target: NamedSharding) -> jax.Array:
        if isinstance(x, jax.Array):  # already global (a trained state): let XLA move it
            moved = jax.device_put(x, target)  # then cast shard by shard, where it lies
            return moved if dtype is None else moved.astype(dtype)
        x = np.asarray(x)
        cast = lambda piece: piece if dtype is None else piece.astype(dtype)
        return jax.make_array_from_callback(x.shape, target, lambda i: cast(x[i]))

    return jax.tree.map(one, tree, shardings)


def bytes_per_device(tree: Any) -> dict[Any, int]:
    """{device: bytes of `tree`'s shards held there}, read from the arrays' shardings."""
    out: dict[Any, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def parse_mesh_shape(text: str, flag: str = "--mesh-shape") -> tuple[int, int, int]:
    """ "(1,8,1)", "1,8,1" or "-1,1,1" -> (data, fsdp, tensor); a UserError naming `flag`."""
    try:
        shape = tuple(int(x) for x in text.strip().strip("()").split(","))
    except ValueError:
        shape = ()
    if len(shape) != len(MESH_AXES):
        raise UserError(
            f"{flag} {text!r}: write three sizes data,fsdp,tensor, e.g. 1,8,1 or -1,1,1 "
            "(-1: all remaining devices)"
        )
    return shape  # type: ignore[return-value]


def mesh_context(mesh: Mesh | None) -> contextlib.AbstractContextManager:
    """Makes `mesh` the ambient (abstract) mesh while a function is traced, so that code deep in
    the models can read it (`jax.sharding.get_abstract_mesh()`): the flash kernels' shard_map and
    `constrain_activation`. Enter it inside the jitted function; None: a no-op."""
    if mesh is None:
        return contextlib.nullcontext()
    return jax.sharding.use_abstract_mesh(mesh.abstract_mesh)


def ambient_mesh() -> jax.sharding.AbstractMesh | None:
    """The ambient mesh (`mesh_context`) where code inside a traced function must lay arrays
    out for it; None without one, on one device, or inside a `shard_map` (arrays there are
    per-device already)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or jax.sharding.AxisType.Manual in mesh.axis_types:
        return None
    return mesh


def constrain_activation(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """`x` pinned to the rules' mesh axes for its logical axis names on the ambient mesh; a
    dimension named None, or that no rule's axis divides, is left to XLA (unconstrained, not
    replicated). A no-op without an ambient mesh, on one device, inside a shard_map, or where
    nothing is pinned (e.g. 3 rows on a 4-way batch axis).

    Args:
      x: an activation, e.g. hidden states [batch, seq, hidden].
      logical: one logical name (or None) per dimension, e.g. ("act_batch", None, None).
    """
    mesh = ambient_mesh()
    if mesh is None:
        return x
    spec = spec_for(x.shape, logical, mesh)
    if all(e is None for e in spec):
        return x
    free = PartitionSpec.UNCONSTRAINED  # unnamed, or no rule divides: XLA decides
    spec = PartitionSpec(*(free if e is None else e for e in spec))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


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
