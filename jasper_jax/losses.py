"""Distillation losses (SPEC section 2, PAPER sections 2 and 8) as pure functions of arrays.

Shared conventions:
- Inputs may be any float dtype; all arithmetic and accumulation is float32, and similarity
  matmuls use `Precision.HIGHEST` (a TPU would otherwise multiply float32 in bf16 passes, an error
  of ~1e-3 that is not small next to the 0.015 ranking margin).
- Every loss L2-normalises its inputs itself (epsilon-safe, like torch `F.normalize`).
- The teacher is a target: all teacher-side quantities are under `jax.lax.stop_gradient`.
- `mask: [batch]` (bool or 0/1) marks the valid rows of a fixed-shape (padded) batch. A masked
  loss equals the unmasked loss of the batch with the invalid rows removed. A term with nothing
  to average (e.g. relative similarity with fewer than 3 valid rows) is 0, never NaN.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
# Elements (over K student views) of one pair-of-pairs tile when no block_size is given: about
# 4 MiB of float32, which measured fastest on CPU (B=384: edge 1024 for K=1, 256-512 for K=4).
_TILE_ELEMENTS = 1 << 20
# Finite stand-in for -inf on masked logits: -inf would give NaN (inf - inf) on fully masked rows.
_MASKED_LOGIT = -1e9


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """`x / max(||x||, eps)` over the last axis, in float32. `x: [..., dim]` -> `[..., dim]`.

    The max is taken on the squared norm before the square root, so the gradient at x = 0 is 0
    rather than NaN.
    """
    x = jnp.asarray(x, jnp.float32)
    squared = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


def _gram(x: jax.Array) -> jax.Array:
    """`x: [batch, dim]` -> `[batch, batch]` inner products in full float32 precision."""
    return jnp.matmul(x, x.T, precision=_HIGHEST)


def _check_batch(name: str, student: jax.Array, teacher: jax.Array) -> None:
    if student.ndim != 2 or teacher.ndim != 2:
        raise ValueError(
            f"{name}: student and teacher must be [batch, dim]; got shapes {student.shape} and "
            f"{teacher.shape}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{name}: student batch {student.shape[0]} != teacher batch {teacher.shape[0]}; "
            "the rows must be the same texts in the same order"
        )


def _row_weights(mask: jax.Array | None, batch: int) -> jax.Array:
    """`mask: [batch]` or None -> float32 `[batch]` of 0/1 weights."""
    if mask is None:
        return jnp.ones((batch,), jnp.float32)
    if mask.shape != (batch,):
        raise ValueError(f"mask must have shape ({batch},) (one flag per row); got {mask.shape}")
    return jnp.asarray(mask).astype(jnp.float32)


def cosine_loss(student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean over valid rows of `1 - cos(s_i, t_i)`; a float32 scalar in [0, 2].

    Args:
      student: [batch, dim].
      teacher: [batch, dim], the same width (reduced heads use the similarity losses instead).
      mask: optional [batch] valid rows.
    """
    _check_batch("cosine_loss", student, teacher)
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"cosine_loss needs equal widths: student dim {student.shape[1]} != teacher dim "
            f"{teacher.shape[1]}; a head narrower than the teacher gets only the similarity and "
            "relative-similarity losses"
        )
    weights = _row_weights(mask, student.shape[0])
    s = l2_normalize(student)
    t = jax.lax.stop_gradient(l2_normalize(teacher))
    cos = jnp.sum(s * t, axis=-1)
    return jnp.sum(weights * (1.0 - cos)) / jnp.maximum(jnp.sum(weights), 1.0)


def _similarity_mse(s_sim: jax.Array, t_sim: jax.Array, weights: jax.Array) -> jax.Array:
    """Masked mean of `(s_sim - t_sim)^2` over valid [batch, batch] entries, diagonal included."""
    pair_weights = weights[:, None] * weights[None, :]
    return jnp.sum(pair_weights * jnp.square(s_sim - t_sim)) / jnp.maximum(
        jnp.sum(pair_weights), 1.0
    )


def similarity_loss(
    student: jax.Array, teacher: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """MSE between the in-batch cosine matrices `S S^T` and `T T^T`; a float32 scalar.

    The mean runs over all valid B x B entries including the (zero) diagonal, as the reference's
    `F.mse_loss`. Widths may differ.

    Args:
      student: [batch, student_dim].
      teacher: [batch, teacher_dim].
      mask: optional [batch] valid rows.
    """
    _check_batch("similarity_loss", student, teacher)
    weights = _row_weights(mask, student.shape[0])
    t_sim = jax.lax.stop_gradient(_gram(l2_normalize(teacher)))
    return _similarity_mse(_gram(l2_normalize(student)), t_sim, weights)


# --- relative similarity: the O(B^4) ranking loss, computed in bounded memory ------------------


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


def _sims_and_resims(
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
        _check_batch("similarity losses", student, teacher)
    batch = teacher.shape[0]
    weights = _row_weights(mask, batch)
    t_sim = jax.lax.stop_gradient(_gram(l2_normalize(teacher)))
    s_sims = jnp.stack([_gram(l2_normalize(s)) for s in students])  # [K, B, B]
    sims = jax.vmap(_similarity_mse, in_axes=(0, None, None))(s_sims, t_sim, weights)
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
    _, resims = _sims_and_resims([student], teacher, mask, margin, block_size)
    return resims[0]


def _check_dims(dims: Sequence[int], width: int) -> tuple[int, ...]:
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
    dims = _check_dims(dims, student.shape[-1])
    sims, resims = _sims_and_resims(
        [student[:, :d] for d in dims], teacher, mask, margin, block_size
    )
    return jnp.mean(sims), jnp.mean(resims)


def info_nce_loss(
    query: jax.Array,
    positive: jax.Array,
    temperature: float = 0.05,
    mask: jax.Array | None = None,
    symmetric: bool = False,
) -> jax.Array:
    """InfoNCE with in-batch negatives over cosine logits `q_i . p_j / temperature`.

    Row i's positive is `positive[i]`; every other valid positive is a negative. Invalid rows are
    neither queries nor negatives. `symmetric=True` averages the query->positive and
    positive->query directions. Returns a float32 scalar (nats).

    Args:
      query: [batch, dim].
      positive: [batch, dim].
      temperature: softmax temperature (> 0).
      mask: optional [batch] valid rows.
    """
    _check_batch("info_nce_loss", query, positive)
    weights = _row_weights(mask, query.shape[0])
    q, p = l2_normalize(query), l2_normalize(positive)
    logits = jnp.matmul(q, p.T, precision=_HIGHEST) / temperature

    def one_direction(logits: jax.Array) -> jax.Array:
        logits = jnp.where(weights[None, :] > 0, logits, _MASKED_LOGIT)
        nll = jax.nn.logsumexp(logits, axis=-1) - jnp.diagonal(logits)
        return jnp.sum(weights * nll) / jnp.maximum(jnp.sum(weights), 1.0)

    if symmetric:
        return 0.5 * (one_direction(logits) + one_direction(logits.T))
    return one_direction(logits)


def global_orthogonal_regularizer(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Spread-out second-moment term: mean over valid i != j of `cos(x_i, x_j)^2`.

    Pushes unrelated embeddings towards orthogonality (jina-v5 / EmbeddingGemma), which makes
    them more robust to binary quantisation. `x: [batch, dim]`; returns a float32 scalar, 0 when
    fewer than 2 rows are valid.
    """
    weights = _row_weights(mask, x.shape[0])
    pair_weights = weights[:, None] * weights[None, :] * (1.0 - jnp.eye(x.shape[0]))
    sim = _gram(l2_normalize(x))
    return jnp.sum(pair_weights * jnp.square(sim)) / jnp.maximum(jnp.sum(pair_weights), 1.0)


# --- the combined objective ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights and options of `distillation_loss` (defaults: the paper's lambda and margin).

    Attributes:
      cosine_weight, similarity_weight, resim_weight: lambda_1..3 of PAPER eq. (4).
      margin: relative-similarity hinge margin.
      mrl_dims: Matryoshka prefix widths for the full-width head (the reference code's mode);
        None uses the head's full width only.
      infonce_weight, infonce_temperature, infonce_symmetric: optional contrastive term on
        `pairs` (jina-v5); off at weight 0.
      gor_weight: optional global orthogonal regulariser on every head; off at weight 0.
      block_size: tile edge of the blockwise relative-similarity loss.
    """

    cosine_weight: float = 10.0
    similarity_weight: float = 200.0
    resim_weight: float = 20.0
    margin: float = 0.015
    mrl_dims: tuple[int, ...] | None = None
    infonce_weight: float = 0.0
    infonce_temperature: float = 0.05
    infonce_symmetric: bool = False
    gor_weight: float = 0.0
    block_size: int | None = None

    def __post_init__(self):
        nonnegative = ("cosine_weight", "similarity_weight", "resim_weight", "margin")
        for field in (*nonnegative, "infonce_weight", "gor_weight"):
            if getattr(self, field) < 0:
                raise ValueError(f"LossConfig.{field} must be >= 0; got {getattr(self, field)}")
        if self.infonce_temperature <= 0:
            raise ValueError(
                f"LossConfig.infonce_temperature must be > 0; got {self.infonce_temperature}"
            )
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"LossConfig.block_size must be >= 1; got {self.block_size}")
        if self.mrl_dims is not None:
            object.__setattr__(self, "mrl_dims", tuple(int(d) for d in self.mrl_dims))
            if not self.mrl_dims:
                raise ValueError("LossConfig.mrl_dims is empty; use None or list prefix widths")


def _head_views(
    student_heads: Mapping[str, jax.Array],
    teachers: Mapping[str, jax.Array],
    mrl_dims: tuple[int, ...] | None,
) -> dict[str, list[jax.Array]]:
    """Per head, the student arrays compared by similarity: MRL prefixes for full heads."""
    views = {}
    for name, student in student_heads.items():
        full = student.shape[-1] == teachers[name].shape[-1]
        if full and mrl_dims is not None:
            dims = _check_dims(mrl_dims, student.shape[-1])
            views[name] = [student[:, :d] for d in dims]
        else:
            views[name] = [student]
    return views


def _similarity_terms(views, teacher, teachers, mask, config) -> dict[str, tuple]:
    """Per head (mean sim, mean resim) over its views; one blockwise pass per distinct teacher."""
    # One teacher per head (stage 4) needs a pass per head; a shared teacher needs one pass.
    groups = [[name] for name in views] if isinstance(teacher, Mapping) else [list(views)]
    terms = {}
    for names in groups:
        flat = [v for name in names for v in views[name]]
        sims, resims = _sims_and_resims(
            flat,
            teachers[names[0]],
            mask,
            config.margin,
            config.block_size,
            with_resim=config.resim_weight > 0,
        )
        start = 0
        for name in names:
            stop = start + len(views[name])
            terms[name] = (jnp.mean(sims[start:stop]), jnp.mean(resims[start:stop]))
            start = stop
    return terms


def distillation_loss(
    student_heads: Mapping[str, jax.Array],
    teacher: jax.Array | Mapping[str, jax.Array],
    config: LossConfig = LossConfig(),
    mask: jax.Array | None = None,
    pairs: tuple[jax.Array, jax.Array] | None = None,
    pair_mask: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted Jasper objective over all heads; returns (total, metrics), float32 scalars.

    A head as wide as its teacher ("full") gets cosine + similarity + relative similarity; a
    narrower ("reduced") head gets similarity + relative similarity against the full teacher
    similarities. Heads combine as (PAPER 2.3, suggested stage-3 objective):

        total = w_cos * mean_{full heads} cos + mean_{all heads} (w_sim * sim + w_resim * resim)
                [+ w_nce * infonce(pairs)] [+ w_gor * mean_{all heads} gor]

    With one teacher per head (stage 4, every head full) this is the mean over heads of the three
    weighted losses. With `config.mrl_dims` a full head's sim/resim are the Matryoshka averages.

    Args:
      student_heads: head name -> [batch, head_dim] student vectors.
      teacher: [batch, teacher_dim] shared by all heads, or head name -> [batch, head_dim].
      config: weights and options.
      mask: optional [batch] valid rows of the distillation batch.
      pairs: (query [n, d], positive [n, d]) for the InfoNCE term; needed iff its weight > 0.
      pair_mask: optional [n] valid rows of `pairs`.

    Metrics: `cos/<head>` (full heads), `sim/<head>`, `resim/<head>`, `infonce`, `gor` (when
    their weights are > 0) unweighted, and `total`.
    """
    if not student_heads:
        raise ValueError("distillation_loss needs at least one student head; got none")
    teachers = teacher if isinstance(teacher, Mapping) else dict.fromkeys(student_heads, teacher)
    missing = sorted(set(student_heads) - set(teachers))
    if missing:
        raise ValueError(f"no teacher vectors for heads {missing}; teacher keys: {list(teachers)}")
    views = _head_views(student_heads, teachers, config.mrl_dims)
    metrics = {}
    cos_terms, head_terms = [], []
    for name, (sim, resim) in _similarity_terms(views, teacher, teachers, mask, config).items():
        student = student_heads[name]
        if student.shape[-1] == teachers[name].shape[-1]:
            metrics[f"cos/{name}"] = cosine_loss(student, teachers[name], mask)
            cos_terms.append(metrics[f"cos/{name}"])
        metrics[f"sim/{name}"], metrics[f"resim/{name}"] = sim, resim
        head_terms.append(config.similarity_weight * sim + config.resim_weight * resim)
    total = jnp.mean(jnp.stack(head_terms))
    if cos_terms:
        total += config.cosine_weight * jnp.mean(jnp.stack(cos_terms))
    total += _extra_terms(student_heads, config, mask, pairs, pair_mask, metrics)
    metrics["total"] = total
    return total, metrics


def _extra_terms(student_heads, config, mask, pairs, pair_mask, metrics) -> jax.Array:
    """Weighted InfoNCE and GOR terms (0 when off); records their metrics."""
    extra = jnp.zeros((), jnp.float32)
    if config.infonce_weight > 0:
        if pairs is None:
            raise ValueError(
                "LossConfig.infonce_weight > 0 but no `pairs=(query, positive)` were given; pass "
                "them or set infonce_weight=0"
            )
        metrics["infonce"] = info_nce_loss(
            *pairs, config.infonce_temperature, pair_mask, config.infonce_symmetric
        )
        extra += config.infonce_weight * metrics["infonce"]
    if config.gor_weight > 0:
        gors = [global_orthogonal_regularizer(x, mask) for x in student_heads.values()]
        metrics["gor"] = jnp.mean(jnp.stack(gors))
        extra += config.gor_weight * metrics["gor"]
    return extra
