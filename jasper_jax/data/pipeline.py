"""grain input pipeline of training batches: teacher dataset -> shuffle(seed) -> shard -> batch
-> tokenize.

Batches have a fixed shape (texts padded to ``max_length``, remainder dropped) so the train
step compiles once, or with ``length_groups`` > 1 one of a few lengths (``L`` <= max_length, a
multiple of ``pad_multiple``; see ``jasper_jax.data.length_groups``)::

    input_ids       int32   [batch, L]
    attention_mask  int32   [batch, L]
    teacher         float32 [batch, dim]   renormalised to unit length
    index           int64   [batch]        row of the text in the corpus

Chunk mode (``max_chunks`` > 0, a teacher dataset built with chunks; always ``L`` = max_length,
as the spans index it): per record :class:`PadChunks` gives every document exactly
``max_chunks`` chunk slots; per batch :class:`TokenizeDocuments` finds each chunk's tokens. A
chunk is dropped (masked, counted) when it lies beyond ``max_chunks`` or is cut by
``max_length``. Batch keys added::

    chunk_spans    int32   [batch, max_chunks, 2]   token ranges [start, end); 0 where masked
    chunk_mask     int32   [batch, max_chunks]      1 for a chunk to align
    chunk_teacher  float32 [batch, max_chunks, dim] unit teacher vectors of each chunk

The iterator's ``get_state()`` / ``set_state()`` are grain's DataLoader iterator state, so a
resumed run (state saved in its checkpoint) sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
import tokenizers

from jasper_jax.data.chunking import check_spans, token_spans
from jasper_jax.data.length_groups import GroupedBatches, SortByLength, groups_for
from jasper_jax.data.teacher_dataset import open_teacher_dataset
from jasper_jax.errors import UserError
from jasper_jax.tokenizer import auto_tokenizer
from jasper_jax.vectors import unit_rows


@dataclasses.dataclass
class TokenizeBatch(grain.transforms.Map):
    """Tokenize a batch of texts to fixed [batch, max_length] ids with the student tokenizer.

    Uses the fast (Rust) tokenizer behind the HF tokenizer, loaded lazily so that each grain
    worker process loads its own copy instead of unpickling one.
    """

    tokenizer_dir: str
    max_length: int
    prompt: str | None = None

    def __post_init__(self):
        self._backend = None

    def _tokenizer(self):
        if self._backend is None:
            self._backend = load_fixed_length_tokenizer(self.tokenizer_dir, self.max_length)
        return self._backend

    def map(self, batch: dict) -> dict:
        return self.tokenize(batch)[0]

    def encode(self, texts: np.ndarray) -> list:
        """texts (utf-8 bytes) [n] -> the tokenizers.Encoding of each, prompt included."""
        texts = [text.decode("utf-8") for text in texts]
        if self.prompt:
            texts = [self.prompt + text for text in texts]
        return self._tokenizer().encode_batch(texts)

    def token_counts(self, texts: np.ndarray) -> np.ndarray:
        """texts (utf-8 bytes) [n] -> int32 [n] tokens each keeps after truncation."""
        return np.array([sum(e.attention_mask) for e in self.encode(texts)], np.int32)

    def tokenize(self, batch: dict) -> tuple[dict, list]:
        """(the batch's arrays, the tokenizers.Encoding of each text)."""
        encodings = self.encode(batch["text"])
        arrays = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int32),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int32),
            "teacher": unit_rows(batch["teacher"]),
            "index": batch["index"].astype(np.int64),
            # Popped by TextBatchIterator into a counter; never reaches the train step.
            "truncated": np.array([len(e.overflowing) > 0 for e in encodings], dtype=np.int32),
        }
        if "pad_to" in batch:  # length-grouped batches (data.length_groups.SortByLength)
            arrays["pad_to"] = batch["pad_to"]
        return arrays, encodings


def load_fixed_length_tokenizer(tokenizer_dir: str | pathlib.Path, max_length: int):
    """The ``tokenizers.Tokenizer`` of ``AutoTokenizer.from_pretrained(tokenizer_dir)``, set to
    truncate and pad every text to exactly ``max_length`` tokens (special tokens included)."""
    hf = auto_tokenizer(
        tokenizer_dir, "pass the student model folder (with tokenizer.json or vocab files)"
    )
    if not hf.is_fast or hf.pad_token is None:
        raise UserError(
            f"tokenizer in {str(tokenizer_dir)!r} must be a fast tokenizer with a pad token"
        )
    # A copy, so the HF tokenizer object keeps its own settings.
    backend = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    backend.enable_truncation(max_length=max_length)
    backend.enable_padding(length=max_length, pad_id=hf.pad_token_id, pad_token=hf.pad_token)
    return backend


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


class TextBatchIterator(Iterator[dict]):
    """Wraps grain's DataLoader iterator; counts texts cut at ``max_length``.

    ``truncated_texts`` counts since this iterator was created (not saved in the state); in
    chunk mode ``chunks_dropped`` counts chunks left out (cut by ``max_length`` or over
    ``max_chunks``) and ``chunks_seen`` all chunks of the texts seen.
    """

    def __init__(self, loader_iterator: Any):
        self._iterator = loader_iterator
        self.truncated_texts = 0
        self.texts_seen = 0
        self.chunks_dropped = 0
        self.chunks_seen = 0

    def __iter__(self) -> TextBatchIterator:
        return self

    def __next__(self) -> dict:
        batch = dict(next(self._iterator))
        truncated = batch.pop("truncated")
        self.truncated_texts += int(truncated.sum())
        self.texts_seen += truncated.size
        if "chunks_dropped" in batch:
            self.chunks_dropped += int(batch.pop("chunks_dropped").sum())
            self.chunks_seen += int(batch.pop("chunks_total").sum())
        return batch

    def get_state(self) -> bytes:
        """Opaque grain state; store it in the checkpoint."""
        return self._iterator.get_state()

    def set_state(self, state: bytes) -> None:
        """Continue from a state returned by :meth:`get_state` of an identical pipeline."""
        self._iterator.set_state(state)


@dataclasses.dataclass
class TakeProcessRows(grain.transforms.Map):
    """Rows ``[i * B / P, (i + 1) * B / P)`` of a global batch: process i's share.

    Every process walks the same globally shuffled order, so the union of the processes' rows is
    exactly the batch one process would see, and in-batch losses over the gathered global batch
    do not depend on the number of hosts.
    """

    process_index: int
    process_count: int
    groups: int = 1  # the global batch is this many consecutive batches: take rows of each

    def map(self, batch: dict) -> dict:
        size = len(batch["index"]) // self.groups
        rows = size // self.process_count
        starts = np.arange(self.groups) * size + self.process_index * rows
        take = (starts[:, None] + np.arange(rows)).reshape(-1)
        return {key: value[take] for key, value in batch.items()}


def global_batch_loader(
    source: Any,
    what: str,
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None,
    process_index: int,
    process_count: int,
    per_record: list = (),
    per_batch: list = (),
    worker_count: int = 0,
    groups: int = 1,
    per_group: list = (),
) -> grain.DataLoader:
    """Seeded shuffle -> ``per_record`` maps -> global batches of ``batch_size`` -> this
    process's rows (:class:`TakeProcessRows`) -> ``per_batch`` maps. ``what`` names the data in
    the error raised when it holds less than one batch. With ``groups`` > 1 each item is
    ``groups`` global batches at once, passed through the ``per_group`` maps (on the whole
    global group) before the process takes its rows of each batch."""
    if len(source) < batch_size * groups:  # make_text_pipeline never asks for more
        raise UserError(
            f"{what} has {len(source)} rows: fewer than one batch of {batch_size}; fix: "
            "lower data.batch_size or add rows"
        )
    sampler = grain.samplers.IndexSampler(
        num_records=len(source), shuffle=True, seed=seed, num_epochs=num_epochs
    )
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[
            *per_record,
            grain.transforms.Batch(batch_size * groups, drop_remainder=True),
            *per_group,
            TakeProcessRows(process_index, process_count, groups),
            *per_batch,
        ],
        worker_count=worker_count,
    )


def make_text_pipeline(
    data_dir: str | pathlib.Path,
    tokenizer_dir: str | pathlib.Path,
    *,
    batch_size: int,
    max_length: int,
    seed: int,
    prompt: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    worker_count: int = 0,
    max_chunks: int = 0,
    length_groups: int = 1,
    pad_multiple: int = 16,
) -> TextBatchIterator:
    """Iterator of training batches (see module docstring) for one process.

    Args:
      data_dir: a (single-text) teacher dataset; pairs: ``pair_pipeline``.
      tokenizer_dir: folder of the student's HF tokenizer.
      batch_size: the GLOBAL batch (texts per step over all processes); each process yields
        ``batch_size // process_count`` rows of it.
      seed: shuffle seed; every process must pass the same one. prompt: prefixed to each text.
      process_index, process_count: e.g. ``jax.process_index()`` and ``jax.process_count()``;
        see :class:`TakeProcessRows`. Only this process's rows are tokenized.
      num_epochs: None repeats forever (each epoch reshuffled).
      worker_count: grain worker processes (0: in this process). Workers need the
        ``if __name__ == "__main__":`` guard in the calling script.
      max_chunks: > 0: chunk mode, at most this many chunks per document (module docstring).
      length_groups: > 1 draws that many batches at a time and regroups their texts by token
        count, each batch padded to its longest text rounded up to ``pad_multiple`` tokens
        (``jasper_jax.data.length_groups``); 1 pads every batch to ``max_length``.
    """
    check_batching(
        batch_size, max_length, process_index, process_count, length_groups, pad_multiple
    )
    source, metadata = open_teacher_dataset(data_dir)
    tokenize = _tokenize_step(metadata, data_dir, tokenizer_dir, max_length, prompt, max_chunks)
    # Documents with chunk spans keep fixed-length batches (their spans index max_length).
    groups = 1 if max_chunks else groups_for(len(source), batch_size, length_groups)
    sort = SortByLength(tokenize.token_counts, batch_size, pad_multiple, max_length, seed)
    loader = global_batch_loader(
        source,
        f"teacher dataset {str(data_dir)!r}",
        batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        per_record=[PadChunks(max_chunks)] if max_chunks else [],
        per_batch=[tokenize],
        worker_count=worker_count,
        groups=groups,
        per_group=[sort] if groups > 1 else [],
    )
    batches = iter(loader)
    if groups > 1:
        batches = GroupedBatches(batches, batch_size // process_count)
    return TextBatchIterator(batches)


def check_batching(
    batch_size, max_length, process_index, process_count, length_groups, pad_multiple
):
    """Raises UserError for pipeline settings that cannot make batches."""
    if (
        batch_size < 1
        or max_length < 2
        or not 0 <= process_index < process_count
        or batch_size % process_count
        or length_groups < 1
        or pad_multiple < 1
    ):
        raise UserError(
            f"bad pipeline settings batch_size={batch_size}, max_length={max_length}, "
            f"process {process_index} of {process_count}, length_groups={length_groups}, "
            f"pad_multiple={pad_multiple}; expected batch_size >= 1 and a multiple of the "
            "process count, max_length >= 2, 0 <= process_index < process_count, "
            "length_groups and pad_multiple >= 1"
        )


def _tokenize_step(metadata, data_dir, tokenizer_dir, max_length, prompt, max_chunks):
    """The per-batch tokenizer: :class:`TokenizeDocuments` in chunk mode (the dataset must have
    chunks), else :class:`TokenizeBatch`."""
    if not max_chunks:
        return TokenizeBatch(str(tokenizer_dir), max_length, prompt)
    require_chunks(metadata, data_dir)
    return TokenizeDocuments(str(tokenizer_dir), max_length, prompt)
