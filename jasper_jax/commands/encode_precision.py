"""`jasper-jax encode --precision P [--calibration TEXTS]`: the vectors as they are stored.

Texts, and with `--chunks` the document and chunk vectors alike; not `--images` (ranges are
measured on texts) nor the ONNX backends. Output `.npy` per precision (row i = line i;
`jasper_jax.precision` has the arithmetic):

    float32   float32 [N, dim]                 (the default; unit vectors)
    float16   float16 [N, dim]
    int8      int8    [N, dim]                 codes -128..127 of the calibration ranges
    uint8     uint8   [N, dim]                 codes 0..255
    binary    int8    [N, ceil(dim / 8)]       packed sign bits minus 128
    ubinary   uint8   [N, ceil(dim / 8)]       packed sign bits (first dim in the high bit)

int8 / uint8 need per-dimension ranges: `--calibration TEXTS` measures them for this run (the
texts encoded with the model's document prompt, as an export does), else the model folder's
`calibration.json` (`jasper-jax export --calibration`) is read. Without either the run stops
before loading the model, and nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import numpy as np

from jasper_jax.calibration import (
    CALIBRATION_FILE,
    Calibration,
    CalibrationTexts,
    calibrate,
    load_calibration,
)
from jasper_jax.commands.encode_io import read_texts
from jasper_jax.errors import UserError
from jasper_jax.precision import (
    PRECISIONS,
    SCALAR,
    STORED_DTYPES,
    bytes_per_vector,
    quantize,
    stored_width,
)

log = logging.getLogger(__name__)


def add_precision_args(p: argparse.ArgumentParser) -> None:
    """`--precision` and `--calibration` of `jasper-jax encode`."""
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float32",
        help="stored form of the vectors (sentence-transformers' quantize_embeddings): "
        "float16; int8/uint8 per-dimension codes (need calibration ranges); binary/ubinary "
        "sign bits packed 8 per byte [N, ceil(dim/8)]",
    )
    p.add_argument(
        "--calibration",
        default=None,
        metavar="TEXTS",
        help="int8/uint8: measure the ranges on these texts (one per line, encoded with the "
        "document prompt) instead of reading the model folder's calibration.json",
    )


@dataclasses.dataclass
class PrecisionPlan:
    """What `encode` stores, settled before the model is loaded.

    Attributes:
      precision: one of PRECISIONS.
      texts: texts to measure the ranges on (`--calibration`), or None.
      saved: the model folder's calibration (int8/uint8 without `--calibration`), or None.
      saved_path: where `saved` was read.
    """

    precision: str
    texts: CalibrationTexts | None = None
    saved: Calibration | None = None
    saved_path: Path | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PrecisionPlan:
        """Checks the flags and reads the calibration source; refuses before any compute.

        Raises:
          UserError: --precision other than float32 with --images; --calibration without
            int8/uint8 or with an ONNX backend; int8/uint8 with no calibration to use.
        """
        precision = getattr(args, "precision", "float32")
        calibration = getattr(args, "calibration", None)
        scalar = precision in SCALAR
        if calibration and not scalar:
            raise UserError(
                f"--calibration sets int8/uint8 ranges; --precision {precision} uses none: "
                "drop --calibration or pass --precision int8"
            )
        if precision != "float32" and args.images:
            raise UserError(
                f"--precision {precision} is supported for texts (and --chunks); drop --images, "
                "or encode in float32 and call jasper_jax.precision.quantize on the vectors"
            )
        if calibration and args.backend != "jax":
            # Ranges are measured with the JAX encoder, which an ONNX run does not load.
            raise UserError(
                f"--calibration measures ranges with --backend jax; with --backend "
                f"{args.backend} export the ranges once (`jasper-jax export ... --calibration "
                "TEXTS.txt`, read from the folder's calibration.json) or drop --backend"
            )
        if not scalar:
            return cls(precision)
        if calibration:
            return cls(
                precision, texts=CalibrationTexts.from_file(calibration, read_texts(calibration))
            )
        path = Path(args.model) / CALIBRATION_FILE
        if not path.is_file():
            raise UserError(
                f"--precision {precision} needs calibration ranges and {args.model} has no "
                f"{CALIBRATION_FILE}; pass --calibration TEXTS.txt (texts like those you will "
                "store, one per line) or export with `jasper-jax export ... --calibration "
                "TEXTS.txt` (nothing was written)"
            )
        return cls(precision, saved=load_calibration(path), saved_path=path)

    def check_head(self, head: str) -> None:
        """Refuses, before encoding, a head the saved calibration has no ranges for."""
        if self.saved is not None and head not in self.saved.ranges:
            self.saved.for_output(head, 0, str(self.saved_path))  # raises, naming the heads

    def ranges(self, encoder, head: str, dim: int, max_length: int | None) -> np.ndarray | None:
        """[2, dim] float32 ranges for `head` (measured now with `encoder`, or saved), or None
        when the precision needs none."""
        if self.texts is not None:
            measured = calibrate(encoder, self.texts, outputs=(head,), max_length=max_length)
            log.info(
                "%s ranges of %s from %d texts of %s (prompt %r)",
                self.precision,
                head,
                len(self.texts.texts),
                self.texts.file,
                measured.texts["prompt"],
            )
            return measured.ranges[head]
        if self.saved is not None:
            return self.saved.for_output(head, dim, str(self.saved_path))
        return None

    def store(self, vectors: np.ndarray, ranges: np.ndarray | None) -> np.ndarray:
        """float32 vectors [N, dim] -> the rows to write (module docstring)."""
        return quantize(vectors, self.precision, ranges)

    def describe(self, rows: int, dim: int) -> str:
        """'int8 (int8 [rows x width], B bytes per dim-d vector)' for the log line."""
        dtype = np.dtype(STORED_DTYPES[self.precision]).name
        width = stored_width(self.precision, dim)
        per = bytes_per_vector(self.precision, dim)
        return f"{self.precision} ({dtype} [{rows} x {width}], {per} bytes per {dim}-d vector)"
