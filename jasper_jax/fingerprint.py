"""Fingerprints of array trees: one uint32 per array, computed where the arrays live.

A checkpoint records the fingerprint of every array it holds; a restore recomputes them and
compares, so bytes damaged on disk are found before they turn into NaN in training or into
silently wrong vectors. Each element's bits are mixed with its position (the murmur3
finaliser) and the mixed words are summed modulo 2**32: the sum is order-free, so a sharded
array reduces across devices and hosts without gathering, and any single changed element (or
two swapped ones) changes the result except with probability ~2**-32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ALGORITHM = "fmix32-position-sum-v1"


def _as_uint32(x: jax.Array) -> jax.Array:
    """The element bits of `x` as uint32 (narrower types zero-extended)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size == 2:
        return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    if size == 1:
        return jax.lax.bitcast_convert_type(x, jnp.uint8).astype(jnp.uint32)
    raise TypeError(f"no fingerprint for dtype {x.dtype}")


def _position(shape: tuple[int, ...]) -> jax.Array:
    """Row-major element index (mod 2**32) as an array of `shape`, built without a reshape so
    a sharded operand stays sharded."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
        index = index + iota * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def array_fingerprint(x: jax.Array) -> jax.Array:
    """uint32 scalar fingerprint of one array (any shape; float, int, bool or PRNG key)."""
    x = jnp.asarray(x) if not isinstance(x, jax.Array) else x
    h = _as_uint32(x) ^ (_position(x.shape) * jnp.uint32(0x9E3779B9))
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    h = h ^ (h >> 16)
    return jnp.sum(h, dtype=jnp.uint32)


@jax.jit
def _fingerprints(leaves: list) -> list:
    return [array_fingerprint(x) for x in leaves]


def path_name(path: tuple) -> str:
    """`params/encoder/w`, `opt_state/1/0/mu/...`: a leaf's key path with attribute, dict and
    sequence keys alike, so a dataclass state and its template-free restore (nested dicts)
    name each leaf the same."""
    parts = []
    for key in path:
        for attr in ("name", "key", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def tree_fingerprints(tree: Any) -> dict[str, int]:
    """{leaf path name: fingerprint} of every array leaf of `tree` (jax or numpy arrays)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = [path_name(path) for path, _ in flat]
    leaves = [leaf if isinstance(leaf, jax.Array) else np.asarray(leaf) for _, leaf in flat]
    values = jax.device_get(_fingerprints(leaves))
    return {name: int(v) for name, v in zip(names, values, strict=True)}


def mismatches(recorded: dict[str, int], actual: dict[str, int]) -> list[str]:
    """Key paths whose fingerprints differ, or that only one side has."""
    keys = sorted(set(recorded) | set(actual))
    return [k for k in keys if recorded.get(k) != actual.get(k)]
