"""Row L2-normalisation, once per array library: NumPy for data and evaluation, jnp for models
and losses. Both floor the norm at 1e-12 (torch `F.normalize`'s default), so a zero row stays
zero instead of becoming NaN; unit-scale vectors never come near the floor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Smallest norm divided by: only an all-zero (or denormal) row reaches it.
NORM_FLOOR = 1e-12


def unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 copy of `x: [..., dim]` with unit-length last-axis rows (zero rows stay zero)."""
    x = np.asarray(x).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), NORM_FLOOR)


def l2_normalize(x: jax.Array, eps: float = NORM_FLOOR) -> jax.Array:
    """`x / max(||x||, eps)` over the last axis, in float32. `x: [..., dim]` -> `[..., dim]`.

    The max is taken on the squared norm before the square root, so the gradient at x = 0 is
    finite (not NaN), and any float dtype is accumulated in float32.
    """
    x = jnp.asarray(x, jnp.float32)
    squared = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))
