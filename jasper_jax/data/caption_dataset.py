"""Caption dataset for stage 4: image, caption, and the frozen student's vectors of the caption.

The "teacher" of stage 4 is the stage-3 student itself: each caption is encoded once with our
`TextEncoder` into every head, and the vision tower learns to put the image there. The build is
resumable and atomic (`dataset_build.py`)::

    OUTPUT/dataset/           finished TFDS array_record dataset
    OUTPUT/_parts/plan.json   what is being built (student, heads, examples fingerprint)
    OUTPUT/_parts/rows-*.npy  finished blocks of caption vectors, each written atomically

A re-run keeps finished blocks; the dataset is built in a temp folder and renamed into place,
with `dataset/checksums.json` (size and SHA-256 of every file) checked on open. One build per
output folder at a time (its lock); the next build removes what a killed one left.
Features: `image` (encoded file bytes, PNG for generated images; decoded in the grain pipeline,
so TensorFlow is not needed), `caption`, `tag` (free text, e.g. "unseen" for held-out
combinations), `index`, and `targets/<head>` [dim] float32 unit vectors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from jasper_jax.data import images as images_lib
from jasper_jax.data import shapes
from jasper_jax.data.dataset_build import (
    DATASET_DIR,
    OUTPUT_LEFTOVERS,
    PARTS_DIR,
    PARTS_LEFTOVERS,
    PLAN,
    atomic_file,
    block_path,
    build_and_install,
    dataset_folder,
    finished_identity,
    open_tfds_folder,
    read_plan,
    refuse_foreign_dataset,
    verify_dataset_files,
    write_plan,
)
from jasper_jax.encode import TextEncoder
from jasper_jax.errors import UserError
from jasper_jax.locks import FolderLock, remove_leftovers
from jasper_jax.models.loading import LoadedModel, load_model
from jasper_jax.run_folder import is_workdir, load_workdir_model

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CaptionedImage:
    """image: encoded file bytes (PNG, JPEG, ...); tag: optional group name for evaluation."""

    image: bytes
    caption: str
    tag: str = ""


def shapes_examples(
    split: str, count: int, seed: int = 0, image_size: int = 64
) -> list[CaptionedImage]:
    """The synthetic shapes data (`shapes.py`); tag "unseen" marks held-out combinations."""
    return [
        CaptionedImage(images_lib.png_bytes(e.image), e.caption, "unseen" if e.unseen else "seen")
        for e in shapes.generate(split, count, seed, image_size)
    ]


def manifest_examples(path: str | pathlib.Path, min_side: int = 1) -> list[CaptionedImage]:
    """Examples from a JSONL file of {"image": path, "caption": text[, "tag": text]} lines.

    Image paths are relative to the manifest's folder. Every image is decoded here, before any
    encoding, so a bad file stops the build at once with its line number.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"caption manifest {path} does not exist; fix: check the path")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            image_path, caption = path.parent / row["image"], str(row["caption"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(
                f"{path} line {number}: expected a JSON object with 'image' and 'caption' ({e})"
            ) from e
        name = f"{image_path} ({path} line {number})"
        images_lib.open_rgb(image_path, name=name, min_side=min_side)
        out.append(CaptionedImage(image_path.read_bytes(), caption, str(row.get("tag", ""))))
    if not out:
        raise UserError(f"caption manifest {path} holds no examples")
    return out


class CaptionDataset(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for one split ``train`` of (image bytes, caption, tag, index, targets)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, examples, chunks, metadata: dict, **kwargs: Any):
        self._examples, self._chunks, self._metadata = examples, chunks, metadata
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        targets = {
            name: tfds.features.Tensor(shape=(dim,), dtype=np.float32)
            for name, dim in self._metadata["heads"].items()
        }
        features = tfds.features.FeaturesDict(
            {
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "caption": tfds.features.Text(),
                "tag": tfds.features.Text(),
                "index": tfds.features.Scalar(dtype=np.int64),
                "targets": tfds.features.FeaturesDict(targets),
            }
        )
        metadata = tfds.core.MetadataDict(self._metadata)
        return tfds.core.DatasetInfo(builder=self, features=features, metadata=metadata)

    def _split_generators(self, dl_manager: Any) -> dict:
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        heads = self._metadata["heads"]
        for start, path in self._chunks:
            vectors = np.load(path)
            for offset, row in enumerate(vectors):
                i = start + offset
                example = self._examples[i]
                targets, at = {}, 0
                for name, dim in heads.items():
                    targets[name] = row[at : at + dim]
                    at += dim
                yield (
                    i,
                    {
                        "image": example.image,
                        "caption": example.caption,
                        "tag": example.tag,
                        "index": i,
                        "targets": targets,
                    },
                )


def _fingerprint(examples: Sequence[CaptionedImage]) -> str:
    """SHA-256 of every example's image bytes, caption and tag (length-prefixed)."""
    digest = hashlib.sha256()
    for e in examples:
        for part in (e.image, e.caption.encode(), e.tag.encode()):
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(part)
    return digest.hexdigest()


def _student_identity(student: str | pathlib.Path) -> tuple[LoadedModel, dict]:
    """(LoadedModel, identity) of a training workdir (latest checkpoint) or an HF folder."""
    if is_workdir(student):
        model, meta = load_workdir_model(student)
        return model, {"student": str(pathlib.Path(student).resolve()), "step": meta["step"]}
    return load_model(student), {"student": str(pathlib.Path(student).resolve()), "step": None}


def _build_identity(
    examples: Sequence[CaptionedImage], student: str | pathlib.Path
) -> tuple[LoadedModel, dict[str, int], dict]:
    """(the student, its heads {name: dim}, the dataset's identity)."""
    if not examples:
        raise UserError("no (image, caption) examples given; fix: pass a manifest or --shapes N")
    model, student_id = _student_identity(student)
    heads = {name: d for name, d in zip(model.config.head_names, model.config.heads, strict=True)}
    if not heads:
        raise UserError(f"student {student} has no projection heads; fix: pass a stage-3 workdir")
    identity = {
        "format_version": FORMAT_VERSION,
        **student_id,
        "heads": heads,
        "examples_fingerprint": _fingerprint(examples),
        "num_examples": len(examples),
    }
    return model, heads, identity


def build_caption_dataset(
    examples: Sequence[CaptionedImage],
    student: str | pathlib.Path,
    output_dir: str | pathlib.Path,
    *,
    batch_size: int = 64,
    chunk_size: int = 2048,
    overwrite: bool = False,
    progress: bool = True,
) -> pathlib.Path:
    """Encode every caption with the student's heads and write the TFDS dataset.

    Args:
      examples: the (image, caption) pairs; their order is the `index` feature.
      student: the frozen text student, a training workdir (e.g. stage 3) or an HF folder.
      output_dir: build folder; its `dataset/` is returned.
      overwrite: replace a finished dataset built from other examples or another student.
    Raises:
      UserError: no examples, or an output folder holding a different dataset (without
        `overwrite`).
    """
    model, heads, identity = _build_identity(examples, student)
    output = pathlib.Path(output_dir).expanduser()
    target = output / DATASET_DIR
    with FolderLock(output, "captions", what="output folder", flag="--output"):
        refuse_foreign_dataset(target)
        old = finished_identity(output)
        if old == identity and not overwrite:
            log.info("%s already holds this caption dataset; nothing to do", output)
            verify_dataset_files(target, _rebuild_fix(output))
            return target
        if old is not None and not overwrite:
            raise UserError(
                f"output folder {str(output)!r} already holds a different caption dataset "
                "(other examples or student); fix: choose another --output or pass --overwrite"
            )
        remove_leftovers(output, OUTPUT_LEFTOVERS)
        parts = _prepare_parts(output, identity, overwrite)
        remove_leftovers(parts, PARTS_LEFTOVERS)
        n = len(examples)
        blocks = [(a, min(a + chunk_size, n)) for a in range(0, n, chunk_size)]
        _encode_blocks(parts, blocks, examples, model, tuple(heads), batch_size, progress)
        metadata = {"identity": identity, "heads": heads, "rows": n}
        chunks = [(a, block_path(parts, a, b)) for a, b in blocks]
        build_and_install(
            CaptionDataset, output, target, examples=examples, chunks=chunks, metadata=metadata
        )
        shutil.rmtree(parts, ignore_errors=True)
    return target


def _rebuild_fix(output: pathlib.Path) -> str:
    """The fix named in errors about a damaged caption dataset in ``output``."""
    return (
        f"rebuild it with `jasper-jax captions --output {output} ... --overwrite` (same "
        "student and images), or restore the folder from a backup"
    )


def _prepare_parts(output: pathlib.Path, identity: dict, overwrite: bool) -> pathlib.Path:
    """`_parts` for this identity; blocks of another build are discarded, never mixed."""
    parts = output / PARTS_DIR
    plan = parts / PLAN
    if plan.is_file() and read_plan(plan) != identity:  # damaged: discarded as another's
        log.info("discarding the unfinished build in %s (other examples or student)", output)
        shutil.rmtree(parts)
    elif overwrite and parts.exists():
        shutil.rmtree(parts)
    write_plan(parts, identity)
    return parts


def _encode_blocks(parts, blocks, examples, model, heads, batch_size, progress) -> None:
    """Caption vectors of every block not yet on disk: rows [n, sum of head dims] float32."""
    todo = [(a, b) for a, b in blocks if not block_path(parts, a, b).exists()]
    if not todo:
        return
    encoder = TextEncoder(model, batch_size=batch_size)
    total = sum(b - a for a, b in todo)
    with tqdm.tqdm(total=total, unit="caption", disable=not progress) as bar:
        for start, stop in todo:
            captions = [e.caption for e in examples[start:stop]]
            vectors = encoder.encode_heads(captions, heads=heads)
            rows = np.concatenate([vectors[h] for h in heads], axis=1).astype(np.float32)
            with atomic_file(block_path(parts, start, stop)) as f:  # exists only when complete
                np.save(f, rows)
            bar.update(stop - start)


def open_caption_dataset(data_dir: str | pathlib.Path) -> tuple[Any, dict]:
    """(random-access source, metadata) of a built caption dataset (output or dataset folder).

    `source[i]`: image bytes, caption bytes, tag bytes, index int64, targets {head: [dim]}.
    """
    path = pathlib.Path(data_dir).expanduser()
    folder = dataset_folder(path)
    if not (folder / "dataset_info.json").is_file():
        raise UserError(
            f"no caption dataset at {str(path)!r} (no dataset_info.json); fix: build one with "
            "`jasper-jax captions --student STAGE3_WORKDIR --output DIR ...`"
        )
    builder, source, metadata = open_tfds_folder(folder, _rebuild_fix(path))
    if "targets" not in builder.info.features:
        raise UserError(f"{folder} is not a caption dataset (no 'targets' feature)")
    return source, metadata


def load_caption_eval(data_dir: str | pathlib.Path, limit: int | None = None) -> dict[str, Any]:
    """The first `limit` examples by index: {"images": [bytes], "captions": [str], "tags":
    [str], "targets": {head: float32 [N, dim]}}."""
    source, _ = open_caption_dataset(data_dir)
    records = sorted(source.__getitems__(list(range(len(source)))), key=lambda r: int(r["index"]))
    records = records[:limit] if limit else records
    heads = list(records[0]["targets"])
    return {
        "images": [bytes(r["image"]) for r in records],
        "captions": [r["caption"].decode("utf-8") for r in records],
        "tags": [r["tag"].decode("utf-8") for r in records],
        "targets": {h: np.stack([r["targets"][h] for r in records]) for h in heads},
    }
