"""Held-out readers: a teacher dataset's records in corpus order, with unit teacher vectors,
for evaluation (fidelity, retrieval, chunk alignment) and demos. They read single-text
datasets; a pair dataset is refused in one line."""

from __future__ import annotations

import pathlib

import numpy as np

from jasper_jax.data.pipeline import require_chunks
from jasper_jax.data.teacher_dataset import open_teacher_dataset, pair_width
from jasper_jax.errors import UserError
from jasper_jax.vectors import unit_rows


def _open_single(data_dir: str | pathlib.Path) -> tuple:
    """(source, metadata) of a single-text teacher dataset; UserError for a pair dataset."""
    source, metadata = open_teacher_dataset(data_dir)
    if pair_width(metadata) is not None:
        raise UserError(
            f"teacher dataset {str(data_dir)!r} is a pair dataset (rows of {pair_width(metadata)} "
            "texts), not held-out single texts; fix: build the held-out set as single texts "
            "(`jasper-jax teachers --corpus ...`)"
        )
    return source, metadata


def sorted_records(data_dir: str | pathlib.Path, limit: int | None = None) -> list[dict]:
    """All (or the first ``limit``) records of a single-text teacher dataset, in corpus order.

    Raises:
      UserError: ``data_dir`` holds a pair dataset.
    """
    source, _ = _open_single(data_dir)
    records = source.__getitems__(list(range(len(source))))
    records.sort(key=lambda record: int(record["index"]))
    return records[:limit] if limit else records


def load_eval_arrays(
    data_dir: str | pathlib.Path, limit: int | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """All (or the first ``limit`` by corpus row) texts with unit teacher vectors, for evaluation.

    Returns: (texts, teacher float32 [N, D] unit rows, index int64 [N]), sorted by ``index``.
    """
    records = sorted_records(data_dir, limit)
    texts = [record["text"].decode("utf-8") for record in records]
    teacher = unit_rows(np.stack([record["teacher"] for record in records]))
    index = np.array([record["index"] for record in records], dtype=np.int64)
    return texts, teacher, index


def load_eval_chunks(
    data_dir: str | pathlib.Path, limit: int | None = None
) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """Held-out chunks of a chunk-mode teacher dataset, documents in corpus order.

    Returns: (documents, character spans [n_i, 2] per document, unit chunk teacher vectors
    [sum n_i, D] float32 in the same order).
    """
    require_chunks(_open_single(data_dir)[1], data_dir)
    records = sorted_records(data_dir, limit)
    documents = [record["text"].decode("utf-8") for record in records]
    spans = [np.asarray(record["chunk_spans"], np.int64).reshape(-1, 2) for record in records]
    vectors = unit_rows(np.concatenate([record["chunk_teacher"] for record in records]))
    return documents, spans, vectors
