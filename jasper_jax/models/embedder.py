"""The student: encoder -> pooling -> named projection heads -> L2-normalised vectors.

Parameter tree: `{"encoder": <HF-named tree>, "heads": {"dense_1152": {kernel, bias}, ...}}`.
Heads are independent linear layers on the pooled vector (the paper's FC1..FC4); a head named
`dense_<dim>` exports to the sentence-transformers folder `2_Dense_<dim>`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jasper_jax.models.attention import AttentionSettings
from jasper_jax.models.bert import BertConfig, BertEncoder
from jasper_jax.models.layers import Dense
from jasper_jax.models.mpnet import MPNetConfig, MPNetEncoder
from jasper_jax.models.nvembed import NVEmbedConfig, NVEmbedEncoder
from jasper_jax.models.pooling import POOLING_MODES, pool, span_mean_pool
from jasper_jax.models.qwen2 import MistralConfig, Qwen2Config, Qwen2Encoder, Qwen3Config
from jasper_jax.vectors import l2_normalize

EncoderConfig = BertConfig | MPNetConfig | Qwen2Config | Qwen3Config | MistralConfig | NVEmbedConfig
ENCODERS = {
    "bert": BertEncoder,
    "mpnet": MPNetEncoder,
    "qwen2": Qwen2Encoder,
    "qwen3": Qwen2Encoder,  # the same module; Qwen3Config switches on its differences
    "mistral": Qwen2Encoder,  # likewise MistralConfig
    "nvembed": NVEmbedEncoder,  # Mistral body + NV-Embed's latent-attention layer
}
POOLED = "pooled"  # the name under which the bare pooled vector is returned
# What the heads read ([B, hidden], not normalised to unit length unless normalize_pooled):
# the features a closed-form head fit regresses on (`jasper_jax.train.head_init`).
HEAD_INPUT = "head_input"


def head_name(dim: int) -> str:
    return f"dense_{dim}"


@dataclasses.dataclass(frozen=True)
class EmbedderConfig:
    """Everything that fixes the student's architecture.

    Attributes:
      encoder: the encoder's own config (BERT or Qwen2).
      pooling: one of POOLING_MODES.
      heads: output dims of the projection heads, e.g. (1152, 256, 128); named `dense_<dim>`.
      default_head: the head `encode` uses when none is named; None means the pooled vector.
      normalize_pooled: the heads read the unit-length pooled vector instead of the raw mean
        (sentence-transformers: a Normalize module between Pooling and Dense). A student
        initialised from an embedding model whose own output is normalised (all-MiniLM-L6-v2)
        then starts with a head that can reproduce its own slice of the target exactly.
    """

    encoder: EncoderConfig
    pooling: str = "mean"
    heads: tuple[int, ...] = ()
    default_head: str | None = None
    normalize_pooled: bool = False

    def __post_init__(self):
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling {self.pooling!r}: choose one of {POOLING_MODES}")
        if len(set(self.heads)) != len(self.heads):
            raise ValueError(f"head dims {self.heads} must be distinct")
        if self.default_head not in (None, POOLED, *self.head_names):
            raise ValueError(f"default head {self.default_head!r} is not one of {self.head_names}")

    @property
    def head_names(self) -> tuple[str, ...]:
        return tuple(head_name(d) for d in self.heads)

    @property
    def hidden_size(self) -> int:
        return self.encoder.hidden_size


class ProjectionHeads(nn.Module):
    """Independent linear heads on the pooled vector, params `heads/dense_<dim>/{kernel,bias}`."""

    dims: tuple[int, ...]

    @nn.compact
    def __call__(self, pooled: jax.Array, name: str) -> jax.Array:
        """pooled [B, hidden] float32 -> [B, dim] for head `name` (computed in float32)."""
        dim = dict(zip(map(head_name, self.dims), self.dims, strict=True))[name]
        return Dense(dim, ("embed", "head_out"), dtype=jnp.float32, name=name)(pooled)


class Embedder(nn.Module):
    """Call: (input_ids [B, L], attention_mask [B, L]) -> {name: [B, dim] unit vectors}.

    `heads` selects which outputs to compute (names from `config.head_names`, "pooled" and/or
    "head_input", the heads' unnormalised input); None computes the pooled vector and every
    head. `inputs_embeds` [B, L, hidden] replaces token embeddings.
    `chunk_spans` [B, C, 2] token ranges [start, end) turn the output into a pair
    (document vectors {name: [B, dim]}, chunk vectors {name: [B, C, dim]}) from one encoder
    pass; each chunk is the mean of its tokens' states (late chunking), an empty span gives 0.
    `pool_from` (int or int32 scalar) leaves the first positions out of a mean pool (NV-Embed's
    instruction tokens, `nvembed.instruction_length`); None or 0 pools every token.
    """

    config: EmbedderConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool | str = False  # per-layer policy: "none" | "full" | "dots" (layers.REMAT_POLICIES)
    attention: AttentionSettings = AttentionSettings()  # dense | blockwise | flash | auto

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        inputs_embeds: jax.Array | None = None,
        heads: Sequence[str] | None = None,
        deterministic: bool = True,
        chunk_spans: jax.Array | None = None,
        pool_from: jax.Array | int | None = None,
    ) -> dict[str, jax.Array] | tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        cfg = self.config
        encoder = ENCODERS[cfg.encoder.model_type](
            cfg.encoder, self.dtype, self.remat, self.attention, name="encoder"
        )
        hidden = encoder(input_ids, attention_mask, inputs_embeds, deterministic=deterministic)
        pool_mask = attention_mask
        if pool_from is not None and cfg.pooling == "mean":
            pool_mask = attention_mask * (jnp.arange(attention_mask.shape[1]) >= pool_from)
        pooled = pool(hidden, pool_mask, cfg.pooling)
        projection = ProjectionHeads(cfg.heads, name="heads")
        names = (POOLED, *cfg.head_names) if heads is None else tuple(heads)

        def outputs(vectors: jax.Array) -> dict[str, jax.Array]:
            features = l2_normalize(vectors) if cfg.normalize_pooled else vectors
            out = {}
            for name in names:
                if name == POOLED:
                    out[name] = l2_normalize(vectors)
                elif name == HEAD_INPUT:
                    out[name] = features.astype(jnp.float32)
                elif name in cfg.head_names:
                    out[name] = l2_normalize(projection(features, name))
                else:
                    raise KeyError(f"head {name!r} not in {(POOLED, HEAD_INPUT, *cfg.head_names)}")
            return out

        if chunk_spans is None:
            return outputs(pooled)
        return outputs(pooled), outputs(span_mean_pool(hidden, attention_mask, chunk_spans))


def init_params(config: EmbedderConfig, rng: jax.Array, seq_len: int = 8):
    """Random boxed parameters (with logical axis metadata) for `config`."""
    ids = jnp.zeros((1, seq_len), jnp.int32)
    return Embedder(config).init(rng, ids, jnp.ones_like(ids))["params"]


def abstract_params(config: EmbedderConfig):
    """Shapes and logical axes of the parameters, without allocating them."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
