"""Parameter-free pooling of token states into one vector per text."""

from __future__ import annotations

import jax
import jax.numpy as jnp

POOLING_MODES = ("mean", "cls", "last")


def mean_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over non-padding tokens, in float32.

    Args:
      hidden: [batch, seq, hidden]; mask: [batch, seq], 1 for tokens, 0 for padding.
    Returns:
      [batch, hidden] float32; an all-padding row gives zeros (not NaN).
    """
    m = mask.astype(jnp.float32)[..., None]
    total = jnp.sum(hidden.astype(jnp.float32) * m, axis=1)
    return total / jnp.maximum(m.sum(axis=1), 1e-9)


def cls_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """The first token's state ([CLS] in BERT), float32 [batch, hidden]."""
    del mask
    return hidden[:, 0].astype(jnp.float32)


def last_token_pool(hidden: jax.Array, mask: jax.Array) -> jax.Array:
    """The state of each row's last non-padding token (right padding), float32 [batch, hidden]."""
    last = jnp.maximum(mask.astype(jnp.int32).sum(axis=1) - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)


def span_mean_pool(hidden: jax.Array, mask: jax.Array, spans: jax.Array) -> jax.Array:
    """Mean of the token states inside each span, in float32 (late chunking).

    Args:
      hidden: [batch, seq, hidden]; mask: [batch, seq], 1 for tokens, 0 for padding.
      spans: [batch, chunks, 2] int token ranges [start, end); padding positions inside a span
        are left out, so padding never leaks into a chunk.
    Returns:
      [batch, chunks, hidden] float32; an empty span gives zeros (not NaN).
    """
    positions = jnp.arange(hidden.shape[1])
    inside = (positions >= spans[..., :1]) & (positions < spans[..., 1:])  # [B, C, L]
    weights = (inside & mask[:, None, :].astype(bool)).astype(jnp.float32)
    total = jnp.einsum(
        "bcl,blh->bch", weights, hidden.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return total / jnp.maximum(weights.sum(-1, keepdims=True), 1e-9)


def pool(hidden: jax.Array, mask: jax.Array, mode: str) -> jax.Array:
    """Dispatches on `mode` in POOLING_MODES."""
    fns = {"mean": mean_pool, "cls": cls_pool, "last": last_token_pool}
    if mode not in fns:
        raise ValueError(f"pooling {mode!r} is not supported; choose one of {POOLING_MODES}")
    return fns[mode](hidden, mask)
