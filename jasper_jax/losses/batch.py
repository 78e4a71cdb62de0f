"""What every loss does to a batch first: shape checks, row weights from the mask, and the
full-precision Gram matrix."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A TPU would otherwise multiply float32 in bf16 passes: an error of ~1e-3, not small next to the
# 0.015 ranking margin.
HIGHEST = jax.lax.Precision.HIGHEST


def gram(x: jax.Array) -> jax.Array:
    """`x: [batch, dim]` -> `[batch, batch]` inner products in full float32 precision."""
    return jnp.matmul(x, x.T, precision=HIGHEST)


def check_batch(name: str, student: jax.Array, teacher: jax.Array) -> None:
    """Raises unless `student` and `teacher` are [batch, dim] with the same batch."""
    if student.ndim != 2 or teacher.ndim != 2:
        raise ValueError(
            f"{name}: student and teacher must be [batch, dim]; got shapes {student.shape} and "
            f"{teacher.shape}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{name}: student batch {student.shape[0]} != teacher batch {teacher.shape[0]}; "
            "the rows must be the same texts in the same order"
        )


def row_weights(mask: jax.Array | None, batch: int) -> jax.Array:
    """`mask: [batch]` or None -> float32 `[batch]` of 0/1 weights."""
    if mask is None:
        return jnp.ones((batch,), jnp.float32)
    if mask.shape != (batch,):
        raise ValueError(f"mask must have shape ({batch},) (one flag per row); got {mask.shape}")
    return jnp.asarray(mask).astype(jnp.float32)
