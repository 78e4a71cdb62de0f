"""Quality under truncation and quantisation (as jina-embeddings-v5 reports it).

For every output of a model (each head, the pooled vector) and every Matryoshka prefix of it
(the first d dims, re-normalised), in float32 and binary-quantised (sign bits, as `encode
--precision ubinary` stores them) form: fidelity to the teacher target on held-out texts and the
retrieval scores of the WordNet task.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jasper_jax.evaluation import retrieval
from jasper_jax.fidelity import fidelity_metrics
from jasper_jax.precision import bytes_per_vector
from jasper_jax.vectors import unit_rows

PREFIX_DIMS = (32, 64, 128, 256, 512, 768, 1024, 2048, 4096)
QUANTS = ("float32", "binary")


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One output's vectors: held-out texts [N, d], queries [Q, d], documents [D, d]."""

    heldout: np.ndarray
    queries: np.ndarray
    documents: np.ndarray

    @property
    def dim(self) -> int:
        return self.heldout.shape[1]


def prefix_dims(dim: int) -> list[int]:
    """The Matryoshka prefixes evaluated for a `dim`-wide output: powers of two (and 768) below
    it, then `dim` itself."""
    return [d for d in PREFIX_DIMS if d < dim] + [dim]


def truncate(x: np.ndarray, dim: int) -> np.ndarray:
    """First `dim` columns of [N, D] rows, re-normalised to unit length."""
    return unit_rows(x[:, :dim])


def variant_metrics(
    enc: Encoded, dim: int, quant: str, target: np.ndarray, relevant: np.ndarray
) -> dict[str, float]:
    """Fidelity (vs target [N, T] unit rows) and retrieval scores of one (dim, quant) variant.

    Binary vectors enter fidelity as sign(x)/sqrt(d), whose cosines are 1 - 2 hamming / d; the
    mean cosine to the target is reported only for float vectors of the target's width.
    """
    held, queries, docs = (truncate(x, dim) for x in (enc.heldout, enc.queries, enc.documents))
    if quant == "binary":
        fid = fidelity_metrics(retrieval.sign_vectors(held), target)
        fid.pop("cosine", None)
        return {**fid, **retrieval.evaluate_binary(queries, docs, relevant)}
    return {**fidelity_metrics(held, target), **retrieval.evaluate_float(queries, docs, relevant)}


def robustness_rows(
    outputs: dict[str, Encoded], target: np.ndarray, relevant: np.ndarray
) -> list[dict]:
    """One row per (output, prefix dim, quantisation) with fidelity and retrieval metrics."""
    rows = []
    for name, enc in outputs.items():
        for dim in prefix_dims(enc.dim):
            for quant in QUANTS:
                metrics = variant_metrics(enc, dim, quant, target, relevant)
                rows.append(
                    {
                        "output": name,
                        "dim": dim,
                        "prefix": dim < enc.dim,
                        "quant": quant,
                        # eval's binary rows are the `encode --precision ubinary` bytes
                        "bytes": bytes_per_vector("ubinary" if quant == "binary" else quant, dim),
                        **metrics,
                    }
                )
    return rows
