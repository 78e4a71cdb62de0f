"""grain input pipeline of pair batches (contrastive + distillation): a pair teacher dataset ->
shuffle(seed) -> global batches -> tokenize by role -> this process's rows.

Each row is a query, its positive and `k` hard negatives (``jasper_jax.data.pairs``), every
text with its stored teacher vector, so the distillation losses see all of them and InfoNCE
reads the structure::

    input_ids       int32   [pairs, m, L]   m = 2 + k: query, positive, negatives
    attention_mask  int32   [pairs, m, L]
    teacher         float32 [pairs, m, dim] renormalised to unit length
    index           int64   [pairs]         pair row in the corpus

Column 0 is tokenized with the query prompt, the others with the document prompt. With
``length_groups`` > 1 every batch is padded to its longest text rounded up to ``pad_multiple``
(a few lengths, one compile each), else to ``max_length``. The length is chosen on the whole
global batch before each process takes its rows, so all processes agree on it.
"""

from __future__ import annotations

import dataclasses
import pathlib

import grain
import numpy as np

from jasper_jax.data.length_groups import padded_length
from jasper_jax.data.pipeline import (
    TextBatchIterator,
    TokenizeBatch,
    check_batching,
    global_batch_loader,
)
from jasper_jax.data.teacher_dataset import open_teacher_dataset, pair_width
from jasper_jax.errors import UserError
from jasper_jax.vectors import unit_rows

PAIR_KEYS = ("input_ids", "attention_mask", "teacher")


def used_negatives(metadata: dict, wanted: int, data_dir) -> int:
    """Hard negatives per row to train with: all stored (`wanted` = -1) or the first `wanted`.

    Raises:
      UserError: `wanted` exceeds what the dataset stores.
    """
    stored = (pair_width(metadata) or 2) - 2
    if wanted > stored:
        raise UserError(
            f"config field data.negatives={wanted}, but the pair dataset {str(data_dir)!r} "
            f"holds {stored} hard negatives per row; fix: set data.negatives <= {stored} "
            "(-1 uses all), or rebuild it with more (`jasper-jax teachers --pairs ... "
            "--negatives K`)"
        )
    return stored if wanted < 0 else wanted


@dataclasses.dataclass
class TokenizePairs(grain.transforms.Map):
    """A global batch of pair records -> token and teacher arrays [pairs, m, ...] (module
    docstring); the first `width` columns of each row are kept."""

    tokenizer_dir: str
    max_length: int
    width: int
    query_prompt: str | None = None
    document_prompt: str | None = None
    fit_length: bool = True  # pad to the batch's longest text (rounded), not max_length
    pad_multiple: int = 16

    def __post_init__(self):
        self._query = TokenizeBatch(self.tokenizer_dir, self.max_length, self.query_prompt)
        self._document = TokenizeBatch(self.tokenizer_dir, self.max_length, self.document_prompt)

    def map(self, batch: dict) -> dict:
        texts = batch["texts"]
        # A record's texts are a list, which grain batches as one [pairs] array per column.
        texts = np.stack(texts, axis=1) if isinstance(texts, list | tuple) else np.asarray(texts)
        texts = texts[:, : self.width]
        rows, m = texts.shape
        encodings = [None] * (rows * m)
        by_role = ((self._query, [0]), (self._document, range(1, m)))
        for tokenizer, columns in by_role:
            for column in columns:
                for i, e in enumerate(tokenizer.encode(texts[:, column])):
                    encodings[i * m + column] = e
        ids = np.array([e.ids for e in encodings], np.int32).reshape(rows, m, -1)
        mask = np.array([e.attention_mask for e in encodings], np.int32).reshape(rows, m, -1)
        length = self.max_length
        if self.fit_length:
            length = padded_length(int(mask.sum(-1).max()), self.pad_multiple, self.max_length)
        return {
            "input_ids": ids[..., :length],
            "attention_mask": mask[..., :length],
            "teacher": unit_rows(np.asarray(batch["teacher"])[:, : self.width]),
            "index": np.asarray(batch["index"]).astype(np.int64),
            # Popped by TextBatchIterator into a counter; never reaches the train step.
            "truncated": np.array([len(e.overflowing) > 0 for e in encodings], np.int32).reshape(
                rows, m
            ),
        }


def make_pair_pipeline(
    data_dir: str | pathlib.Path,
    tokenizer_dir: str | pathlib.Path,
    *,
    batch_size: int,
    max_length: int,
    seed: int,
    negatives: int = -1,
    query_prompt: str | None = None,
    document_prompt: str | None = None,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    worker_count: int = 0,
    length_groups: int = 1,
    pad_multiple: int = 16,
) -> TextBatchIterator:
    """Iterator of pair batches (module docstring) for one process.

    Args:
      data_dir: a pair teacher dataset (``jasper-jax teachers --pairs``).
      tokenizer_dir: folder of the student's HF tokenizer.
      batch_size: the GLOBAL number of pair rows per step (each holds m texts).
      negatives: hard negatives per row to use (-1: all stored).
      length_groups: > 1 pads each batch to its longest text (rounded up to ``pad_multiple``).
      Others as :func:`jasper_jax.data.pipeline.make_text_pipeline`.
    """
    check_batching(
        batch_size, max_length, process_index, process_count, length_groups, pad_multiple
    )
    source, metadata = open_teacher_dataset(data_dir)
    if pair_width(metadata) is None:
        raise UserError(
            f"teacher dataset {str(data_dir)!r} holds single texts, not pairs; fix: build it "
            "with `jasper-jax teachers --pairs SPEC`, or set loss.infonce=0 for distillation"
        )
    width = 2 + used_negatives(metadata, negatives, data_dir)
    tokenize = TokenizePairs(
        str(tokenizer_dir),
        max_length,
        width,
        query_prompt or None,
        document_prompt or None,
        fit_length=length_groups > 1,
        pad_multiple=pad_multiple,
    )
    loader = global_batch_loader(
        source,
        f"pair teacher dataset {str(data_dir)!r}",
        batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        worker_count=worker_count,
        per_group=[tokenize],
    )
    return TextBatchIterator(iter(loader))


def flatten_pairs(batch: dict) -> dict:
    """A pair batch's texts as a single-text batch: [pairs, m, ...] -> [pairs * m, ...] for the
    token and teacher arrays (what head fitting and feature passes read)."""
    return {key: np.reshape(batch[key], (-1, *np.shape(batch[key])[2:])) for key in PAIR_KEYS}
