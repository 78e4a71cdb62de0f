"""SigLIP vision tower (HF `SiglipVisionModel`) in linen; HF weight I/O is in `siglip_hf`.

Flax paths mirror the HF keys of transformers 5.x `SiglipVisionModel` (no prefix):
`encoder/layers_3/self_attn/q_proj/kernel` is `encoder.layers.3.self_attn.q_proj.weight`
transposed; `embeddings/patch_embedding/kernel` [p, p, C, D] is the torch conv weight
[D, C, p, p]; LayerNorm `scale` is `weight`, Embed `embedding` is `weight`. The pooling head's
fused `torch.nn.MultiheadAttention` keeps its fusion: `head/attention/in_proj_kernel` [D, 3D] is
`head.attention.in_proj_weight` transposed. Checkpoints written by transformers 4.x (and full
`SiglipModel` checkpoints) put everything under `vision_model.`; the converters take a prefix.

Pixels are NHWC float [batch, H, W, C] (already normalised as the HF image processor does);
torch-layout NCHW arrays need `x.transpose(0, 2, 3, 1)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jasper_jax.errors import UserError
from jasper_jax.models.attention import AttentionSettings, attend
from jasper_jax.models.layers import Dense, Dtype, LayerNorm, dot_product_attention, remat_layer
from jasper_jax.models.layers import partitioned as _p

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
    """The fields of an HF `SiglipVisionConfig`; defaults are HF's (siglip-base-patch16-224).

    `vision_use_head` says whether the weights hold the attention-pooling head (`head.*`).
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0  # HF field, kept so configs round-trip; inference ignores it
    vision_use_head: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"SigLIP hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(
                f"SigLIP hidden_act={self.hidden_act!r} is not supported; use one of "
                f"{sorted(ACTIVATIONS)}"
            )
        if not 0 < self.patch_size <= self.image_size:
            raise UserError(
                f"SigLIP patch_size={self.patch_size} must be in [1, image_size={self.image_size}]"
            )

    @property
    def grid_size(self) -> int:
        """Patches per side; like the HF conv, border pixels beyond a whole patch are dropped."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> SiglipVisionConfig:
        """From an HF config.json dict: a `SiglipVisionConfig`, or any config with a
        `vision_config` entry (full `SiglipConfig`, Jasper's VL config). Missing fields take HF's
        defaults, as old hub configs list only the non-default ones."""
        if "vision_config" in d:
            d = d["vision_config"] or {}
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        for field in ("image_size", "patch_size"):  # HF allows [h, w]; we support square only
            size = kwargs.get(field)
            if isinstance(size, list | tuple):
                if len(size) != 2 or size[0] != size[1]:
                    raise UserError(f"SigLIP {field}={size!r}: only square sizes are supported")
                kwargs[field] = size[0]
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "model_type": "siglip_vision_model",
            "architectures": ["SiglipVisionModel"],
            **dataclasses.asdict(self),
        }


# google/siglip-so400m-patch14-384, the Jasper vision tower: 27 x 27 = 729 patch tokens.
SIGLIP_SO400M_PATCH14_384 = SiglipVisionConfig(
    hidden_size=1152,
    intermediate_size=4304,
    num_hidden_layers=27,
    num_attention_heads=16,
    image_size=384,
    patch_size=14,
)


@flax.struct.dataclass
class SiglipVisionOutput:
    """last_hidden_state: [batch, num_patches, hidden] (after `post_layernorm`);
    pooler_output: [batch, hidden] from the attention-pooling head, or None when it is off."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array | None = None


class SiglipMLP(nn.Module):
    config: SiglipVisionConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
        h = ACTIVATIONS[cfg.hidden_act](h)
        return Dense(cfg.hidden_size, ("mlp", "embed"), dtype=self.dtype, name="fc2")(h)


class SiglipAttention(nn.Module):
    """Bidirectional multi-head self-attention over patches (no mask: every image is full)."""

    config: SiglipVisionConfig
    dtype: Dtype
    attention: AttentionSettings = AttentionSettings()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // heads

        def project(name: str) -> jax.Array:
            y = Dense(cfg.hidden_size, ("embed", "heads"), dtype=self.dtype, name=name)(x)
            return y.reshape(*x.shape[:2], heads, head_dim)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        ctx = attend(q, k, v, None, causal=False, dtype=self.dtype, settings=self.attention)
        ctx = ctx.reshape(*x.shape[:2], cfg.hidden_size)
        return Dense(cfg.hidden_size, ("heads", "embed"), dtype=self.dtype, name="out_proj")(ctx)


class SiglipEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    config: SiglipVisionConfig
    dtype: Dtype
    attention: AttentionSettings = AttentionSettings()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        # The residual stream stays float32 so 27 bf16 layers do not accumulate rounding.
        h = LayerNorm(cfg.layer_norm_eps, self.dtype, name="layer_norm1")(x)
        attention = SiglipAttention(cfg, self.dtype, self.attention, name="self_attn")
        x = x + attention(h).astype(jnp.float32)
        h = LayerNorm(cfg.layer_norm_eps, self.dtype, name="layer_norm2")(x)
        return x + SiglipMLP(cfg, self.dtype, name="mlp")(h).astype(jnp.float32)


class SiglipEncoder(nn.Module):
    config: SiglipVisionConfig
    dtype: Dtype
    remat: bool | str = False
    attention: AttentionSettings = AttentionSettings()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        layer_cls = remat_layer(SiglipEncoderLayer, self.remat)
        for i in range(self.config.num_hidden_layers):
            x = layer_cls(self.config, self.dtype, self.attention, name=f"layers_{i}")(x)
        return x


class SiglipEmbeddings(nn.Module):
    """Patch conv (kernel = stride = patch, VALID) + learned position embedding per patch."""

    config: SiglipVisionConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        patches = nn.Conv(
            cfg.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=self.dtype,
            # [p, p, C, D]: flax forbids a logical name twice, so "patch" marks the pixel input
            kernel_init=_p(nn.initializers.lecun_normal(), (None, None, "patch", "embed")),
            bias_init=_p(nn.initializers.zeros, ("embed",)),
            name="patch_embedding",
        )(pixels.astype(self.dtype))
        # [B, gh, gw, D] -> [B, gh*gw, D] is row-major, the order of HF's flatten(2).
        patches = patches.reshape(patches.shape[0], -1, cfg.hidden_size)
        position = nn.Embed(
            cfg.num_patches,
            cfg.hidden_size,
            embedding_init=_p(nn.initializers.normal(0.02), ("pos", "embed")),
            name="position_embedding",
        )(jnp.arange(cfg.num_patches)[None])
        return patches.astype(jnp.float32) + position


class SiglipAttentionPoolingHead(nn.Module):
    """HF `SiglipMultiheadAttentionPoolingHead`: a learned probe attends over all patches
    (torch `MultiheadAttention`, fused in-projection), then probe + mlp(LN(probe))."""

    config: SiglipVisionConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        probe = self.param(
            "probe", _p(nn.initializers.normal(1.0), (None, None, "embed")), (1, 1, cfg.hidden_size)
        )
        probe = jnp.broadcast_to(probe, (x.shape[0], 1, cfg.hidden_size))
        h = _FusedMultiheadAttention(cfg, self.dtype, name="attention")(probe, x)
        y = LayerNorm(cfg.layer_norm_eps, self.dtype, name="layernorm")(h)
        out = h.astype(jnp.float32) + SiglipMLP(cfg, self.dtype, name="mlp")(y)
        return out[:, 0].astype(self.dtype)


class _FusedMultiheadAttention(nn.Module):
    """torch `nn.MultiheadAttention` (batch_first): in_proj_kernel [D, 3D] = q|k|v columns."""

    config: SiglipVisionConfig
    dtype: Dtype

    @nn.compact
    def __call__(self, query: jax.Array, kv: jax.Array) -> jax.Array:
        cfg = self.config
        d, heads = cfg.hidden_size, cfg.num_attention_heads
        kernel = self.param(
            "in_proj_kernel", _p(nn.initializers.xavier_uniform(), ("embed", "heads")), (d, 3 * d)
        )
        bias = self.param("in_proj_bias", _p(nn.initializers.zeros, ("heads",)), (3 * d,))
        kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)

        def project(x: jax.Array, part: int) -> jax.Array:
            cols = slice(part * d, (part + 1) * d)
            y = jnp.dot(x.astype(self.dtype), kernel[:, cols]) + bias[cols]
            return y.reshape(*x.shape[:2], heads, d // heads)

        no_mask = jnp.zeros((1, 1, 1, 1), jnp.float32)
        ctx = dot_product_attention(
            project(query, 0), project(kv, 1), project(kv, 2), no_mask, self.dtype
        )
        ctx = ctx.reshape(*query.shape[:2], d)
        return Dense(d, ("heads", "embed"), dtype=self.dtype, name="out_proj")(ctx)


class SiglipVisionTower(nn.Module):
    """SigLIP vision transformer up to `post_layernorm`, plus the optional pooling head.

    Attributes:
      config: the architecture; `config.vision_use_head` decides whether `init` builds the head.
      dtype: compute dtype (bf16 on accelerators); parameters stay float32, norms and softmax
        run in float32.
      with_head: run the pooling head when the config has one. False skips it (the Jasper bridge
        reads only `last_hidden_state`); `apply` still accepts params that hold `head`, so the
        head weights stay in the tree and round-trip to HF unchanged.
      remat: per-layer rematerialisation policy, "none" | "full" | "dots" (or a bool).
      attention: attention implementation of the encoder layers (the pooling head's single
        probe query always runs dense).

    Args (call):
      pixels: [batch, image_size, image_size, num_channels] float, NHWC.
    Returns:
      `SiglipVisionOutput` with last_hidden_state [batch, num_patches, hidden] in `dtype` and
      pooler_output [batch, hidden] (None when the head is off or absent).
    """

    config: SiglipVisionConfig
    dtype: Dtype = jnp.float32
    with_head: bool = True
    remat: bool | str = False
    attention: AttentionSettings = AttentionSettings()

    @nn.compact
    def __call__(self, pixels: jax.Array) -> SiglipVisionOutput:
        cfg = self.config
        _check_pixels(pixels.shape, cfg)
        x = SiglipEmbeddings(cfg, self.dtype, name="embeddings")(pixels)
        x = SiglipEncoder(cfg, self.dtype, self.remat, self.attention, name="encoder")(x)
        last = LayerNorm(cfg.layer_norm_eps, self.dtype, name="post_layernorm")(x)
        pooled = None
        if cfg.vision_use_head and self.with_head:
            pooled = SiglipAttentionPoolingHead(cfg, self.dtype, name="head")(last)
        return SiglipVisionOutput(last_hidden_state=last, pooler_output=pooled)


def _check_pixels(shape: tuple[int, ...], cfg: SiglipVisionConfig) -> None:
    grid = tuple(s // cfg.patch_size for s in shape[1:3])
    if len(shape) != 4 or shape[3] != cfg.num_channels or grid != (cfg.grid_size,) * 2:
        raise UserError(
            f"SigLIP pixels have shape {tuple(shape)}; expected NHWC [batch, {cfg.image_size}, "
            f"{cfg.image_size}, {cfg.num_channels}] (resize images to image_size; transpose "
            "NCHW arrays with x.transpose(0, 2, 3, 1))"
        )


@functools.lru_cache(maxsize=8)
def abstract_params(config: SiglipVisionConfig) -> dict[str, Any]:
    """Boxed parameter shapes (`nn.LogicallyPartitioned` of ShapeDtypeStruct), no compute."""
    shape = (1, config.image_size, config.image_size, config.num_channels)
    pixels = jax.ShapeDtypeStruct(shape, jnp.float32)
    init = functools.partial(SiglipVisionTower(config).init, jax.random.key(0))
    return jax.eval_shape(init, pixels)["params"]
