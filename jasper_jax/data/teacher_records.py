"""The records of a teacher dataset: the TFDS builder that turns finished blocks into them.

Single texts, one record per corpus text::

    text           Text
    teacher        [D] float32/16   concatenated per-teacher unit vectors
    index          int64            the text's row in the corpus
    chunk_spans    [n, 2] int32     chunk mode only: character spans of the text's chunks
    chunk_teacher  [n, D]           chunk mode only: each chunk's vector

Pair mode (metadata ``pairs``), one record per pair row of m = 2 + k texts, columns in
``PairRows`` order (query, positive, k negatives)::

    texts          Sequence(Text, length=m)
    teacher        [m, D] float32/16
    index          int64            the pair row

A record any of whose vectors is not finite (a NaN or all-zero teacher output) is left out
(:func:`rejected_records`).
"""

from __future__ import annotations

import bisect
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jasper_jax.data import chunk_vectors
from jasper_jax.data.teacher_plan import DTYPES, pair_width

Blocks = Sequence[tuple[int, pathlib.Path]]  # (first text, .npy of vectors [rows, D]) in order


class TeacherDataset(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of one split ``train`` of the records (module docstring)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(
        self,
        *,
        texts: Sequence[str],
        chunks: Blocks,
        metadata: dict,
        rejected: np.ndarray,
        **kwargs: Any,
    ):
        """texts: [num_texts] (pair mode: the columns flattened); chunks: the blocks of their
        vectors; rejected: [records] bool, the records left out."""
        self._texts, self._chunks, self._metadata = texts, chunks, metadata
        self._rejected = rejected
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=...) directly: dataset_info_from_configs needs package files.
        dtype, dim = DTYPES[self._metadata["dtype"]], self._metadata["dim"]
        width = pair_width(self._metadata)
        if width is None:
            features = {
                "text": tfds.features.Text(),
                "teacher": tfds.features.Tensor(shape=(dim,), dtype=dtype),
            }
        else:
            features = {
                "texts": tfds.features.Sequence(tfds.features.Text(), length=width),
                "teacher": tfds.features.Tensor(shape=(width, dim), dtype=dtype),
            }
        features["index"] = tfds.features.Scalar(dtype=np.int64)
        if "chunks" in self._metadata:
            features["chunk_spans"] = tfds.features.Tensor(shape=(None, 2), dtype=np.int32)
            features["chunk_teacher"] = tfds.features.Tensor(shape=(None, dim), dtype=dtype)
        features = tfds.features.FeaturesDict(features)
        metadata = tfds.core.MetadataDict(self._metadata)
        return tfds.core.DatasetInfo(builder=self, features=features, metadata=metadata)

    def _split_generators(self, dl_manager: Any) -> dict:
        del dl_manager
        if pair_width(self._metadata) is not None:
            return {"train": self._pair_examples()}
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        chunked = "chunks" in self._metadata
        for start, path in self._chunks:
            vectors = np.load(path, mmap_mode="r")
            if chunked:
                payload = chunk_vectors.load_payload(chunk_vectors.payload_path(path))
                per_document = payload.per_document()
            for offset, vector in enumerate(vectors):
                row = start + offset
                if self._rejected[row]:
                    continue
                example = {"text": self._texts[row], "teacher": vector, "index": row}
                if chunked:
                    example["chunk_spans"], example["chunk_teacher"] = per_document[offset]
                yield row, example

    def _pair_examples(self) -> Iterator[tuple[int, dict]]:
        """Pair records: row r gathers text c * n + r of every column c (blocks are read as
        memory maps, so a dataset larger than memory is combined too)."""
        width, starts = pair_width(self._metadata), [start for start, _ in self._chunks]
        rows = len(self._texts) // width
        blocks = [np.load(path, mmap_mode="r") for _, path in self._chunks]

        def vector(i: int) -> np.ndarray:
            k = bisect.bisect_right(starts, i) - 1
            return blocks[k][i - starts[k]]

        for row in np.flatnonzero(~self._rejected).tolist():
            flat = [column * rows + row for column in range(width)]
            vectors = np.stack([vector(i) for i in flat])
            yield row, {"texts": [self._texts[i] for i in flat], "teacher": vectors, "index": row}


def rejected_records(chunks: Blocks, identity: dict) -> tuple[np.ndarray, int]:
    """([records] bool: the records left out, chunks of the records kept).

    A text is bad when its vector is not finite (``normalise_rows`` makes a NaN or all-zero
    teacher output all-NaN) or, in chunk mode, any of its chunks' is; a record is left out when
    any of its texts is bad (pair mode: any of the m).
    """
    bad, counts = [], []
    for _, path in chunks:
        block_bad = ~np.isfinite(np.load(path, mmap_mode="r")).all(axis=1)
        if "chunks" in identity:
            payload = chunk_vectors.load_payload(chunk_vectors.payload_path(path))
            block_bad |= payload.bad_documents()
            counts.append(payload.counts)
        bad.append(block_bad)
    rejected = np.concatenate(bad)
    width = pair_width(identity)
    if width is not None:
        rejected = rejected.reshape(width, -1).any(axis=0)
    kept_chunks = int(np.concatenate(counts)[~rejected].sum()) if counts else 0
    return rejected, kept_chunks
