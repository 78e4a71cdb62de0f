"""Closed-form projection heads (`model.head_init = "lstsq"`): ridge regression in one pass.

A head is linear on the features it reads (the pooled vector, `Embedder` output "head_input"),
so the head that best predicts the teacher target in least squares has a closed form. With
x~ = [x, 1] (the bias as a last input; x shifted by a fixed mean, see `Moments`), N train texts
give the moments

    G = sum_i x~_i x~_i^T   [(h+1), (h+1)]      C = sum_i x~_i t_i^T   [(h+1), D]

and the ridge solution M = [W; b] = (G + lam * I_h) ^ -1 C  (the bias is not shrunk), where
lam = ridge * trace(G_xx) / h makes `ridge` independent of N and of the feature scale.

The moments are sums over texts, so each batch adds its own on device: the batch is sharded
over the mesh's (data, fsdp) axes and across processes, XLA turns the sum into an all-reduce,
and every process ends with the same G and C. Only G and C ((h+1) x (h+1+D) floats: 75 MB for
the paper's 1536 -> 12288 head) come to the host, where the small solve runs in float64.

A reduced head (dim d < D) has no target of its own: its losses compare its similarities with
the teacher's. Its closed form takes the full head's map M and keeps the top-d principal
directions of the full head's predictions P = X~ M (uncentred: similarities are dot products):
the right singular vectors V_d of S^1/2 U^T M, where G = U S U^T, so the reduced head is
M V_d [(h+1), d].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from jasper_jax import sharding
from jasper_jax.errors import UserError
from jasper_jax.vectors import l2_normalize

_HIGHEST = jax.lax.Precision.HIGHEST  # TPU matmuls default to bf16 passes: a sum of 1e5 rows
# of products needs full float32.


@dataclasses.dataclass(frozen=True)
class Moments:
    """Sums over `count` texts of shifted features x - shift: gram [(h+1), (h+1)] and cross
    [(h+1), D], float64 on the host; shift [h] (zeros: plain sums).

    Embedding features share a large common direction; summing x x^T in float32 would bury
    the small directions the solve needs under rounding of that common part (and make the
    result depend on the order of the sum, i.e. on the mesh). Shifting by the first batch's
    mean removes it; the fitted map is the same, with the bias shifted back.
    """

    gram: np.ndarray
    cross: np.ndarray
    count: int
    shift: np.ndarray | None = None

    def shifted(self, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """[W; b] of a head on x as the same map on x - shift: [(h+1), D]."""
        offset = 0.0 if self.shift is None else self.shift @ kernel
        return np.concatenate([kernel, (bias + offset)[None]], axis=0)

    def unshifted(self, m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A map [(h+1), D] on x - shift as (kernel [h, D], bias [D]) on x."""
        kernel, bias = m[:-1], m[-1]
        return kernel, bias - (0.0 if self.shift is None else self.shift @ kernel)

    def feature_energy(self) -> float:
        """trace(X^T X) of the unshifted features."""
        h = self.gram.shape[0] - 1
        total = np.trace(self.gram[:h, :h])
        if self.shift is not None:
            total += 2 * self.shift @ self.gram[h, :h] + self.count * self.shift @ self.shift
        return float(total)


def _batch_moments(features: jax.Array, target: jax.Array, valid: jax.Array, shift: jax.Array):
    """features [B, h], target [B, D] (renormalised to unit rows), valid [B], shift [h] ->
    G, C, n of the shifted features."""
    x = features.astype(jnp.float32) - shift
    x = jnp.concatenate([x, jnp.ones((x.shape[0], 1), jnp.float32)], axis=1)
    x = x * valid[:, None].astype(jnp.float32)
    t = l2_normalize(target)
    gram = jnp.einsum("bi,bj->ij", x, x, precision=_HIGHEST)
    cross = jnp.einsum("bi,bd->id", x, t, precision=_HIGHEST)
    return gram, cross, jnp.sum(valid.astype(jnp.int32))


def accumulate_moments(
    features_fn: Callable[[Any, dict], jax.Array],
    params: Any,
    batches: Iterable[dict],
    mesh: jax.sharding.Mesh,
) -> Moments:
    """Sums the moments of every batch (global arrays sharded over the batch axes).

    Args:
      features_fn: (params, batch) -> [B, h] head inputs (jit-traceable).
      batches: dicts with "teacher" [B, D] and "attention_mask" [B, L] (rows with no token are
        padding and count for nothing), already placed on `mesh` as global arrays.
    """
    rep = sharding.replicated(mesh)

    @jax.jit
    def add(carry, params, batch, shift):
        valid = jnp.any(batch["attention_mask"] > 0, axis=1)
        gram, cross, n = _batch_moments(features_fn(params, batch), batch["teacher"], valid, shift)
        out = (carry[0] + gram, carry[1] + cross, carry[2] + n)
        return jax.lax.with_sharding_constraint(out, rep)

    @jax.jit
    def mean_features(params, batch):
        valid = jnp.any(batch["attention_mask"] > 0, axis=1).astype(jnp.float32)
        x = features_fn(params, batch).astype(jnp.float32)
        mean = jnp.sum(x * valid[:, None], axis=0) / jnp.maximum(jnp.sum(valid), 1.0)
        return jax.lax.with_sharding_constraint(mean, rep)

    carry, shift = None, None
    for batch in batches:
        if carry is None:
            shift = mean_features(params, batch)
            shapes = jax.eval_shape(
                lambda p, b, m: _batch_moments(
                    features_fn(p, b), b["teacher"], b["attention_mask"][:, 0], m
                ),
                params,
                batch,
                shift,
            )
            carry = jax.tree.map(lambda s: jax.device_put(jnp.zeros(s.shape, s.dtype), rep), shapes)
        carry = add(carry, params, batch, shift)
    if carry is None:
        raise UserError("model.head_init_texts: no training batch to fit the heads on")
    # Replicated: every process holds the whole sums on its own devices.
    gram, cross, n, shift = (np.asarray(x.addressable_data(0), np.float64) for x in (*carry, shift))
    return Moments(gram, cross, int(n), shift)


def ridge_heads(moments: Moments, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """The full head: (kernel [h, D], bias [D]) float64 minimising the ridge objective."""
    gram = moments.gram
    h = gram.shape[0] - 1
    lam = ridge * moments.feature_energy() / h
    shrink = np.full(h + 1, lam)
    shrink[h] = 0.0  # the bias is not shrunk (so the shift changes nothing but the bias)
    try:
        m = scipy.linalg.solve(gram + np.diag(shrink), moments.cross, assume_a="pos")
    except (np.linalg.LinAlgError, ValueError) as err:
        raise UserError(
            f"closed-form head fit failed ({err}) on {moments.count} texts; raise "
            "model.head_init_ridge or model.head_init_texts, or use model.head_init=random"
        ) from err
    return moments.unshifted(m)


def reduced_head(
    moments: Moments, kernel: np.ndarray, bias: np.ndarray, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """A `dim`-wide head from a full head (kernel [h, D], bias [D]): the top-`dim` principal
    directions of its predictions on the fitted texts. Returns (kernel [h, dim], bias [dim])."""
    m = moments.shifted(kernel, bias)
    rank = min(m.shape)
    if dim > rank:
        raise UserError(
            f"model.heads: a {dim}-d head cannot be fitted in closed form from {m.shape[0] - 1} "
            f"features and a {m.shape[1]}-d target (at most {rank}); use model.head_init=random"
        )
    # G = U S U^T is only semidefinite (unit features have one constant direction), so its
    # square root comes from eigh rather than a Cholesky factor: P^T P = (S^1/2 U^T M)^T (...).
    values, vectors = np.linalg.eigh(moments.gram)
    root = np.sqrt(np.clip(values, 0.0, None))[:, None] * vectors.T
    _, _, vt = np.linalg.svd(root @ m, full_matrices=False)
    return moments.unshifted(m @ vt[:dim].T)


def closed_form_heads(
    moments: Moments,
    dims: dict[str, int],
    teacher_dim: int,
    ridge: float,
    full_head: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """{head name: {"kernel", "bias"}} float32 for the heads named in `dims` ({name: dim}).

    The teacher-dim head is the ridge fit; narrower heads are reduced from `full_head` (the
    trained full head when it is not refitted) or else from the ridge fit.
    """
    refit = teacher_dim in dims.values() or full_head is None
    full = ridge_heads(moments, ridge) if refit else full_head
    out = {}
    for name, dim in dims.items():
        kernel, bias = full if dim == teacher_dim else reduced_head(moments, *full, dim)
        out[name] = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}
    return out
