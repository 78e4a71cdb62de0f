"""NV-Embed's latent-attention layer (arXiv 2405.17428, section 3.2), HF-named.

Every token's final hidden state is a query over a trained array of latents (keys and values
both come from the latents), followed by a GEGLU MLP; both sub-blocks normalise their input first
(LayerNorm) and add it back (residual). The result is still one vector per token; NV-Embed then
takes their mean over the pool mask (the text's tokens without the instruction's) and normalises
it to unit length, which `Embedder` does with `pooling="mean"`.

Parameter names mirror the checkpoint's `latent_attention_model.*` tensors, so `hf_io` converts
them one to one: Flax `cross_attend_blocks_0/fn/to_q/kernel` is HF
`cross_attend_blocks.0.fn.to_q.weight` transposed, `cross_attend_blocks_1/fn/net_0` is
`cross_attend_blocks.1.fn.net.0`, and `latents` keeps its name.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jasper_jax.models.layers import Dense, Dtype, LayerNorm
from jasper_jax.models.layers import partitioned as _p


@dataclasses.dataclass(frozen=True)
class LatentAttentionConfig:
    """NV-Embed's `latent_attention_config`; the defaults are NV-Embed-v2's (its config.json
    names only the model type, so these are what it runs).

    Attributes:
      num_latents_value: rows of the latent array (keys/values of the cross-attention).
      num_cross_heads: attention heads; each head is `cross_dim_head` wide, so the projections
        are num_cross_heads * cross_dim_head wide (8 x 4096 in NV-Embed-v2).
      hidden_dim: width of the keys' and values' source (the latents' normalisation).
      latent_dim: width of the queries and of the output (the decoder's hidden size).
      output_normalize: NV-Embed normalises the pooled vector (ours always is, see `Embedder`).
      ff_mult: the GEGLU MLP's inner width over latent_dim (fixed at 4 in NV-Embed's code).
      layer_norm_eps: torch.nn.LayerNorm's default, which NV-Embed's norms keep.
    """

    num_latents_value: int = 512
    num_cross_heads: int = 8
    hidden_dim: int = 4096
    latent_dim: int = 4096
    cross_dim_head: int = 4096
    output_normalize: bool = True
    ff_mult: int = 4
    layer_norm_eps: float = 1e-5

    model_type = "latent_attention"

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LatentAttentionConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"ff_mult", "layer_norm_eps"}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("ff_mult", "layer_norm_eps"):
            d.pop(name)
        return {"model_type": self.model_type, **d}


class LatentCrossAttention(nn.Module):
    """HF `cross_attend_blocks.0.fn`: queries from the tokens, keys and values from the latents.

    Call: x [batch, seq, latent_dim], latents [num_latents, hidden_dim] -> [batch, seq,
    latent_dim]. Every latent is visible to every token (no mask), so a token's output depends on
    its own state only; softmax in float32, scores scaled by 1/sqrt(cross_dim_head).
    """

    config: LatentAttentionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        cfg = self.config
        heads, width = cfg.num_cross_heads, cfg.cross_dim_head
        inner = heads * width

        def dense(features, axes, name):
            return Dense(features, axes, use_bias=False, dtype=self.dtype, name=name)

        q = dense(inner, ("embed", "heads"), "to_q")(x).reshape(*x.shape[:2], heads, width)
        # the latents' keys and values are the same for every text: one [num_latents, 2*inner]
        k, v = jnp.split(dense(2 * inner, ("embed", "heads"), "to_kv")(latents), 2, axis=-1)
        k = k.reshape(-1, heads, width)
        v = v.reshape(-1, heads, width)
        scores = jnp.einsum("bqhd,khd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores / jnp.sqrt(jnp.float32(width)), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,khd->bqhd", probs, v).reshape(*x.shape[:2], inner)
        return dense(cfg.latent_dim, ("heads", "embed"), "to_out")(out)


class GegluFeedForward(nn.Module):
    """HF `cross_attend_blocks.1.fn`: `net.0` Linear(d, 2*m*d), GEGLU (the first half times
    the exact, erf GELU of the second), `net.2` Linear(m*d, d); [batch, seq, d] -> same."""

    config: LatentAttentionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        inner = cfg.ff_mult * cfg.latent_dim
        h = Dense(2 * inner, ("embed", "mlp"), dtype=self.dtype, name="net_0")(x)
        value, gates = jnp.split(h, 2, axis=-1)
        gelu = jax.nn.gelu(gates.astype(jnp.float32), approximate=False)
        h = (value.astype(jnp.float32) * gelu).astype(self.dtype)
        return Dense(cfg.latent_dim, ("mlp", "embed"), dtype=self.dtype, name="net_2")(h)


class CrossAttendBlock(nn.Module):
    """HF `cross_attend_blocks.0` (PreNorm): LayerNorm `norm` on the tokens, LayerNorm
    `norm_context` on the latents, then `fn` (LatentCrossAttention); no residual here."""

    config: LatentAttentionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, latents: jax.Array) -> jax.Array:
        eps = self.config.layer_norm_eps
        h = LayerNorm(eps, self.dtype, name="norm")(x)
        context = LayerNorm(eps, self.dtype, name="norm_context")(latents)
        return LatentCrossAttention(self.config, self.dtype, name="fn")(h, context)


class FeedForwardBlock(nn.Module):
    """HF `cross_attend_blocks.1` (PreNorm): LayerNorm `norm`, then `fn` (GegluFeedForward)."""

    config: LatentAttentionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = LayerNorm(self.config.layer_norm_eps, self.dtype, name="norm")(x)
        return GegluFeedForward(self.config, self.dtype, name="fn")(h)


class LatentAttention(nn.Module):
    """HF `LatentAttentionModel` up to (not including) its mean pooling.

    Call: hidden [batch, seq, latent_dim] (the decoder's final states) -> [batch, seq,
    latent_dim] in `dtype`: x = hidden + cross(hidden, latents); x + mlp(x).
    """

    config: LatentAttentionConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        cfg = self.config
        latents = self.param(
            "latents",
            _p(nn.initializers.normal(1.0), (None, "embed")),  # torch.randn, as NV-Embed
            (cfg.num_latents_value, cfg.latent_dim),
        )
        x = hidden.astype(self.dtype)
        cross = CrossAttendBlock(cfg, self.dtype, name="cross_attend_blocks_0")
        x = x + cross(x, latents.astype(self.dtype))
        return x + FeedForwardBlock(cfg, self.dtype, name="cross_attend_blocks_1")(x)
