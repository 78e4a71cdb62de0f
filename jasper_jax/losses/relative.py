"""The relative-similarity ("triplet") ranking loss over pairs of in-batch pairs: O(B^4) terms,
computed blockwise in bounded memory with a custom VJP; and its Matryoshka average."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jasper_jax.losses.batch import check_batch, gram, row_weights
from jasper_jax.losses.similarity import similarity_mse
from jasper_jax.vectors import l2_normalize

# Elements (over K student views) of one pair-of-pairs tile when no block_size is given: about
# 4 MiB of float32, which measured fastest on CPU (B=384: edge 1024 for K=1, 256-512 for K=4).
_TILE_ELEMENTS = 1 << 20


def _tile_plan(
    num_pairs: int, num_views: int, block_size: int | None
) -> tuple[int, np.ndarray, np.ndarray]:
    """Tile edge and the (row, col) start offsets of the upper-triangle tiles of [P, P]."""
    if block_size is None:
        block_size = max(128, int((_TILE_ELEMENTS / num_views) ** 0.5) // 128 * 128)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    tile = min(block_size, num_pairs)
    num_blocks = -(-num_pairs // tile)
    rows, cols = np.triu_indices(num_blocks)  # tiles below the diagonal hold no a < b terms
    return tile, (rows * tile).astype(np.int32), (cols * tile).astype(np.int32)


def _resim_tile(ps, pt, valid, r0, c0, tile: int, margin: float):
    """Pre-activations, labels and weights of tile rows [r0, r0+tile) x cols [c0, c0+tile).

    Row index a, column index b: `z[k, a, b] = y_ab * (ps[k, b] - ps[k, a]) + margin`,
    `y_ab = +1 if pt[b] < pt[a] else -1` (teacher ties -> -1, as the reference), and
    `weight_ab = 1` iff a < b and both pairs are valid (padding and masked rows are invalid).
    """
    cut = lambda x, start: jax.lax.dynamic_slice_in_dim(x, start, tile, axis=-1)
    ps_rows, ps_cols = cut(ps, r0), cut(ps, c0)  # [K, tile]
    pt_rows, pt_cols = cut(pt, r0), cut(pt, c0)  # [tile]
    index = jnp.arange(tile)
    upper = (r0 + index)[:, None] < (c0 + index)[None, :]
    weight = jnp.where(upper, cut(valid, r0)[:, None] * cut(valid, c0)[None, :], 0.0)
    # One teacher label per tile, shared by all K student score vectors.
    label = jnp.where(pt_cols[None, :] < pt_rows[:, None], 1.0, -1.0)
    z = label * (ps_cols[:, None, :] - ps_rows[:, :, None]) + margin  # [K, tile, tile]
    return z, label, weight


def _resim_sums(ps, pt, valid, margin: float, block_size: int | None, with_grad: bool):
    """Sum of hinge terms per student row of `ps: [K, P]`, and optionally their gradient.

    A `lax.scan` over the upper-triangle tiles keeps memory at O(K * tile^2 + K * P).
    Returns (`sums: [K]`, `grad: [K, P]` of the sums w.r.t. `ps`, or None).
    """
    num_rows, num_pairs = ps.shape
    tile, row_starts, col_starts = _tile_plan(num_pairs, num_rows, block_size)
    pad = (-num_pairs) % tile
    ps = jnp.pad(ps, ((0, 0), (0, pad)))
    pt, valid = jnp.pad(pt, (0, pad)), jnp.pad(valid, (0, pad))  # padded pairs are invalid

    def step(grad, starts):
        r0, c0 = starts
        z, label, weight = _resim_tile(ps, pt, valid, r0, c0, tile, margin)
        sums = jnp.sum(jax.nn.relu(z) * weight, axis=(1, 2))
        if with_grad:
            # d relu(y (s_b - s_a) + m) = y [z > 0] (ds_b - ds_a); relu'(0) = 0 as in jax.nn.relu.
            g = jnp.where(z > 0, label * weight, 0.0)
            grad = _add_at(grad, jnp.sum(g, axis=1), c0)
            grad = _add_at(grad, -jnp.sum(g, axis=2), r0)
        return grad, sums

    grad0 = jnp.zeros((num_rows, num_pairs + pad), jnp.float32) if with_grad else None
    grad, sums = jax.lax.scan(step, grad0, (jnp.asarray(row_starts), jnp.asarray(col_starts)))
    # Per-tile sums are summed at the end (pairwise) rather than in a running carry: less
    # float32 rounding over thousands of tiles.
    return jnp.sum(sums, axis=0), (grad[:, :num_pairs] if with_grad else None)


def _add_at(x: jax.Array, update: jax.Array, start) -> jax.Array:
    """`x[:, start:start + n] += update` for `update: [K, n]`."""
    current = jax.lax.dynamic_slice_in_dim(x, start, update.shape[1], axis=1)
    return jax.lax.dynamic_update_slice_in_dim(x, current + update, start, axis=1)


def _num_terms(valid: jax.Array) -> jax.Array:
    """Number of (a < b) pair-of-pair terms among the valid pairs, at least 1."""
    n = jnp.sum(valid)
    return jnp.maximum(n * (n - 1.0) / 2.0, 1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _resim_mean(ps, pt, valid, margin: float, block_size: int | None) -> jax.Array:
    """Mean hinge term per row of `ps: [K, P]` -> `[K]`; `pt, valid: [P]`."""
    sums, _ = _resim_sums(ps, pt, valid, margin, block_size, with_grad=False)
    return sums / _num_terms(valid)


def _resim_mean_fwd(ps, pt, valid, margin, block_size):
    # The gradient is accumulated in the same pass as the value, so the backward pass neither
    # stores per-tile residuals nor recomputes the tiles (one pass instead of forward + remat).
    sums, grad = _resim_sums(ps, pt, valid, margin, block_size, with_grad=True)
    n = _num_terms(valid)
    return sums / n, (grad / n, pt, valid)


def _resim_mean_bwd(margin, block_size, residuals, cotangent):
    grad, pt, valid = residuals
    # Teacher scores and validity are constants of the loss (stop_gradient semantics).
    return cotangent[:, None] * grad, jnp.zeros_like(pt), jnp.zeros_like(valid)


_resim_mean.defvjp(_resim_mean_fwd, _resim_mean_bwd)


def _pair_scores(sim: jax.Array) -> jax.Array:
    """`sim: [..., B, B]` -> strict upper triangle in row-major order `[..., B(B-1)/2]`."""
    rows, cols = np.triu_indices(sim.shape[-1], k=1)
    return sim[..., rows, cols]


def sims_and_resims(
    students: Sequence[jax.Array],
    teacher: jax.Array,
    mask: jax.Array | None,
    margin: float,
    block_size: int | None,
    with_resim: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """Similarity and relative-similarity losses of K student views against one teacher.

    The teacher similarity matrix and pair scores are computed once and the K relative-similarity
    losses run in one blockwise pass. `students`: K arrays [batch, d_k]; `teacher: [batch, D]`.
    Returns (`sim: [K]`, `resim: [K]`); resim is 0 without `with_resim` (weight 0: its O(B^4)
    pass is skipped).
    """
    for student in students:
        check_batch("similarity losses", student, teacher)
    batch = teacher.shape[0]
    weights = row_weights(mask, batch)
    t_sim = jax.lax.stop_gradient(gram(l2_normalize(teacher)))
    s_sims = jnp.stack([gram(l2_normalize(s)) for s in students])  # [K, B, B]
    sims = jax.vmap(similarity_mse, in_axes=(0, None, None))(s_sims, t_sim, weights)
    if batch < 3 or not with_resim:  # < 2 pairs: no pair-of-pairs terms; the loss is 0
        return sims, jnp.zeros_like(sims)
    valid = _pair_scores(weights[:, None] * weights[None, :])
    resims = _resim_mean(_pair_scores(s_sims), _pair_scores(t_sim), valid, margin, block_size)
    return sims, resims


def relative_similarity_loss(
    student: jax.Array,
    teacher: jax.Array,
    margin: float = 0.015,
    block_size: int | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """The reference's "triplet" ranking loss over pairs of in-batch pairs; a float32 scalar.

    With `p_s, p_t` the strict-upper-triangle cosine scores in row-major order (length
    P = B(B-1)/2), the loss is the mean over all a < b of `relu(y_ab * (p_s[b] - p_s[a]) +
    margin)`, `y_ab = +1 if p_t[b] - p_t[a] < 0 else -1` (teacher ties -> -1). It is 0 when there
    are no terms (B < 3, or fewer than 3 valid rows).

    The P x P matrix is never built: a scan visits its upper-triangle tiles of
    `block_size x block_size` (memory O(block_size^2 + P)), and a custom VJP accumulates the
    gradient in the same pass. Forward-mode and second-order differentiation are not supported.

    Args:
      student: [batch, student_dim].
      teacher: [batch, teacher_dim].
      margin: hinge margin, in cosine units.
      block_size: tile edge over pairs; any value >= 1 gives the same loss. None picks about
        1024 / sqrt(number of student views).
      mask: optional [batch] valid rows.
    """
    _, resims = sims_and_resims([student], teacher, mask, margin, block_size)
    return resims[0]


def check_dims(dims: Sequence[int], width: int) -> tuple[int, ...]:
    """Matryoshka prefix widths as a tuple of ints; raises unless non-empty and in [1, width]."""
    dims = tuple(int(d) for d in dims)
    if not dims:
        raise ValueError(
            "Matryoshka dims are empty; list at least one prefix width, e.g. (256, 512, "
            f"{width}) (an empty list would divide by zero)"
        )
    bad = [d for d in dims if not 1 <= d <= width]
    if bad:
        raise ValueError(f"Matryoshka dims {bad} are outside [1, {width}] (the student width)")
    return dims


def matryoshka_losses(
    student: jax.Array,
    teacher: jax.Array,
    dims: Sequence[int],
    margin: float = 0.015,
    block_size: int | None = None,
    mask: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Similarity and relative-similarity losses of Matryoshka prefixes, averaged over `dims`.

    For each d in `dims`, `student[:, :d]` is re-normalised and compared with the similarities of
    the full teacher (computed once). Returns float32 scalars (similarity, relative_similarity).

    Args:
      student: [batch, student_dim].
      teacher: [batch, teacher_dim].
      dims: prefix widths, each in [1, student_dim]; the full width counts only if listed.
      margin, block_size, mask: as in `relative_similarity_loss`.
    """
    dims = check_dims(dims, student.shape[-1])
    sims, resims = sims_and_resims(
        [student[:, :d] for d in dims], teacher, mask, margin, block_size
    )
    return jnp.mean(sims), jnp.mean(resims)
