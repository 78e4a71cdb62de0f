"""grain input pipeline for stage 4: caption dataset -> shuffle(seed) -> batch -> shard -> pixels.

Batches have a fixed shape (remainder dropped) so the train step compiles once::

    pixels          float32 [batch, image_size, image_size, 3]  SigLIP-normalised (mean/std 0.5)
    attention_mask  int32   [batch, image_tokens]  ones: the pooled image tokens the student sees
    target_<head>   float32 [batch, dim]  the frozen student's unit vector of the caption
    index           int64   [batch]

The iterator is grain's DataLoader iterator: `get_state()` / `set_state()` go into the
checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import grain
import numpy as np

from jasper_jax.data.caption_dataset import open_caption_dataset
from jasper_jax.data.images import load_pixels
from jasper_jax.data.pipeline import global_batch_loader
from jasper_jax.errors import UserError

TARGET_PREFIX = "target_"


def target_key(head: str) -> str:
    """The batch key of a head's target vectors, e.g. ``target_dense_256``."""
    return TARGET_PREFIX + head


@dataclasses.dataclass
class DecodeExample(grain.transforms.Map):
    """One record -> flat arrays: decoded, resized pixels and unit-length target vectors.

    Runs before batching: batching would turn the encoded images into a fixed-width bytes array
    (which drops trailing NUL bytes) and the nested targets would not split per process.
    """

    image_size: int
    heads: tuple[str, ...]

    def map(self, record: dict) -> dict:
        out = {
            "pixels": load_pixels(bytes(record["image"]), self.image_size),
            "index": np.int64(record["index"]),
        }
        for head in self.heads:
            target = np.asarray(record["targets"][head], np.float32)
            out[target_key(head)] = target / max(float(np.linalg.norm(target)), 1e-12)
        return out


@dataclasses.dataclass
class AddImageTokenMask(grain.transforms.Map):
    """The student attends to every pooled image token: attention_mask [batch, tokens] ones."""

    image_tokens: int

    def map(self, batch: dict) -> dict:
        rows = len(batch["index"])
        return {**batch, "attention_mask": np.ones((rows, self.image_tokens), np.int32)}


def make_image_pipeline(
    data_dir: str | pathlib.Path,
    *,
    batch_size: int,
    image_size: int,
    image_tokens: int,
    heads: tuple[str, ...],
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    worker_count: int = 0,
) -> Any:
    """Iterator of fixed-shape training batches (see module docstring) for one process.

    Args:
      data_dir: a caption dataset (`build_caption_dataset` output).
      batch_size: the GLOBAL batch; each process yields `batch_size // process_count` rows.
      heads: the heads whose caption vectors become targets (must be in the dataset).
      seed: shuffle seed, the same in every process.
      num_epochs: None repeats forever (each epoch reshuffled).
      worker_count: grain worker processes (0: in this process).
    """
    if batch_size < 1 or not 0 <= process_index < process_count or batch_size % process_count:
        raise UserError(
            f"bad pipeline settings batch_size={batch_size}, process {process_index} of "
            f"{process_count}; batch_size must be a positive multiple of the process count"
        )
    source, meta = open_caption_dataset(data_dir)
    missing = sorted(set(heads) - set(meta["heads"]))
    if missing:
        raise UserError(
            f"caption dataset {data_dir} has no caption vectors for heads {missing} (it has "
            f"{sorted(meta['heads'])}); fix: rebuild it with the student this stage starts from"
        )
    loader = global_batch_loader(
        source,
        f"caption dataset {str(data_dir)!r}",
        batch_size=batch_size,
        seed=seed,
        num_epochs=num_epochs,
        process_index=process_index,
        process_count=process_count,
        per_record=[DecodeExample(image_size, tuple(heads))],
        per_batch=[AddImageTokenMask(image_tokens)],
        worker_count=worker_count,
    )
    return iter(loader)
