"""Parameter-free adaptive average pooling with PyTorch's `AdaptiveAvgPool1d/2d` semantics.

The Jasper vision bridge resizes SigLIP tokens [B, 729, 1152] to [B, 300, 1536] with
`torch.nn.AdaptiveAvgPool2d((300, 1536))`. PyTorch reads that 3-D tensor as unbatched
(C=B, H=729, W=1152), so the token axis and the channel axis are pooled independently (token
neighbours in raster order, not 2-D image neighbourhoods). For an axis of input size I and
output size O, output i is the mean of inputs `[floor(i*I/O), ceil((i+1)*I/O))`; for O > I the
windows overlap, which up-samples.

Each axis is one matrix product with a fixed averaging matrix built in NumPy at trace time:
static shapes, no parameters, one small einsum under `jit`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=64)
def adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Averaging matrix [in_size, out_size]: column i holds 1/len over input window i.

    Window i is `[floor(i*in/out), ceil((i+1)*in/out))`, torch's adaptive-pool rule.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"adaptive pool sizes must be >= 1, got in={in_size}, out={out_size}")
    i = np.arange(out_size)
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil division in integers, exact for any size
    rows = np.arange(in_size)[:, None]
    inside = (rows >= start[None, :]) & (rows < end[None, :])
    matrix = (inside / (end - start)[None, :]).astype(np.float32)
    matrix.setflags(write=False)  # cached and shared: keep callers from mutating it
    return matrix


def _floating_dtype(x: jax.Array) -> jnp.dtype:
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.dtype(jnp.float32)


def _pool_axis_f32(x: jax.Array, out_size: int, axis: int) -> jax.Array:
    """One axis resized to `out_size`, result in float32."""
    axis = axis % x.ndim
    in_size = x.shape[axis]
    if in_size == out_size:
        return x.astype(jnp.float32)
    matrix = jnp.asarray(adaptive_pool_matrix(in_size, out_size))
    # HIGHEST: on TPU the default f32 matmul precision would round the inputs to bf16.
    pooled = jnp.einsum(
        "...i,io->...o",
        jnp.moveaxis(x, axis, -1).astype(jnp.float32),
        matrix,
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )
    return jnp.moveaxis(pooled, -1, axis)


def adaptive_avg_pool_1d(x: jax.Array, out_size: int, axis: int = -1) -> jax.Array:
    """Adaptive average pool of one axis (torch `adaptive_avg_pool1d` along `axis`).

    Args:
      x: any shape [..., in_size, ...]; floating dtype (integers are promoted to float32).
      out_size: static output length of `axis`; smaller (pool) or larger (up-sample) than in.
      axis: the axis to resize.
    Returns:
      `x` with `axis` resized to `out_size`, in `x`'s floating dtype; sums accumulate in float32.
    """
    x = jnp.asarray(x)
    return _pool_axis_f32(x, out_size, axis).astype(_floating_dtype(x))


def adaptive_avg_pool_2d(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """Adaptive average pool of the last two axes (torch `AdaptiveAvgPool2d(out_hw)`).

    Works like torch on an unbatched [C, H, W] or batched [N, C, H, W] tensor, and on any number
    of leading axes. The 2-D window mean equals the row mean of column means, so the two axes
    are pooled one after the other.

    Args:
      x: [..., H, W] floating.
      out_hw: static (out_H, out_W), e.g. (300, 1536) for SigLIP [B, 729, 1152] -> [B, 300, 1536].
    Returns:
      [..., out_H, out_W] in `x`'s floating dtype.
    """
    if jnp.ndim(x) < 2:
        raise ValueError(f"adaptive_avg_pool_2d needs at least 2 axes, got shape {x.shape}")
    x = jnp.asarray(x)
    out_h, out_w = out_hw
    # Stay in float32 between the two axes so bf16 inputs are rounded once, at the end.
    pooled = _pool_axis_f32(_pool_axis_f32(x, out_h, axis=-2), out_w, axis=-1)
    return pooled.astype(_floating_dtype(x))
