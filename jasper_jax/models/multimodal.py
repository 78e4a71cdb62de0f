"""The Jasper vision bridge: SigLIP patch tokens -> adaptive average pool -> the text student.

An image goes through the SigLIP tower; its patch tokens [B, P, D_vision] are resized by a
parameter-free adaptive average pool (torch `AdaptiveAvgPool2d((T, hidden))` semantics, see
`adaptive_pool`) to [B, T, hidden] and fed to the student's encoder in place of token embeddings,
with all T positions attended; the student's pooling and heads follow, so an image lands in the
text vector space. Jasper splices the T vectors between image start/end tokens of its Qwen2
prompt; we feed them alone (nothing else is learned from the splice).

Parameter tree: `{"vision": <SigLIP tree>, "encoder": ..., "heads": ...}`: the text student's
params keep their usual top-level names (a stage-3 checkpoint loads unchanged), and the bridge
adds nothing besides "vision".
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jasper_jax.errors import UserError
from jasper_jax.models.adaptive_pool import adaptive_avg_pool_2d
from jasper_jax.models.attention import AttentionSettings
from jasper_jax.models.embedder import Embedder, EmbedderConfig
from jasper_jax.models.siglip import SiglipVisionConfig, SiglipVisionTower


@dataclasses.dataclass(frozen=True)
class MultimodalConfig:
    """text: the student; vision: the tower; image_tokens: T, pooled tokens fed to the student."""

    text: EmbedderConfig
    vision: SiglipVisionConfig
    image_tokens: int

    def __post_init__(self):
        limit = getattr(self.text.encoder, "max_position_embeddings", None)
        if self.image_tokens < 1 or (limit is not None and self.image_tokens > limit):
            raise UserError(
                f"image_tokens={self.image_tokens} must be in [1, {limit}] (the student's "
                "max_position_embeddings); lower model.image_tokens"
            )


class MultimodalEmbedder(nn.Module):
    """Text and images into one vector space.

    Methods (use with `apply(..., method=...)`):
      embed_text(input_ids [B, L], attention_mask [B, L]) -> {head: [B, dim] unit vectors}
      embed_images(pixels [B, S, S, C] normalised NHWC) -> {head: [B, dim] unit vectors}
      image_tokens(pixels) -> [B, T, hidden]: what the student's encoder receives.
    `__call__` runs both paths, so `init` creates every parameter.
    """

    config: MultimodalConfig
    dtype: jnp.dtype = jnp.float32
    remat: bool | str = False
    attention: AttentionSettings = AttentionSettings()

    def setup(self):
        cfg = self.config
        self.vision = SiglipVisionTower(
            cfg.vision, self.dtype, with_head=False, remat=self.remat, attention=self.attention
        )
        self.text = Embedder(cfg.text, dtype=self.dtype, remat=self.remat, attention=self.attention)
        # The student's "encoder" and "heads" sit at the top level, as in a text checkpoint.
        nn.share_scope(self, self.text)

    def image_tokens(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, S, S, C] -> [B, image_tokens, hidden]: patch tokens, adaptively pooled."""
        patches = self.vision(pixels).last_hidden_state
        return adaptive_avg_pool_2d(
            patches, (self.config.image_tokens, self.config.text.hidden_size)
        )

    def embed_images(
        self,
        pixels: jax.Array,
        heads: Sequence[str] | None = None,
        deterministic: bool = True,
    ) -> dict[str, jax.Array]:
        tokens = self.image_tokens(pixels)
        mask = jnp.ones(tokens.shape[:2], jnp.int32)
        # input_ids are unused when inputs_embeds is given; zeros keep the signature.
        return self.text(
            jnp.zeros_like(mask), mask, tokens, heads=heads, deterministic=deterministic
        )

    def embed_text(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        heads: Sequence[str] | None = None,
        deterministic: bool = True,
    ) -> dict[str, jax.Array]:
        return self.text(input_ids, attention_mask, heads=heads, deterministic=deterministic)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, pixels: jax.Array):
        return self.embed_text(input_ids, attention_mask), self.embed_images(pixels)


def init_params(config: MultimodalConfig, rng: jax.Array) -> Any:
    """Random boxed parameters (with logical axis metadata)."""
    ids = jnp.zeros((1, 8), jnp.int32)
    size = config.vision.image_size
    pixels = jnp.zeros((1, size, size, config.vision.num_channels), jnp.float32)
    return MultimodalEmbedder(config).init(rng, ids, jnp.ones_like(ids), pixels)["params"]


@functools.lru_cache(maxsize=8)
def abstract_params(config: MultimodalConfig) -> Any:
    """Shapes and logical axes of the parameters, without allocating them."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
