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
    temperature: float | jax.Array = 0.05,
    mask: jax.Array | None = None,
    symmetric: bool = False,
    negatives: jax.Array | None = None,
    negative_mask: jax.Array | None = None,
) -> jax.Array:
    """InfoNCE over cosine logits `cos / temperature`, with in-batch and hard negatives.

    Query i scores every valid positive of the batch (its own, `positive[i]`, is the target) and
    every valid hard negative of the batch (all rows' `negatives`, as sentence-transformers'
    MNRL does). `symmetric=True` averages that with the positive->query direction, which scores
    the batch's queries only (jina-v5: "d->q uses in-batch only"). Invalid rows are neither
    queries nor negatives. Returns a float32 scalar (nats), differentiable in `temperature`
    (pass a traced scalar to learn it, see `learned_temperature`).

    Args:
      query: [n, d].
      positive: [n, d].
      temperature: softmax temperature (> 0), a float or a scalar array.
      mask: optional [n] valid rows.
      negatives: optional [n, k, d] hard negatives of each row.
      negative_mask: optional [n, k] valid negatives (default: those of valid rows).
    """
    check_batch("info_nce_loss", query, positive)
    n = query.shape[0]
    weights = row_weights(mask, n)
    q, p = l2_normalize(query), l2_normalize(positive)
    columns, column_weights = p, weights
    if negatives is not None:
        if negatives.ndim != 3 or negatives.shape[0] != n or negatives.shape[2] != q.shape[1]:
            raise ValueError(
                f"info_nce_loss: negatives must be [{n}, k, {q.shape[1]}]; got {negatives.shape}"
            )
        k = negatives.shape[1]
        neg_weights = (
            weights[:, None] * jnp.ones((n, k), jnp.float32)
            if negative_mask is None
            else weights[:, None] * jnp.asarray(negative_mask).astype(jnp.float32)
        )
        columns = jnp.concatenate([p, l2_normalize(negatives).reshape(n * k, -1)], axis=0)
        column_weights = jnp.concatenate([weights, neg_weights.reshape(n * k)])
    logits = jnp.matmul(q, columns.T, precision=HIGHEST) / temperature
    forward = _nce_direction(logits, column_weights, weights)
    if not symmetric:
        return forward
    backward = _nce_direction(logits[:, :n].T, weights, weights)
    return 0.5 * (forward + backward)


def _nce_direction(logits: jax.Array, column_weights: jax.Array, row_weights_: jax.Array):
    """Mean over valid rows of -log softmax(logits)[i, i]; invalid columns are masked."""
    logits = jnp.where(column_weights[None, :] > 0, logits, _MASKED_LOGIT)
    target = jnp.diagonal(logits[:, : logits.shape[0]])
    nll = jax.nn.logsumexp(logits, axis=-1) - target
    return jnp.sum(row_weights_ * nll) / jnp.maximum(jnp.sum(row_weights_), 1.0)


def learned_temperature(log_temperature: jax.Array, low: float, high: float) -> jax.Array:
    """The temperature a trained `log_temperature` scalar stands for: `exp(.)` clipped to
    [low, high] (log-parametrised so it stays positive; clipped so it cannot collapse)."""
    return jnp.clip(jnp.exp(log_temperature), low, high)


def role_orthogonal_regularizer(
    query: jax.Array, document: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """jina-v5's GOR per role: the spread-out term over the batch's queries plus the one over
    its documents (positives), never mixing the two roles. [n, d] each; float32 scalar."""
    return global_orthogonal_regularizer(query, mask) + global_orthogonal_regularizer(
        document, mask
    )


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
