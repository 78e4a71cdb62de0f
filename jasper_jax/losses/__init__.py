"""Distillation losses (SPEC section 2, PAPER sections 2 and 8) as pure functions of arrays.

Shared conventions:
- Inputs may be any float dtype; all arithmetic and accumulation is float32, and similarity
  matmuls use `Precision.HIGHEST` (a TPU would otherwise multiply float32 in bf16 passes, an error
  of ~1e-3 that is not small next to the 0.015 ranking margin).
- Every loss L2-normalises its inputs itself (`jasper_jax.vectors.l2_normalize`, epsilon-safe
  like torch `F.normalize`).
- The teacher is a target: all teacher-side quantities are under `jax.lax.stop_gradient`.
- `mask: [batch]` (bool or 0/1) marks the valid rows of a fixed-shape (padded) batch. A masked
  loss equals the unmasked loss of the batch with the invalid rows removed. A term with nothing
  to average (e.g. relative similarity with fewer than 3 valid rows) is 0, never NaN.

Modules: `similarity` (cosine, similarity MSE), `relative` (blockwise relative similarity and
its Matryoshka average), `contrastive` (InfoNCE, global orthogonal regulariser), `objective`
(`LossConfig`, `distillation_loss`), `batch` (shape checks, mask weights, Gram matrix).
"""

from jasper_jax.losses.contrastive import global_orthogonal_regularizer, info_nce_loss
from jasper_jax.losses.objective import LossConfig, distillation_loss
from jasper_jax.losses.relative import matryoshka_losses, relative_similarity_loss
from jasper_jax.losses.similarity import cosine_loss, similarity_loss

__all__ = [
    "LossConfig",
    "cosine_loss",
    "distillation_loss",
    "global_orthogonal_regularizer",
    "info_nce_loss",
    "matryoshka_losses",
    "relative_similarity_loss",
    "similarity_loss",
]
