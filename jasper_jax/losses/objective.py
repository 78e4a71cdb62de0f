"""The combined Jasper objective: `LossConfig` (weights and options) and `distillation_loss`,
which sums the weighted terms over all heads and reports each as a metric."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jasper_jax.losses.contrastive import global_orthogonal_regularizer, info_nce_loss
from jasper_jax.losses.relative import check_dims, sims_and_resims
from jasper_jax.losses.similarity import cosine_loss


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
      temperature_range: (low, high) clip of a learned temperature (`pair_loss` with a
        `log_temperature` output); None: the temperature is fixed at `infonce_temperature`.
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
    temperature_range: tuple[float, float] | None = None
    gor_weight: float = 0.0
    block_size: int | None = None

    @property
    def distills(self) -> bool:
        """Whether any distillation term (cosine, similarity, relative similarity) is on."""
        return max(self.cosine_weight, self.similarity_weight, self.resim_weight) > 0

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
            dims = check_dims(mrl_dims, student.shape[-1])
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
        sims, resims = sims_and_resims(
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
