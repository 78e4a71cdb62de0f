"""Pointwise and in-batch similarity losses: cosine to the teacher, and the MSE between the
student's and the teacher's cosine matrices."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jasper_jax.losses.batch import check_batch, gram, row_weights
from jasper_jax.vectors import l2_normalize


def cosine_loss(student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean over valid rows of `1 - cos(s_i, t_i)`; a float32 scalar in [0, 2].

    Args:
      student: [batch, dim].
      teacher: [batch, dim], the same width (reduced heads use the similarity losses instead).
      mask: optional [batch] valid rows.
    """
    check_batch("cosine_loss", student, teacher)
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"cosine_loss needs equal widths: student dim {student.shape[1]} != teacher dim "
            f"{teacher.shape[1]}; a head narrower than the teacher gets only the similarity and "
            "relative-similarity losses"
        )
    weights = row_weights(mask, student.shape[0])
    s = l2_normalize(student)
    t = jax.lax.stop_gradient(l2_normalize(teacher))
    cos = jnp.sum(s * t, axis=-1)
    return jnp.sum(weights * (1.0 - cos)) / jnp.maximum(jnp.sum(weights), 1.0)


def similarity_mse(s_sim: jax.Array, t_sim: jax.Array, weights: jax.Array) -> jax.Array:
    """Masked mean of `(s_sim - t_sim)^2` over valid [batch, batch] entries, diagonal included.

    `weights: [batch]` 0/1 row weights; an entry counts when both its rows are valid.
    """
    pair_weights = weights[:, None] * weights[None, :]
    return jnp.sum(pair_weights * jnp.square(s_sim - t_sim)) / jnp.maximum(
        jnp.sum(pair_weights), 1.0
    )


def similarity_loss(
    student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """MSE between the in-batch cosine matrices `S S^T` and `T T^T`; a float32 scalar.

    The mean runs over all valid B x B entries including the (zero) diagonal, as the reference's
    `F.mse_loss`. Widths may differ.

    Args:
      student: [batch, student_dim].
      teacher: [batch, teacher_dim].
      mask: optional [batch] valid rows.
    """
    check_batch("similarity_loss", student, teacher)
    weights = row_weights(mask, student.shape[0])
    t_sim = jax.lax.stop_gradient(gram(l2_normalize(teacher)))
    return similarity_mse(gram(l2_normalize(student)), t_sim, weights)
