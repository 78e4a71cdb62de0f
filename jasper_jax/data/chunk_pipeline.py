"""grain steps for chunk-alignment batches: fixed-size chunk arrays, character -> token spans.

Per record (before batching) :class:`PadChunks` gives every document exactly ``max_chunks``
chunk slots; per batch (after tokenizing) :class:`TokenizeDocuments` finds each chunk's tokens.
A chunk is dropped (masked, counted) when it lies beyond ``max_chunks`` or is cut by
``max_length``. Batch keys added to the text batch::

    chunk_spans    int32   [batch, max_chunks, 2]   token ranges [start, end); 0 where masked
    chunk_mask     int32   [batch, max_chunks]      1 for a chunk to align
    chunk_teacher  float32 [batch, max_chunks, dim] unit teacher vectors of each chunk
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from jasper_jax.data.chunking import check_spans, token_spans
from jasper_jax.data.pipeline import TokenizeBatch, unit_rows
from jasper_jax.errors import UserError


def require_chunks(metadata: dict, data_dir) -> None:
    """Raises UserError unless the teacher dataset was built in chunk mode."""
    if "chunks" not in metadata:
        raise UserError(
            f"teacher dataset {str(data_dir)!r} has no chunk vectors, but chunk alignment is on "
            "(data.max_chunks > 0); fix: build it with `jasper-jax teachers ... --chunks "
            "sentences:64`, or set data.max_chunks=0"
        )


@dataclasses.dataclass
class PadChunks(grain.transforms.Map):
    """One record's variable-length chunks -> ``max_chunks`` slots (extra chunks dropped)."""

    max_chunks: int

    def map(self, record: dict) -> dict:
        spans = np.asarray(record["chunk_spans"], np.int32).reshape(-1, 2)
        vectors = np.asarray(record["chunk_teacher"])
        check_spans(
            spans, len(record["text"].decode("utf-8")), f"teacher row {int(record['index'])}"
        )
        n = min(len(spans), self.max_chunks)
        padded_spans = np.zeros((self.max_chunks, 2), np.int32)
        padded_vectors = np.zeros((self.max_chunks, vectors.shape[-1]), vectors.dtype)
        padded_spans[:n], padded_vectors[:n] = spans[:n], vectors[:n]
        return {
            **record,
            "chunk_spans": padded_spans,
            "chunk_teacher": padded_vectors,
            "chunk_count": np.int32(n),
            "chunks_total": np.int32(len(spans)),
        }


@dataclasses.dataclass
class TokenizeDocuments(TokenizeBatch):
    """:class:`TokenizeBatch` plus each chunk's token range in the tokenized document."""

    def map(self, batch: dict) -> dict:
        arrays, encodings = self.tokenize(batch)
        shift = len(self.prompt or "")
        slots = batch["chunk_spans"].shape[1]
        spans = np.zeros((len(encodings), slots, 2), np.int32)
        kept = np.zeros((len(encodings), slots), bool)
        for i, encoding in enumerate(encodings):
            n = int(batch["chunk_count"][i])
            real = np.array(encoding.attention_mask) * (1 - np.array(encoding.special_tokens_mask))
            spans[i, :n], kept[i, :n] = token_spans(
                batch["chunk_spans"][i, :n], encoding.offsets, real, shift
            )
        return {
            **arrays,
            "chunk_spans": spans,
            "chunk_mask": kept.astype(np.int32),
            "chunk_teacher": unit_rows(batch["chunk_teacher"]) * kept[..., None],
            # Popped by TextBatchIterator into counters; never reach the train step.
            "chunks_total": batch["chunks_total"].astype(np.int32),
            "chunks_dropped": (batch["chunks_total"] - kept.sum(axis=1)).astype(np.int32),
        }


def load_eval_chunks(
    data_dir, limit: int | None = None
) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """Held-out chunks of a chunk-mode teacher dataset, documents in corpus order.

    Returns: (documents, character spans [n_i, 2] per document, unit chunk teacher vectors
    [sum n_i, D] float32 in the same order).
    """
    from jasper_jax.data.pipeline import sorted_records
    from jasper_jax.data.teacher_dataset import open_teacher_dataset

    require_chunks(open_teacher_dataset(data_dir)[1], data_dir)
    records = sorted_records(data_dir, limit)
    documents = [record["text"].decode("utf-8") for record in records]
    spans = [np.asarray(record["chunk_spans"], np.int64).reshape(-1, 2) for record in records]
    vectors = unit_rows(np.concatenate([record["chunk_teacher"] for record in records]))
    return documents, spans, vectors
