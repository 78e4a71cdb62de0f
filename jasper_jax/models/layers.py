"""Building blocks shared by the text encoders: dense, norms, attention core.

Every parameter carries logical axis names (see `jasper_jax.sharding`). Parameters are stored in
float32; `dtype` is the compute dtype (bf16 on accelerators). Softmax and norms run in float32.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jasper_jax.errors import UserError
from jasper_jax.sharding import constrain_activation

Dtype = jnp.dtype | type

# Per-layer activation rematerialisation (`nn.remat`), by name: what the forward pass keeps for
# the backward pass. "none": everything (no remat); "full": only each layer's inputs, the rest is
# recomputed; "dots": also the outputs of weight matmuls (projections, MLP), recomputing
# attention scores and elementwise ops. True/False mean "full"/"none".
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": None,  # nn.remat's default: nothing saveable
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def constrain_hidden(x: jax.Array) -> jax.Array:
    """Hidden states [batch, seq, hidden] with rows split as the `act_batch` rule says, on the
    ambient mesh (`sharding.constrain_activation`; a no-op without one)."""
    return constrain_activation(x, ("act_batch", None, None))


def partitioned(init: Callable, names: tuple[str | None, ...]) -> Callable:
    return nn.with_logical_partitioning(init, names)


class Dense(nn.Module):
    """`y = x @ kernel + bias`; kernel [in, out] (HF Linear weight transposed).

    Attributes:
      features: output width.
      axes: logical names of (in, out).
    """

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", partitioned(self.kernel_init, self.axes), (x.shape[-1], self.features)
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param(
                "bias", partitioned(nn.initializers.zeros, self.axes[1:]), (self.features,)
            )
            y = y + bias.astype(self.dtype)
        return y


class LayerNorm(nn.Module):
    """LayerNorm with `scale` (HF `weight`) and `bias`, computed in float32."""

    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (width,))
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("norm",)), (width,))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with `scale` (HF `weight`), computed in float32 as Qwen2 does."""

    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return (y * scale).astype(self.dtype)


def remat_policy_name(remat: bool | str) -> str:
    """ "none" | "full" | "dots" from a policy name or a bool (True = "full")."""
    if isinstance(remat, bool) or str(remat).lower() in ("true", "false"):
        return "full" if str(remat).lower() == "true" else "none"
    if remat not in REMAT_POLICIES:
        raise UserError(f"remat {remat!r}: choose one of {tuple(REMAT_POLICIES)} (or true/false)")
    return remat


def remat_layer(layer_cls: type, remat: bool | str, static_argnums: tuple[int, ...] = ()) -> type:
    """`layer_cls` wrapped in `nn.remat` with the named policy; unchanged for "none"."""
    name = remat_policy_name(remat)
    if name == "none":
        return layer_cls
    return nn.remat(layer_cls, policy=REMAT_POLICIES[name], static_argnums=static_argnums)


def attention_bias(attention_mask: jax.Array, causal: bool) -> jax.Array:
    """Additive bias [batch, 1, q_len, k_len]: 0 where a query may attend, -inf-like elsewhere.

    Args:
      attention_mask: [batch, seq], 1 for real tokens and 0 for padding.
      causal: also hide later positions (decoder-style attention).
    """
    allowed = attention_mask[:, None, None, :].astype(bool)
    if causal:
        seq = attention_mask.shape[-1]
        allowed = allowed & jnp.tril(jnp.ones((seq, seq), bool))[None, None]
    return jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, dtype: Dtype
) -> jax.Array:
    """Scaled dot-product attention with grouped key/value heads.

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, k_len, kv_heads, head_dim] with
        heads % kv_heads == 0 (GQA: each kv head serves heads // kv_heads query heads).
      bias: additive mask [batch|1, 1 or heads, q_len|1, k_len].
    Returns:
      [batch, q_len, heads, head_dim] in `dtype`.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    q = q.reshape(batch, q_len, kv_heads, group, head_dim)
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32)
    if bias.shape[1] == 1:
        bias = bias[:, :, None]
    else:  # per-head bias: query head h is (kv head h // group, member h % group)
        bias = bias.reshape(bias.shape[0], kv_heads, group, *bias.shape[2:])
    scores = scores / jnp.sqrt(jnp.float32(head_dim)) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
    return out.reshape(batch, q_len, heads, head_dim)
