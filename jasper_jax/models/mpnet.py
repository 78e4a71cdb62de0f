"""MPNet encoder (all-mpnet-base-v2, the embedded default's larger teacher), mirroring HF names.

BERT-shaped blocks with three differences: attention projections are `attention.attn.{q,k,v,o}`
with the residual LayerNorm at `attention.LayerNorm`; no token-type embeddings, and positions
count from `pad_token_id + 1` over non-padding tokens; every layer adds a learned relative
position bias (T5-style log buckets, shared by all layers: `encoder.relative_attention_bias`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jasper_jax.models.attention import AttentionSettings, attend
from jasper_jax.models.bert import BertEncoder, BertIntermediate, BertOutput
from jasper_jax.models.layers import Dense, Dtype, LayerNorm, constrain_hidden
from jasper_jax.models.layers import partitioned as _p


@dataclasses.dataclass(frozen=True)
class MPNetConfig:
    """The fields of an HF `MPNetConfig` that the encoder uses."""

    vocab_size: int = 30527
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 514
    relative_attention_num_buckets: int = 32
    layer_norm_eps: float = 1e-5
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 1
    add_pooling_layer: bool = True

    model_type = "mpnet"

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> MPNetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("add_pooling_layer")
        return {"model_type": "mpnet", "architectures": ["MPNetModel"], **d}


def relative_position_bucket(relative: jnp.ndarray, num_buckets: int, max_distance: int = 128):
    """HF MPNet's buckets of `key - query` offsets: half the buckets per direction, exact for
    offsets below a quarter of the buckets, logarithmic up to `max_distance`."""
    n = -relative
    half = num_buckets // 2
    bucket = (n < 0).astype(jnp.int32) * half
    n = jnp.abs(n)
    exact = half // 2
    safe = jnp.maximum(n, 1).astype(jnp.float32)
    large = exact + (
        jnp.log(safe / exact) / math.log(max_distance / exact) * (half - exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, half - 1)
    return bucket + jnp.where(n < exact, n, large)


class MPNetEmbeddings(nn.Module):
    config: MPNetConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, input_ids, inputs_embeds=None, *, deterministic: bool = True):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        pad = cfg.pad_token_id
        if inputs_embeds is None:
            inputs_embeds = nn.Embed(
                cfg.vocab_size,
                cfg.hidden_size,
                embedding_init=_p(init, ("vocab", "embed")),
                name="word_embeddings",
            )(input_ids)
            real = (input_ids != pad).astype(jnp.int32)
            positions = jnp.cumsum(real, axis=1) * real + pad
        else:
            positions = jnp.arange(inputs_embeds.shape[1])[None] + pad + 1
        position = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            embedding_init=_p(init, ("pos", "embed")),
            name="position_embeddings",
        )(positions)
        x = inputs_embeds.astype(jnp.float32) + position
        x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="LayerNorm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class MPNetSelfAttention(nn.Module):
    """HF `attention.attn`: q, k, v and the output projection o."""

    config: MPNetConfig
    dtype: Dtype
    attention: AttentionSettings = AttentionSettings()

    @nn.compact
    def __call__(self, x, mask, position_bias):
        cfg = self.config
        heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // heads

        def project(name):
            y = Dense(cfg.hidden_size, ("embed", "heads"), dtype=self.dtype, name=name)(x)
            return y.reshape(*x.shape[:2], heads, head_dim)

        q, k, v = project("q"), project("k"), project("v")
        settings = self.attention
        ctx = attend(
            q, k, v, mask, causal=False, dtype=self.dtype, settings=settings, bias=position_bias
        )
        ctx = ctx.reshape(*x.shape[:2], cfg.hidden_size)
        return Dense(cfg.hidden_size, ("heads", "embed"), dtype=self.dtype, name="o")(ctx)


class MPNetAttention(nn.Module):
    config: MPNetConfig
    dtype: Dtype
    attention: AttentionSettings = AttentionSettings()

    @nn.compact
    def __call__(self, x, mask, position_bias, *, deterministic: bool):
        cfg = self.config
        y = MPNetSelfAttention(cfg, self.dtype, self.attention, name="attn")(x, mask, position_bias)
        y = nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=deterministic)
        return LayerNorm(cfg.layer_norm_eps, self.dtype, name="LayerNorm")(y + x)


class MPNetLayer(nn.Module):
    """Call: x [batch, seq, hidden], mask [batch, seq], deterministic, position_bias
    [1, heads, seq, seq] -> [batch, seq, hidden] (deterministic third: BERT's remat static arg)."""

    config: MPNetConfig
    dtype: Dtype
    attention: AttentionSettings = AttentionSettings()

    @nn.compact
    def __call__(self, x, mask, deterministic: bool, position_bias):
        cfg = self.config
        x = MPNetAttention(cfg, self.dtype, self.attention, name="attention")(
            x, mask, position_bias, deterministic=deterministic
        )
        h = BertIntermediate(cfg, self.dtype, name="intermediate")(x)
        return BertOutput(cfg, self.dtype, name="output")(h, x, deterministic=deterministic)


class _MPNetStack(nn.Module):
    config: MPNetConfig
    dtype: Dtype
    layer_cls: Any
    attention: AttentionSettings = AttentionSettings()

    @nn.compact
    def __call__(self, x, mask, deterministic):
        cfg = self.config
        seq = x.shape[1]
        offsets = jnp.arange(seq)[None, :] - jnp.arange(seq)[:, None]  # key - query
        buckets = relative_position_bucket(offsets, cfg.relative_attention_num_buckets)
        table = nn.Embed(
            cfg.relative_attention_num_buckets,
            cfg.num_attention_heads,
            embedding_init=_p(nn.initializers.normal(0.02), (None, "heads")),
            name="relative_attention_bias",
        )
        # [1, heads, seq, seq], shared by every layer; the padding mask is applied in `attend`.
        bias = jnp.transpose(table(buckets), (2, 0, 1))[None].astype(jnp.float32)
        x = constrain_hidden(x)
        for i in range(cfg.num_hidden_layers):
            layer = self.layer_cls(cfg, self.dtype, self.attention, name=f"layer_{i}")
            x = constrain_hidden(layer(x, mask, deterministic, bias))
        return x


class MPNetEncoder(BertEncoder):
    """MPNet up to the last hidden state: BERT's encoder with MPNet's blocks.

    Args (call):
      input_ids: [batch, seq] int32 token ids (positions are derived from the non-pad ids).
      attention_mask: [batch, seq], 1 for tokens, 0 for padding.
      inputs_embeds: optional [batch, seq, hidden] used instead of the word embeddings.
    Returns:
      [batch, seq, hidden] hidden states in `dtype`.
    """

    def blocks(self) -> tuple[type, type, type]:
        return MPNetEmbeddings, MPNetLayer, _MPNetStack
