"""BERT encoder (the embedded default's student: all-MiniLM-L6-v2 shape), mirroring HF names.

Flax path `embeddings/word_embeddings/embedding` is HF `embeddings.word_embeddings.weight`;
`encoder/layer_3/attention/self/query/kernel` is `encoder.layer.3.attention.self.query.weight`
transposed. The conversion lives in `jasper_jax.models.hf_io`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jasper_jax.models.attention import AttentionSettings, attend
from jasper_jax.models.layers import Dense, Dtype, LayerNorm, constrain_hidden, remat_layer
from jasper_jax.models.layers import partitioned as _p

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The fields of an HF `BertConfig` that the encoder uses."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    pad_token_id: int = 0
    add_pooling_layer: bool = True  # HF BertModel's pooler; kept only so weights round-trip

    model_type = "bert"

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> BertConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}  # add_pooling_layer when given
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported for BERT")
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("add_pooling_layer")
        return {"model_type": "bert", "architectures": ["BertModel"], **d}


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, input_ids, inputs_embeds=None, *, deterministic: bool = True):
        cfg = self.config
        init = nn.initializers.normal(0.02)
        if inputs_embeds is None:
            inputs_embeds = nn.Embed(
                cfg.vocab_size,
                cfg.hidden_size,
                embedding_init=_p(init, ("vocab", "embed")),
                name="word_embeddings",
            )(input_ids)
        seq = inputs_embeds.shape[1]
        position = nn.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            embedding_init=_p(init, ("pos", "embed")),
            name="position_embeddings",
        )(jnp.arange(seq)[None])
        token_type = nn.Embed(
            cfg.type_vocab_size,
            cfg.hidden_size,
            embedding_init=_p(init, ("type", "embed")),
            name="token_type_embeddings",
        )(jnp.zeros((1, seq), jnp.int32))
        x = inputs_embeds.astype(jnp.float32) + position + token_type
        x = LayerNorm(cfg.layer_norm_eps, self.dtype, name="LayerNorm")(x)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: Dtype
    attention: AttentionSettings = AttentionSettings()

    @nn.compact
    def __call__(self, x, mask, *, deterministic: bool):
        cfg = self.config
        heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // heads

        def project(name):
            y = Dense(cfg.hidden_size, ("embed", "heads"), dtype=self.dtype, name=name)(x)
            return y.reshape(*x.shape[:2], heads, head_dim)

        q, k, v = project("query"), project("key"), project("value")
        out = attend(q, k, v, mask, causal=False, dtype=self.dtype, settings=self.attention)
        return out.reshape(*x.shape[:2], cfg.hidden_size)


class BertLayer(nn.Module):
    """One transformer block: attention (+ residual LayerNorm), then MLP (+ residual LayerNorm).

    Call: x [batch, seq, hidden], mask [batch, seq] (1 = token) -> [batch, seq, hidden].
    """

    config: BertConfig
    dtype: Dtype
    attention: AttentionSettings = AttentionSettings()

    @nn.compact
    def __call__(self, x, mask, deterministic: bool = True):
        cfg = self.config
        x = BertAttention(cfg, self.dtype, self.attention, name="attention")(
            x, mask, deterministic=deterministic
        )
        h = BertIntermediate(cfg, self.dtype, name="intermediate")(x)
        return BertOutput(cfg, self.dtype, name="output")(h, x, deterministic=deterministic)


class BertAttention(nn.Module):
    """HF `attention`: `self` (q/k/v) and `output` (dense + residual LayerNorm)."""

    config: BertConfig
    dtype: Dtype
    attention: AttentionSettings = AttentionSettings()

    @nn.compact
    def __call__(self, x, mask, *, deterministic: bool):
        ctx = BertSelfAttention(self.config, self.dtype, self.attention, name="self")(
            x, mask, deterministic=deterministic
        )
        return BertOutput(self.config, self.dtype, in_axis="heads", name="output")(
            ctx, x, deterministic=deterministic
        )


class BertIntermediate(nn.Module):
    config: BertConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        y = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=self.dtype, name="dense")(x)
        return _ACTIVATIONS[cfg.hidden_act](y)


class BertOutput(nn.Module):
    """dense -> dropout -> LayerNorm(y + residual): both HF `attention.output` and `output`."""

    config: BertConfig
    dtype: Dtype
    in_axis: str = "mlp"

    @nn.compact
    def __call__(self, y, residual, *, deterministic: bool):
        cfg = self.config
        y = Dense(cfg.hidden_size, (self.in_axis, "embed"), dtype=self.dtype, name="dense")(y)
        y = nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=deterministic)
        return LayerNorm(cfg.layer_norm_eps, self.dtype, name="LayerNorm")(y + residual)


class BertEncoder(nn.Module):
    """BERT up to the last hidden state.

    Args (call):
      input_ids: [batch, seq] int32 token ids.
      attention_mask: [batch, seq], 1 for tokens, 0 for padding.
      inputs_embeds: optional [batch, seq, hidden] used instead of the word embeddings.
    Returns:
      [batch, seq, hidden] hidden states in `dtype`.

    Attributes:
      remat: per-layer rematerialisation policy, "none" | "full" | "dots" (or a bool); see
        `layers.REMAT_POLICIES`.
      attention: attention implementation (dense, blockwise, flash, auto).
    """

    config: BertConfig
    dtype: Dtype = jnp.float32
    remat: bool | str = False
    attention: AttentionSettings = AttentionSettings()

    def blocks(self) -> tuple[type, type, type]:
        """(embeddings, layer, stack) modules; BERT-shaped variants (MPNet) swap these."""
        return BertEmbeddings, BertLayer, _Stack

    @nn.compact
    def __call__(self, input_ids, attention_mask, inputs_embeds=None, *, deterministic=True):
        cfg = self.config
        embeddings_cls, layer_cls, stack_cls = self.blocks()
        x = embeddings_cls(cfg, self.dtype, name="embeddings")(
            input_ids, inputs_embeds, deterministic=deterministic
        )
        layer_cls = remat_layer(layer_cls, self.remat, static_argnums=(3,))
        x = stack_cls(cfg, self.dtype, layer_cls, self.attention, name="encoder")(
            x, attention_mask, deterministic
        )
        if cfg.add_pooling_layer:
            # HF's pooler (dense + tanh on [CLS]) is unused by sentence embeddings; it is built so
            # that its weights load, stay frozen and export unchanged.
            _Pooler(cfg, self.dtype, name="pooler")(x[:, 0])
        return x


class _Pooler(nn.Module):
    config: BertConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, cls_state):
        dense = Dense(self.config.hidden_size, ("embed", None), dtype=self.dtype, name="dense")
        return jnp.tanh(dense(cls_state))


class _Stack(nn.Module):
    config: BertConfig
    dtype: Dtype
    layer_cls: Any
    attention: AttentionSettings = AttentionSettings()

    @nn.compact
    def __call__(self, x, mask, deterministic):
        x = constrain_hidden(x)
        for i in range(self.config.num_hidden_layers):
            layer = self.layer_cls(self.config, self.dtype, self.attention, name=f"layer_{i}")
            x = constrain_hidden(layer(x, mask, deterministic))
        return x
