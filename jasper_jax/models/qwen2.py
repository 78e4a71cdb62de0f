"""Qwen2-style decoder used as an encoder (the paper's student, stella_en_1.5B_v5).

GQA attention with RoPE, RMSNorm, SwiGLU MLP; causal or bidirectional attention by config
(stella/Jasper use bidirectional attention with padding masked). Names mirror HF `Qwen2Model`:
Flax `layers_5/self_attn/q_proj/kernel` is HF `layers.5.self_attn.q_proj.weight` transposed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jasper_jax.models.layers import Dense, Dtype, RMSNorm, attention_bias, dot_product_attention
from jasper_jax.models.layers import partitioned as _p


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """The fields of an HF `Qwen2Config` that the encoder uses, plus `is_causal`."""

    vocab_size: int = 151646
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 131072
    hidden_act: str = "silu"
    is_causal: bool = False
    # RoPE scaling: None, or ("linear", factor) to stretch positions beyond the trained length.
    rope_scaling: tuple[str, float] | None = None

    model_type = "qwen2"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Qwen2Config:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and k != "rope_scaling"}
        rope = d.get("rope_parameters") or {}
        if "rope_theta" not in d and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        scaling = d.get("rope_scaling") or {}
        kind = scaling.get("rope_type", scaling.get("type", rope.get("rope_type", "default")))
        if kind == "linear":
            kwargs["rope_scaling"] = ("linear", float(scaling.get("factor", rope.get("factor"))))
        elif kind not in ("default", None):
            raise ValueError(f"rope scaling {kind!r} is not supported (supported: linear)")
        kwargs["is_causal"] = bool(d.get("is_causal", False))
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        scaling = d.pop("rope_scaling")
        if scaling:
            d["rope_scaling"] = {"rope_type": scaling[0], "factor": scaling[1]}
        return {"model_type": "qwen2", "architectures": ["Qwen2Model"], **d}


def rope_tables(positions: jax.Array, head_dim: int, theta: float, scale: float = 1.0):
    """cos/sin tables [batch, seq, head_dim] for rotate-half RoPE (HF Qwen2 layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = (positions.astype(jnp.float32) / scale)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [batch, seq, heads, head_dim]; rotates pairs (i, i + head_dim/2) in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class Qwen2Attention(nn.Module):
    config: Qwen2Config
    dtype: Dtype

    @nn.compact
    def __call__(self, x, bias, cos, sin):
        cfg = self.config
        batch, seq, _ = x.shape
        hd, heads, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

        def project(name, n_heads, axis):
            y = Dense(n_heads * hd, ("embed", axis), dtype=self.dtype, name=name)(x)
            return y.reshape(batch, seq, n_heads, hd)

        q = apply_rope(project("q_proj", heads, "heads"), cos, sin)
        k = apply_rope(project("k_proj", kv, "kv_heads"), cos, sin)
        v = project("v_proj", kv, "kv_heads")
        out = dot_product_attention(q, k, v, bias, self.dtype).reshape(batch, seq, heads * hd)
        return Dense(
            cfg.hidden_size, ("heads", "embed"), use_bias=False, dtype=self.dtype, name="o_proj"
        )(out)


class Qwen2MLP(nn.Module):
    config: Qwen2Config
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        cfg = self.config

        def dense(width, axes, name):
            return Dense(width, axes, use_bias=False, dtype=self.dtype, name=name)

        gate = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
        up = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(jax.nn.silu(gate) * up)


class Qwen2Layer(nn.Module):
    config: Qwen2Config
    dtype: Dtype

    @nn.compact
    def __call__(self, x, bias, cos, sin):
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        x = x + Qwen2Attention(cfg, self.dtype, name="self_attn")(h, bias, cos, sin)
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        return x + Qwen2MLP(cfg, self.dtype, name="mlp")(h)


class Qwen2Encoder(nn.Module):
    """Qwen2 up to the final-norm hidden state.

    Args (call):
      input_ids: [batch, seq] int32, right-padded; positions are 0..seq-1.
      attention_mask: [batch, seq], 1 for tokens, 0 for padding.
      inputs_embeds: optional [batch, seq, hidden] used instead of the token embeddings (the
        vision bridge splices image tokens in this way).
    Returns:
      [batch, seq, hidden] in `dtype`.
    """

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, inputs_embeds=None, *, deterministic=True):
        del deterministic  # Qwen2 has no dropout at fine-tuning time.
        cfg = self.config
        if inputs_embeds is None:
            inputs_embeds = nn.Embed(
                cfg.vocab_size,
                cfg.hidden_size,
                embedding_init=_p(nn.initializers.normal(0.02), ("vocab", "embed")),
                name="embed_tokens",
            )(input_ids)
        x = inputs_embeds.astype(self.dtype)
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        scale = cfg.rope_scaling[1] if cfg.rope_scaling else 1.0
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, scale)
        bias = attention_bias(attention_mask, causal=cfg.is_causal)
        layer_cls = nn.remat(Qwen2Layer) if self.remat else Qwen2Layer
        for i in range(cfg.num_hidden_layers):
            x = layer_cls(cfg, self.dtype, name=f"layers_{i}")(x, bias, cos, sin)
        return RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(x)
