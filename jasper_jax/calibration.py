"""Calibration ranges for int8 / uint8 vectors: per output, the per-dimension min and max of the
float32 unit vectors of a set of texts, and how they were obtained.

Stored as `calibration.json` in an export folder (`jasper-jax export --calibration TEXTS`)::

    {"format": "jasper-jax calibration", "version": 1,
     "texts": {"file": "calib.txt", "count": 1000, "sha256": "...",
               "prompt_name": "document", "prompt": "passage: ", "max_length": 128},
     "outputs": {"pooled": {"dim": 32, "min": [...], "max": [...]},
                 "dense_384": {"dim": 384, "min": [...], "max": [...]}, ...}}

The texts are encoded with the model's document prompt (the prompt a corpus is stored with) by
our JAX encoder, every output in one pass; min and max are float32 values written as JSON
numbers (exact: every float32 is a double). `jasper-jax encode --precision int8` reads them
(or, with `encode --calibration TEXTS`, computes them the same way for one run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jasper_jax.errors import UserError
from jasper_jax.models.embedder import POOLED
from jasper_jax.precision import check_ranges, ranges_of

log = logging.getLogger(__name__)
CALIBRATION_FILE = "calibration.json"
FORMAT = "jasper-jax calibration"
VERSION = 1
FEW_TEXTS = 100  # fewer texts than this give narrow ranges: many values clip (warned)


@dataclasses.dataclass(frozen=True)
class CalibrationTexts:
    """The texts ranges are measured on, and where they came from (file name, SHA-256)."""

    texts: list[str]
    file: str
    sha256: str

    @classmethod
    def from_file(cls, path: str | Path, texts: list[str]) -> CalibrationTexts:
        """`texts`: the lines of `path` as `jasper-jax encode --input` reads them (the commands
        read them; this records their source and warns when they are few)."""
        if len(texts) < FEW_TEXTS:
            log.warning(
                "calibrating on %d texts from %s: ranges from fewer than %d texts are narrow "
                "and clip more values; use a few thousand texts like the ones you will store",
                len(texts),
                path,
                FEW_TEXTS,
            )
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        return cls(texts, Path(path).name, digest)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Per output name ("pooled", "dense_<dim>"): float32 [2, dim] ranges (row 0 min, row 1
    max); `texts`: what they were measured on (file, count, sha256, prompt_name, prompt,
    max_length)."""

    ranges: dict[str, np.ndarray]
    texts: dict[str, Any]

    def for_output(self, name: str, dim: int, where: str) -> np.ndarray:
        """The [2, dim] ranges of output `name`.

        Raises:
          UserError: no ranges for `name` (naming those present) or another width.
        """
        if name not in self.ranges:
            raise UserError(
                f"{where} holds calibration ranges for {sorted(self.ranges)}, not {name!r}; "
                f"pick one of those with --head, or calibrate again with --calibration TEXTS"
            )
        return check_ranges(self.ranges[name], dim)


def calibrate(
    encoder: Any,
    texts: CalibrationTexts,
    *,
    outputs: Sequence[str] | None = None,
    max_length: int | None = None,
) -> Calibration:
    """Encodes `texts` with the model's document prompt (every output in one pass, or only
    `outputs`) and returns their per-dimension ranges.

    Args:
      encoder: a `jasper_jax.encode.TextEncoder`.
      outputs: output names; None: the pooled vector and every head.
      max_length: tokens per text (None: the model's max length).
    """
    model = encoder.model
    names = tuple(outputs) if outputs else (POOLED, *model.config.head_names)
    prompt = model.prompts.get("document") or None
    vectors = encoder.encode_heads(
        texts.texts, heads=names, prompt=prompt, max_length=max_length, progress=True
    )
    record = {
        "file": texts.file,
        "count": len(texts.texts),
        "sha256": texts.sha256,
        "prompt_name": "document" if prompt else None,
        "prompt": prompt,
        "max_length": encoder.token_limit(max_length),
    }
    return Calibration({name: ranges_of(v) for name, v in vectors.items()}, record)


def save_calibration(path: str | Path, calibration: Calibration) -> None:
    """Writes `calibration` as the JSON of the module docstring (key-sorted, indented)."""
    outputs = {
        name: {"dim": int(r.shape[1]), "min": r[0].tolist(), "max": r[1].tolist()}
        for name, r in calibration.ranges.items()
    }
    payload = {"format": FORMAT, "version": VERSION, "texts": calibration.texts, "outputs": outputs}
    Path(path).write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def load_calibration(path: str | Path) -> Calibration:
    """Reads a `calibration.json`.

    Raises:
      UserError: unreadable, not this format, or ranges of the wrong shape / non-finite /
        min above max (the fix: export again with --calibration, or pass encode --calibration).
    """
    fix = "export again with --calibration TEXTS, or pass encode --calibration TEXTS"
    try:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        if payload.get("format") != FORMAT or payload.get("version") != VERSION:
            raise ValueError(f"not {FORMAT!r} version {VERSION}")
        ranges = {
            name: np.array([entry["min"], entry["max"]], np.float32)
            for name, entry in payload["outputs"].items()
        }
        dims = {name: int(entry["dim"]) for name, entry in payload["outputs"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"calibration file {path} is unreadable or damaged ({e}); {fix}") from e
    for name, r in ranges.items():
        try:
            check_ranges(r, dims[name])
        except UserError as e:
            raise UserError(f"calibration file {path}, output {name!r}: {e}") from e
    return Calibration(ranges, dict(payload.get("texts") or {}))


def write_export_calibration(
    folder: Path, model: Any, texts: CalibrationTexts, max_length: int
) -> dict[str, Any]:
    """Measures the ranges of every output of `model` (a `LoadedModel`) on `texts` with our
    JAX encoder and writes `folder/calibration.json`; returns its `texts` record."""
    from jasper_jax.encode import TextEncoder  # jax: only when an export calibrates

    calibration = calibrate(TextEncoder(model), texts, max_length=max_length)
    save_calibration(folder / CALIBRATION_FILE, calibration)
    return calibration.texts
