"""Chunk-alignment objective (dewey_en_beta, PAPER 7): one pass over a document gives its
document vector and one vector per chunk; both are distilled.

    total = distillation_loss(document vectors, document teacher)        (the stage's weights)
          + distillation_loss(valid chunk vectors, chunk teachers)       (chunk weights)

The chunk term treats every valid chunk of the batch as one row of a [B * C] batch, so its
similarity losses compare chunks across and within documents. dewey uses cosine + similarity
for chunks (no relative-similarity term): the embedded default's chunk weights follow it.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax

from jasper_jax.losses import LossConfig, distillation_loss

StudentOutputs = Mapping[str, Mapping[str, jax.Array]]


def flatten_chunks(x: jax.Array) -> jax.Array:
    """[batch, chunks, ...] -> [batch * chunks, ...], document-major."""
    return x.reshape(-1, *x.shape[2:])


def chunk_alignment_loss(
    student: StudentOutputs,
    teacher: Mapping[str, jax.Array],
    document_config: LossConfig,
    chunk_config: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total, metrics) of the document and chunk terms; float32 scalars.

    Args:
      student: {"document": {head: [B, d]}, "chunks": {head: [B, C, d]}}.
      teacher: {"document": [B, D], "chunks": [B, C, D], "chunk_mask": [B, C] (1 = valid)}.
      document_config, chunk_config: weights of the two terms.
    Metrics: the document term's (``cos/<head>``, ``sim/<head>``, ...) and the chunk term's with
    a ``chunk_`` prefix (``chunk_cos/<head>``, ...), plus ``total`` and ``chunks`` (valid count).
    """
    doc_total, metrics = distillation_loss(
        student["document"], teacher["document"], document_config
    )
    mask = flatten_chunks(teacher["chunk_mask"])
    chunk_total, chunk_metrics = distillation_loss(
        {name: flatten_chunks(v) for name, v in student["chunks"].items()},
        flatten_chunks(teacher["chunks"]),
        chunk_config,
        mask=mask,
    )
    metrics = {**metrics, **{f"chunk_{k}": v for k, v in chunk_metrics.items()}}
    metrics["total"] = doc_total + chunk_total
    metrics["chunks"] = mask.sum().astype(jax.numpy.float32)
    return metrics["total"], metrics
