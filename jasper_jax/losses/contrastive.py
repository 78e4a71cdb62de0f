"""Optional extra terms (jina-v5, EmbeddingGemma): InfoNCE with in-batch negatives and the global
orthogonal regulariser."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jasper_jax.losses.batch import HIGHEST, check_batch, gram, row_weights
from jasper_jax.vectors import l2_normalize

# Finite stand-in for -inf on masked logits: -inf would give NaN (inf - inf) on fully masked rows.
_MASKED_LOGIT = -1e9


def info_nce_loss(
    query: jax.Array,
    positive: jax.Array,
    temperature: float = 0.05,
    mask: jax.Array | None = None,
    symmetric: bool = False,
) -> jax.Array:
    """InfoNCE with in-batch negatives over cosine logits `q_i . p_j / temperature`.

    Row i's positive is `positive[i]`; every other valid positive is a negative. Invalid rows are
    neither queries nor negatives. `symmetric=True` averages the query->positive and
    positive->query directions. Returns a float32 scalar (nats).

    Args:
      query: [batch, dim].
      positive: [batch, dim].
      temperature: softmax temperature (> 0).
      mask: optional [batch] valid rows.
    """
    check_batch("info_nce_loss", query, positive)
    weights = row_weights(mask, query.shape[0])
    q, p = l2_normalize(query), l2_normalize(positive)
    logits = jnp.matmul(q, p.T, precision=HIGHEST) / temperature

    def one_direction(logits: jax.Array) -> jax.Array:
        logits = jnp.where(weights[None, :] > 0, logits, _MASKED_LOGIT)
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits)
        return jnp.sum(weights * nll) / jnp.maximum(jnp.sum(weights), 1.0)

    if symmetric:
        return 0.5 * (one_direction(logits) + one_direction(logits.T))
    return one_direction(logits)


def global_orthogonal_regularizer(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Spread-out second-moment term: mean over valid i != j of `cos(x_i, x_j)^2`.

    Pushes unrelated embeddings towards orthogonality (jina-v5 / EmbeddingGemma), which makes
    them more robust to binary quantisation. `x: [batch, dim]`; returns a float32 scalar, 0 when
    fewer than 2 rows are valid.
    """
    weights = row_weights(mask, x.shape[0])
    pair_weights = weights[:, None] * weights[None, :] * (1.0 - jnp.eye(x.shape[0]))
    sim = gram(l2_normalize(x))
    return jnp.sum(pair_weights * jnp.square(sim)) / jnp.maximum(jnp.sum(pair_weights), 1.0)
