"""Compact vectors as they are stored: float16, scalar int8 / uint8, and packed sign bits.

The semantics are sentence-transformers' `quantize_embeddings` (tested equal, array for array):

- `float32` / `float16`: the float vectors in that dtype.
- `uint8`: per dimension, the calibration range [min, max] is cut into 255 equal steps; a value
  becomes floor((x - min) / step) clipped to 0..255 (a dimension whose range is a single value
  uses step 1). `int8` is the same number minus 128.
- `ubinary`: one bit per dimension, 1 where x > 0, packed 8 per byte with the first dimension
  in the highest bit (`np.packbits`); a width that is not a multiple of 8 is padded with 0 bits.
  `binary` is the same bytes minus 128 as int8 (the high bit flipped).

Packed bits are compared by Hamming distance (popcount of XOR); flipping the high bit of both
sides changes no XOR, so `binary` and `ubinary` give the same distances. `jasper-jax eval`
ranks its binary rows with `quantize(..., "ubinary")` and `hamming_distances` from here, so its
numbers are those of the vectors `jasper-jax encode --precision ubinary` writes.

All arithmetic is float32 (our vectors are float32); NaN/inf vectors or ranges are refused.
"""

from __future__ import annotations

import numpy as np

from jasper_jax.errors import UserError

PRECISIONS = ("float32", "float16", "int8", "uint8", "binary", "ubinary")
SCALAR = ("int8", "uint8")  # need calibration ranges
STORED_DTYPES = {
    "float32": np.float32,
    "float16": np.float16,
    "int8": np.int8,
    "uint8": np.uint8,
    "binary": np.int8,
    "ubinary": np.uint8,
}
STEPS = 255  # the range of a dimension is cut into this many steps: codes 0..255


def stored_width(precision: str, dim: int) -> int:
    """Columns of a stored row of a `dim`-wide vector: ceil(dim / 8) for packed bits, else dim."""
    check_precision(precision)
    return -(-dim // 8) if precision.endswith("binary") else dim


def bytes_per_vector(precision: str, dim: int) -> int:
    """Bytes one stored `dim`-wide vector takes (without the .npy header)."""
    return stored_width(precision, dim) * np.dtype(STORED_DTYPES[precision]).itemsize


def check_precision(precision: str) -> None:
    """Raises UserError naming the choices when `precision` is not one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r} is not supported; choose one of {PRECISIONS}")


def _finite_float32(x: np.ndarray, what: str) -> np.ndarray:
    """`x` as float32 [N, dim]; refuses integer input and NaN/inf (naming the first bad row)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise UserError(f"{what} have dtype {x.dtype}; quantize float vectors, not stored codes")
    if x.ndim != 2:
        raise UserError(f"{what} have shape {x.shape}; expected [N, dim]")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise UserError(
            f"{int(bad.sum())} of {len(x)} {what} hold NaN/inf (first: row "
            f"{int(np.argmax(bad))}); quantize finite vectors only"
        )
    return x.astype(np.float32, copy=False)


def check_ranges(ranges: np.ndarray, dim: int) -> np.ndarray:
    """Calibration ranges as float32 [2, dim] (row 0: per-dimension min, row 1: max).

    Raises:
      UserError: wrong shape, NaN/inf, or a min above its max.
    """
    ranges = np.asarray(ranges)
    if ranges.shape != (2, dim):
        raise UserError(
            f"calibration ranges have shape {ranges.shape}, the vectors are {dim}-wide "
            f"(expected (2, {dim})); calibrate this model and head again"
        )
    ranges = _finite_float32(ranges, "calibration range rows")
    if (ranges[0] > ranges[1]).any():
        first = int(np.argmax(ranges[0] > ranges[1]))
        raise UserError(
            f"calibration range of dimension {first} has min {ranges[0, first]} above max "
            f"{ranges[1, first]}; calibrate again"
        )
    return ranges


def ranges_of(vectors: np.ndarray) -> np.ndarray:
    """Per-dimension (min, max) of float vectors [N, dim] -> float32 [2, dim]."""
    x = _finite_float32(vectors, "calibration vectors")
    if len(x) == 0:
        raise UserError("no calibration vectors: calibrate on at least one text")
    return np.stack([x.min(axis=0), x.max(axis=0)])


def scalar_codes(x: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Codes 0..255 (float32 [N, dim]) of float32 vectors x [N, dim] under ranges [2, dim]."""
    low = ranges[0]
    step = (ranges[1] - low) / np.float32(STEPS)
    step = np.where(step == 0, np.float32(1), step)  # a constant dimension: every code 0
    return np.clip(np.floor((x - low) / step), 0, STEPS)


def pack_signs(x: np.ndarray) -> np.ndarray:
    """Sign bits of x [N, dim] (1 where x > 0) packed 8 per byte -> uint8 [N, ceil(dim / 8)]."""
    return np.packbits(x > 0, axis=-1)


def quantize(vectors: np.ndarray, precision: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """Float vectors [N, dim] -> stored rows in `precision` (module docstring).

    Args:
      vectors: [N, dim] float rows (unit length or not; computed in float32).
      precision: one of PRECISIONS.
      ranges: [2, dim] per-dimension (min, max), needed for int8 / uint8; values outside are
        clipped to the end codes.
    Returns:
      float32 / float16 [N, dim]; int8 / uint8 [N, dim]; binary int8 / ubinary uint8
      [N, ceil(dim / 8)].
    Raises:
      UserError: unknown precision, NaN/inf vectors or ranges, int8/uint8 without ranges.
    """
    check_precision(precision)
    x = _finite_float32(vectors, "vectors")
    if precision in ("float32", "float16"):
        return x.astype(STORED_DTYPES[precision])
    if precision.endswith("binary"):
        bits = pack_signs(x)
        return bits if precision == "ubinary" else (bits.astype(np.int16) - 128).astype(np.int8)
    if ranges is None:
        raise UserError(
            f"{precision} needs calibration ranges (per-dimension min and max); pass the "
            "ranges of a representative set of vectors"
        )
    codes = scalar_codes(x, check_ranges(ranges, x.shape[1]))
    return codes.astype(np.uint8) if precision == "uint8" else (codes - 128).astype(np.int8)


def hamming_distances(a: np.ndarray, b: np.ndarray, block: int = 64) -> np.ndarray:
    """Differing bits between packed rows: a [Na, B] x b [Nb, B] (uint8 `ubinary` or int8
    `binary`, both sides alike) -> int32 [Na, Nb]."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.dtype not in (np.uint8, np.int8) or a.shape[1:] != b.shape[1:]:
        raise UserError(
            f"packed rows {a.dtype}{list(a.shape)} and {b.dtype}{list(b.shape)} do not match; "
            "compare binary with binary or ubinary with ubinary of the same width"
        )
    a, b = a.view(np.uint8), b.view(np.uint8)  # binary's flipped high bit cancels in the XOR
    out = np.empty((len(a), len(b)), np.int32)
    for start in range(0, len(a), block):  # bounds the [block, Nb, B] temporary
        xor = np.bitwise_xor(a[start : start + block, None, :], b[None, :, :])
        out[start : start + block] = np.bitwise_count(xor).sum(axis=-1)
    return out


def unpack_signs(packed: np.ndarray, dim: int) -> np.ndarray:
    """Packed rows [N, ceil(dim / 8)] (`binary` or `ubinary`) -> bool [N, dim] (True: x > 0)."""
    bits = np.asarray(packed).view(np.uint8)
    if packed.dtype == np.int8:
        bits = bits ^ np.uint8(0x80)  # binary stores the bytes minus 128: undo the high bit
    return np.unpackbits(bits, axis=-1, count=dim).astype(bool)
