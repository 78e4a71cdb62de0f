"""Distillation + contrastive objective on pair batches (jina-embeddings-v5's retrieval recipe).

A pair batch holds `n` rows of `m` texts (query, positive, `m - 2` hard negatives), each with its
teacher vector. The objective (PAPER 8, stage 2):

    total = distill(all n * m texts)                         [the Jasper terms, any weights]
          + w_nce * mean_heads InfoNCE(query -> positive, in-batch + hard negatives, tau)
          + w_gor * mean_heads (GOR(queries) + GOR(positives))  [spread-out, per role]

Distillation alone, contrastive alone or both follow from the weights. tau is fixed, or learned
as `exp(log_tau)` clipped to `LossConfig.temperature_range`; `log_tau` arrives with the student
vectors (one copy per row, so that row-wise transforms such as gradient-cache chunks and
per-device groups carry it; its mean is the value).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jasper_jax.losses.contrastive import (
    info_nce_loss,
    learned_temperature,
    role_orthogonal_regularizer,
)
from jasper_jax.losses.objective import LossConfig, distillation_loss

PAIRS, LOG_TEMPERATURE = "pairs", "log_temperature"


def temperature_of(config: LossConfig, log_temperature: jax.Array | None) -> jax.Array:
    """The InfoNCE temperature: learned (clipped) when `log_temperature` [rows] is given and
    `config.temperature_range` is set, else the fixed `config.infonce_temperature`."""
    if log_temperature is None or config.temperature_range is None:
        return jnp.asarray(config.infonce_temperature, jnp.float32)
    low, high = config.temperature_range
    return learned_temperature(jnp.mean(log_temperature), low, high)


def pair_loss(
    student: Mapping[str, jax.Array | Mapping[str, jax.Array]],
    teacher: jax.Array,
    config: LossConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total, metrics) float32 scalars for one pair batch (module docstring).

    Args:
      student: {"pairs": {head: [n, m, head_dim]}} and, for a learned temperature,
        {"log_temperature": [n]} (copies of one scalar).
      teacher: [n, m, teacher_dim] concatenated teacher vectors of every text.
      config: weights; `infonce_weight`/`gor_weight` act on the pair structure, the others
        are `distillation_loss`'s over all n * m texts.

    Metrics: the distillation metrics (when any distillation weight is > 0), `infonce` and
    `infonce/<head>`, `temperature` (when InfoNCE is on), `gor` (when on), `total`.
    """
    heads = student[PAIRS]
    n, m = teacher.shape[:2]
    metrics: dict[str, jax.Array] = {}
    total = jnp.zeros((), jnp.float32)
    if config.distills:
        flat = {name: x.reshape(n * m, x.shape[-1]) for name, x in heads.items()}
        plain = dataclasses.replace(config, infonce_weight=0.0, gor_weight=0.0)
        total, metrics = distillation_loss(flat, teacher.reshape(n * m, -1), plain)
    if config.infonce_weight > 0:
        tau = temperature_of(config, student.get(LOG_TEMPERATURE))
        for name, x in heads.items():
            negatives = x[:, 2:] if m > 2 else None
            metrics[f"infonce/{name}"] = info_nce_loss(
                x[:, 0], x[:, 1], tau, symmetric=config.infonce_symmetric, negatives=negatives
            )
        metrics["infonce"] = jnp.mean(jnp.stack([metrics[f"infonce/{h}"] for h in heads]))
        metrics["temperature"] = tau
        total += config.infonce_weight * metrics["infonce"]
    if config.gor_weight > 0:
        gors = [role_orthogonal_regularizer(x[:, 0], x[:, 1]) for x in heads.values()]
        metrics["gor"] = jnp.mean(jnp.stack(gors))
        total += config.gor_weight * metrics["gor"]
    metrics["total"] = total
    return total, metrics
