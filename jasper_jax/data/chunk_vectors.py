"""Chunk-alignment targets: each document's chunks (character spans) and one teacher vector per
chunk, each chunk encoded by the teachers on its own (dewey_en_beta, PAPER 7).

A teacher-dataset build in chunk mode stores, beside the document vectors of a block of rows, one
``.chunks.npz`` holding::

    spans    int32   [n_chunks, 2]   character spans [start, end) in their document
    counts   int32   [n_rows]        chunks per document, in row order
    vectors  float   [n_chunks, D]   concatenated per-teacher unit vectors (as documents)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Callable, Sequence
from typing import BinaryIO

import numpy as np

from jasper_jax.data.chunking import ChunkingConfig, Span, check_spans, chunk_texts, plain_tokenizer
from jasper_jax.data.teachers import Teacher, compute_teacher_vectors, folder_fingerprints
from jasper_jax.errors import UserError
from jasper_jax.tokenizer import auto_tokenizer

SUFFIX = ".chunks.npz"


@dataclasses.dataclass(frozen=True)
class ChunkPayload:
    """Chunks of a block of consecutive documents (see module docstring for shapes)."""

    spans: np.ndarray
    counts: np.ndarray
    vectors: np.ndarray

    def per_document(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(spans [n_i, 2], vectors [n_i, D])] for each document of the block."""
        cuts = np.cumsum(self.counts)[:-1]
        return list(zip(np.split(self.spans, cuts), np.split(self.vectors, cuts), strict=True))

    def bad_documents(self) -> np.ndarray:
        """[n_rows] bool: a document with any non-finite chunk vector."""
        bad_chunk = ~np.isfinite(self.vectors).all(axis=1)
        owner = np.repeat(np.arange(len(self.counts)), self.counts)
        return np.bincount(owner[bad_chunk], minlength=len(self.counts)) > 0


def encode_chunks(
    texts: Sequence[str], spans: Sequence[Sequence[Span]], teachers: Sequence[Teacher], bar=None
) -> ChunkPayload:
    """Each chunk ``text[start:end]`` through every teacher (vectors as for documents)."""
    pieces = [text[a:b] for text, doc in zip(texts, spans, strict=True) for a, b in doc]
    if bar is not None:
        bar.total += len(pieces) * len(teachers)
        bar.refresh()
    dim = sum(t.dim for t in teachers)
    vectors = (
        compute_teacher_vectors(pieces, teachers, bar=bar)
        if pieces
        else np.zeros((0, dim), np.float32)
    )
    flat = np.array([span for doc in spans for span in doc], np.int32).reshape(-1, 2)
    return ChunkPayload(flat, np.array([len(doc) for doc in spans], np.int32), vectors)


def save_payload(file: BinaryIO, payload: ChunkPayload, dtype: type) -> None:
    """Writes the payload as .npz to an open binary file (the caller's ``atomic_file``, so
    that a payload file exists only when complete and no temporary outlives a failure)."""
    np.savez(
        file, spans=payload.spans, counts=payload.counts, vectors=payload.vectors.astype(dtype)
    )


def load_payload(path: pathlib.Path) -> ChunkPayload:
    """The payload saved by :func:`save_payload` at ``path``."""
    with np.load(path) as data:
        return ChunkPayload(data["spans"], data["counts"], data["vectors"])


def payload_path(rows_path: pathlib.Path) -> pathlib.Path:
    """The chunk file that goes with a block's document-vector file ``rows-A-B.npy``."""
    return rows_path.with_name(rows_path.name.removesuffix(".npy") + SUFFIX)


Chunker = Callable[[int, int], list[list[Span]]]


def make_chunker(
    texts: Sequence[str],
    chunking: ChunkingConfig | None,
    given: Sequence[Sequence[Span]] | None,
    tokenizer_folder: str | pathlib.Path | None,
) -> tuple[Chunker, dict]:
    """``(chunker(start, stop) -> spans of texts[start:stop], identity)`` for a build.

    Exactly one of ``chunking`` (split with the tokenizer in ``tokenizer_folder``) and ``given``
    (the caller's spans, one list per text, checked against each text) is set.
    """
    if (chunking is None) == (given is None):
        raise UserError("chunk mode needs exactly one of: a chunking (e.g. sentences:64), spans")
    if given is not None:
        if len(given) != len(texts):
            raise UserError(
                f"{len(given)} lists of chunk spans for {len(texts)} texts; fix: give one list "
                "per (non-empty) text, in corpus order"
            )
        for i, (text, spans) in enumerate(zip(texts, given, strict=True)):
            check_spans(np.asarray(spans, np.int64), len(text), f"text {i}")
            if not len(spans):
                raise UserError(f"text {i} has no chunk spans; fix: give at least one span")
        digest = hashlib.sha256(json.dumps([list(map(list, s)) for s in given]).encode())
        identity = {"chunking": "given", "spans_fingerprint": digest.hexdigest()}
        return (lambda start, stop: [list(map(tuple, s)) for s in given[start:stop]]), identity
    folder = pathlib.Path(tokenizer_folder)
    backend = plain_tokenizer(load_tokenizer(folder, "--chunk-tokenizer"))
    identity = {
        "chunking": chunking.spec(),
        "tokenizer": folder.name,
        "tokenizer_fingerprint": folder_fingerprints(folder)[1],
    }
    return (lambda start, stop: chunk_texts(texts[start:stop], backend, chunking)), identity


def load_tokenizer(folder: str | pathlib.Path, flag: str):
    """``AutoTokenizer`` of a local model folder; a missing or broken folder is one UserError
    line naming it (transformers would try the hub, then raise a multi-line OSError)."""
    folder = pathlib.Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(
            f"tokenizer folder {str(folder)!r} does not exist; fix: pass {flag} a local model "
            "folder (one holding tokenizer.json or vocab.txt)"
        )
    return auto_tokenizer(folder, f"pass {flag} a complete model folder")
