"""Qwen2-, Qwen3- and Mistral-style decoders used as encoders (the paper's student,
stella_en_1.5B_v5; the Qwen3-Embedding teachers; the Mistral body of NV-Embed).

GQA attention with RoPE, RMSNorm, SwiGLU MLP; causal or bidirectional attention by config
(stella/Jasper use bidirectional attention with padding masked; Qwen3-Embedding is causal and
pools the last token). Qwen3 adds an RMSNorm over each head's queries and keys before RoPE,
drops the q/k/v biases and may set a head width apart from hidden / heads. Mistral is Qwen2
without any bias, plus a sliding attention window for causal use (see `MistralConfig`). Names
mirror HF
`Qwen2Model` / `Qwen3Model`: Flax `layers_5/self_attn/q_proj/kernel` is HF
`layers.5.self_attn.q_proj.weight` transposed, `layers_5/self_attn/q_norm/scale` is
`layers.5.self_attn.q_norm.weight`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jasper_jax.errors import UserError
from jasper_jax.models.attention import AttentionSettings, attend
from jasper_jax.models.layers import Dense, Dtype, RMSNorm, constrain_hidden, remat_layer
from jasper_jax.models.layers import partitioned as _p
from jasper_jax.models.rope import RopeScaling, inverse_frequencies


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
    # RoPE scaling (linear, dynamic, yarn, llama3) to run beyond the trained length; None: plain.
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = True  # biases on q/k/v (and, for Qwen3, on o_proj)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's queries and keys
    head_dim_override: int | None = None  # HF `head_dim` where it is not hidden / heads

    model_type = "qwen2"

    def __post_init__(self):
        if isinstance(self.rope_scaling, tuple | list):  # the old ("linear", factor) spelling
            object.__setattr__(self, "rope_scaling", RopeScaling(*self.rope_scaling))

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> Qwen2Config:
        own = {"rope_scaling", "qk_norm", "head_dim_override", "is_causal"}
        names = {f.name for f in dataclasses.fields(cls)} - own
        kwargs = {k: v for k, v in d.items() if k in names}
        rope = d.get("rope_parameters") or {}
        if "rope_theta" not in d and "rope_theta" in rope:
            kwargs["rope_theta"] = rope["rope_theta"]
        kwargs["rope_scaling"] = RopeScaling.from_hf(d)
        kwargs["is_causal"] = bool(d.get("is_causal", cls.is_causal))
        if cls.model_type != "qwen3":
            kwargs.pop("attention_bias", None)  # fixed: Qwen2 always has q/k/v biases, Mistral none
        if d.get("head_dim") and d["head_dim"] != d["hidden_size"] // d["num_attention_heads"]:
            kwargs["head_dim_override"] = int(d["head_dim"])
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("rope_scaling", "qk_norm", "head_dim_override"):
            d.pop(name)
        if self.model_type != "qwen3":
            d.pop("attention_bias")
        if self.head_dim_override:
            d["head_dim"] = self.head_dim_override
        if self.rope_scaling:
            d["rope_scaling"] = self.rope_scaling.to_hf()
        name = self.model_type.capitalize()
        return {"model_type": self.model_type, "architectures": [f"{name}Model"], **d}


@dataclasses.dataclass(frozen=True)
class Qwen3Config(Qwen2Config):
    """HF `Qwen3Config` (Qwen3-Embedding 0.6B/4B/8B): no q/k/v biases, q/k RMSNorm, causal
    unless the config says `"is_causal": false`."""

    vocab_size: int = 151669
    hidden_size: int = 1024
    intermediate_size: int = 3072
    num_hidden_layers: int = 28
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    max_position_embeddings: int = 40960
    is_causal: bool = True
    attention_bias: bool = False
    qk_norm: bool = True
    head_dim_override: int | None = 128

    model_type = "qwen3"


@dataclasses.dataclass(frozen=True)
class MistralConfig(Qwen2Config):
    """HF `MistralConfig` (Mistral-7B; NV-Embed's body): no biases at all, causal by default.

    `sliding_window` (W): transformers lets a causal query see only the W latest keys. We do not
    implement the window: a causal Mistral is refused on inputs longer than W tokens (within W
    the window hides nothing, so the result is exact), and loading caps the default token limit
    at W. Bidirectional use ignores the window, as NV-Embed's own model does (its mask holds
    padding only).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    is_causal: bool = True
    attention_bias: bool = False
    sliding_window: int | None = None

    model_type = "mistral"

    @property
    def attention_window(self) -> int | None:
        """Tokens a causal pass may hold before the sliding window would matter; None: any."""
        return self.sliding_window if self.is_causal else None


def rope_tables(positions: jax.Array, config: Qwen2Config):
    """cos/sin tables [batch, seq, head_dim] for rotate-half RoPE (HF Qwen2 layout), with the
    config's RoPE scaling; positions: [batch, seq] int, 0..seq-1."""
    inv_freq, attention_scale = inverse_frequencies(
        config.head_dim,
        config.rope_theta,
        config.rope_scaling,
        seq_len=positions.shape[-1],
        max_position_embeddings=config.max_position_embeddings,
    )
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * attention_scale, jnp.sin(angles) * attention_scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: [batch, seq, heads, head_dim]; rotates pairs (i, i + head_dim/2) in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def check_window(config: Qwen2Config, seq_len: int) -> None:
    """Refuses a causal Mistral pass longer than its sliding window (see `MistralConfig`)."""
    window = getattr(config, "attention_window", None)
    if window and seq_len > window:
        raise UserError(
            f"{seq_len} tokens exceed the sliding attention window ({window}) of this causal "
            f"Mistral, which jasper-jax does not implement; fix: --max-length {window} or less"
        )


class Qwen2Attention(nn.Module):
    config: Qwen2Config
    dtype: Dtype
    attention: AttentionSettings = AttentionSettings()

    @nn.compact
    def __call__(self, x, mask, cos, sin):
        cfg = self.config
        batch, seq, _ = x.shape
        hd, heads, kv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads

        def project(name, n_heads, axis):
            y = Dense(
                n_heads * hd,
                ("embed", axis),
                use_bias=cfg.attention_bias,
                dtype=self.dtype,
                name=name,
            )(x)
            y = y.reshape(batch, seq, n_heads, hd)
            if cfg.qk_norm and name != "v_proj":  # Qwen3: per head, before RoPE
                y = RMSNorm(cfg.rms_norm_eps, self.dtype, name=f"{name[0]}_norm")(y)
            return y

        q = apply_rope(project("q_proj", heads, "heads"), cos, sin)
        k = apply_rope(project("k_proj", kv, "kv_heads"), cos, sin)
        v = project("v_proj", kv, "kv_heads")
        out = attend(
            q, k, v, mask, causal=cfg.is_causal, dtype=self.dtype, settings=self.attention
        ).reshape(batch, seq, heads * hd)
        o_bias = cfg.attention_bias and cfg.model_type == "qwen3"  # Qwen2's o_proj has none
        return Dense(
            cfg.hidden_size, ("heads", "embed"), use_bias=o_bias, dtype=self.dtype, name="o_proj"
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
    """Call: x [batch, seq, hidden], mask [batch, seq], cos/sin [batch, seq, head_dim]."""

    config: Qwen2Config
    dtype: Dtype
    attention: AttentionSettings = AttentionSettings()

    @nn.compact
    def __call__(self, x, mask, cos, sin):
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        attention = Qwen2Attention(cfg, self.dtype, self.attention, name="self_attn")
        x = x + attention(h, mask, cos, sin)
        h = RMSNorm(cfg.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        return x + Qwen2MLP(cfg, self.dtype, name="mlp")(h)


class Qwen2Encoder(nn.Module):
    """Qwen2 / Qwen3 / Mistral (by `config`) up to the final-norm hidden state.

    Args (call):
      input_ids: [batch, seq] int32, right-padded; positions are 0..seq-1.
      attention_mask: [batch, seq], 1 for tokens, 0 for padding.
      inputs_embeds: optional [batch, seq, hidden] used instead of the token embeddings (the
        vision bridge splices image tokens in this way).
    Returns:
      [batch, seq, hidden] in `dtype`.

    Attributes:
      remat: per-layer rematerialisation policy, "none" | "full" | "dots" (or a bool).
      attention: attention implementation (dense, blockwise, flash, auto).
    """

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    remat: bool | str = False
    attention: AttentionSettings = AttentionSettings()

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
        x = constrain_hidden(inputs_embeds.astype(self.dtype))
        check_window(cfg, x.shape[1])
        positions = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        cos, sin = rope_tables(positions, cfg)
        layer_cls = remat_layer(Qwen2Layer, self.remat)
        for i in range(cfg.num_hidden_layers):
            x = layer_cls(cfg, self.dtype, self.attention, name=f"layers_{i}")(
                x, attention_mask, cos, sin
            )
            x = constrain_hidden(x)
        return RMSNorm(cfg.rms_norm_eps, self.dtype, name="norm")(x)
