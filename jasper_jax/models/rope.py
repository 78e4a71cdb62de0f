"""RoPE frequencies with Hugging Face's scaling types, so a Qwen2 student runs beyond its trained
length: "linear" (position interpolation), "dynamic" (NTK-aware base from the sequence length),
"yarn" (per-frequency interpolation ramp plus an attention temperature on cos/sin) and "llama3"
(wavelength-banded interpolation). Formulas follow transformers' `modeling_rope_utils`; the
tables are constants computed at trace time from the static sequence length.

Config strings (`model.rope_scaling`): "TYPE:FACTOR[:ORIGINAL_MAX]", e.g. "linear:4",
"dynamic:2", "yarn:4:32768", "llama3:8"; "none" removes the checkpoint's scaling.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jasper_jax.errors import UserError

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """One HF `rope_parameters` / `rope_scaling` entry (hashable: part of `Qwen2Config`).

    Attributes:
      rope_type: one of ROPE_TYPES.
      factor: how many times the trained length to reach.
      original_max_position_embeddings: the trained length (yarn, llama3); None means the
        model's `max_position_embeddings`, as HF assumes. "dynamic" uses
        `max_position_embeddings` as HF does.
      low_freq_factor, high_freq_factor: llama3's wavelength band edges.
      beta_fast, beta_slow, attention_factor, mscale, mscale_all_dim, truncate: yarn's ramp and
        temperature (attention_factor None: 0.1 ln(factor) + 1, or the mscale ratio).
    """

    rope_type: str
    factor: float
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise UserError(
                f"RoPE scaling type {self.rope_type!r} is not supported; supported: {ROPE_TYPES}"
            )
        if not self.factor or self.factor <= 0:
            raise UserError(f"RoPE scaling factor {self.factor!r} must be > 0")

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> RopeScaling | None:
        """From an HF config dict (`rope_scaling` and/or transformers-5 `rope_parameters`);
        None for plain RoPE."""
        params = {**(d.get("rope_parameters") or {}), **(d.get("rope_scaling") or {})}
        kind = params.get("rope_type", params.get("type", "default"))
        if kind in ("default", None):
            return None
        if kind not in ROPE_TYPES:
            raise UserError(
                f"RoPE scaling type {kind!r} in the HF config is not supported; supported: "
                f"default, {', '.join(ROPE_TYPES)}"
            )
        factor = params.get("factor")
        original = params.get("original_max_position_embeddings") or d.get(
            "original_max_position_embeddings"
        )
        if factor is None and kind == "yarn" and original:  # HF: the implied ratio
            factor = d["max_position_embeddings"] / original
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_type", "factor"}
        extra = {k: v for k, v in params.items() if k in names and v is not None}
        extra["original_max_position_embeddings"] = original
        return cls(rope_type=kind, factor=float(factor), **extra)

    def to_hf(self) -> dict[str, Any]:
        """The `rope_scaling` dict (read by transformers 4 and 5) with only the fields used."""
        keep = {
            "linear": (),
            "dynamic": (),
            "yarn": ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"),
            "llama3": ("low_freq_factor", "high_freq_factor"),
        }[self.rope_type]
        out: dict[str, Any] = {"rope_type": self.rope_type, "factor": self.factor}
        if self.rope_type in ("yarn", "llama3") and self.original_max_position_embeddings:
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        out.update({k: getattr(self, k) for k in keep if getattr(self, k) is not None})
        if self.rope_type == "yarn" and not self.truncate:
            out["truncate"] = False
        return out

    @classmethod
    def parse(cls, text: str) -> RopeScaling | None:
        """ "yarn:4:32768" -> RopeScaling; "none" -> None. Raises UserError naming the format."""
        if text.strip().lower() == "none":
            return None
        parts = text.split(":")
        try:
            if not 2 <= len(parts) <= 3:
                raise ValueError("expected 2 or 3 parts")
            original = int(parts[2]) if len(parts) == 3 else None
            return cls(parts[0].strip(), float(parts[1]), original)
        except ValueError as e:
            raise UserError(
                f"RoPE scaling {text!r}: write TYPE:FACTOR[:ORIGINAL_MAX] with TYPE one of "
                f"{ROPE_TYPES} (e.g. 'yarn:4:32768'), or 'none' ({e})"
            ) from e


def inverse_frequencies(
    head_dim: int,
    theta: float,
    scaling: RopeScaling | None,
    seq_len: int,
    max_position_embeddings: int,
) -> tuple[np.ndarray, float]:
    """(inv_freq [head_dim // 2] float32, attention scale on cos/sin) for a `seq_len` sequence.

    "dynamic" depends on `seq_len` (HF recomputes it from the longest position in the batch,
    positions 0..seq_len-1 here); the other types do not.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    base_inv = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return base_inv, 1.0
    factor = float(scaling.factor)
    if scaling.rope_type == "linear":
        return (base_inv / np.float32(factor)).astype(np.float32), 1.0
    if scaling.rope_type == "dynamic":
        length = max(seq_len, max_position_embeddings)
        stretch = factor * length / max_position_embeddings - (factor - 1)
        base = theta * stretch ** (head_dim / (head_dim - 2))
        return (1.0 / (base ** exponents.astype(np.float64))).astype(np.float32), 1.0
    original = scaling.original_max_position_embeddings or max_position_embeddings
    if scaling.rope_type == "llama3":
        return _llama3(base_inv.astype(np.float64), factor, original, scaling), 1.0
    return _yarn(head_dim, theta, factor, original, scaling)


def _llama3(inv: np.ndarray, factor: float, original: int, s: RopeScaling) -> np.ndarray:
    low_wavelen = original / s.low_freq_factor
    high_wavelen = original / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(head_dim, theta, factor, original, s: RopeScaling) -> tuple[np.ndarray, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.attention_factor
    if attention is None:
        if s.mscale and s.mscale_all_dim:
            attention = mscale(factor, s.mscale) / mscale(factor, s.mscale_all_dim)
        else:
            attention = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # HF: avoid a zero-width ramp
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp  # 1: keep the trained frequency, 0: interpolate by `factor`
    freqs = np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    inv = (1 / (factor * freqs)) * (1 - extrapolate) + (1 / freqs) * extrapolate
    return inv.astype(np.float32), float(attention)
