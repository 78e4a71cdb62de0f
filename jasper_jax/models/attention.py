"""Attention whose memory need not grow with seq^2: one entry point, `attend`, four implementations.

- "dense": the plain softmax over the whole [q_len, k_len] score matrix (what the encoders have
  always run; parity-tested against transformers).
- "blockwise": pure JAX on any backend. Query blocks x key blocks with an online (running max,
  running sum) softmax in float32; neither the scores nor the [B, 1, L, L] mask are ever built.
  Each query block is a `jax.checkpoint`, so the backward pass recomputes one block at a time:
  memory O(block * k_len) forward and backward instead of O(q_len * k_len).
- "flash": the fused kernels where the backend has them (cuDNN on GPU, Pallas on TPU), in a
  `shard_map` over the ambient mesh; see `jasper_jax.models.flash` (and what of it is tested).
- "auto": dense up to `block_size` keys (small scores, the tested path, what every shipped
  config runs at); beyond that flash where available, applicable and laid out without repeated
  work on the ambient mesh (`flash.fits_mesh`), else blockwise.

Masking follows the dense path everywhere: a masked score gets float32's most negative value
added (not -inf), so a row whose keys are all masked (an empty padding row) averages every key
instead of producing NaN; blockwise reproduces that exactly, flash keeps such rows finite.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jasper_jax.errors import UserError
from jasper_jax.models import flash as fused
from jasper_jax.models.layers import Dtype, attention_bias, dot_product_attention

IMPLEMENTATIONS = ("auto", "dense", "blockwise", "flash")
_NEG = float(jnp.finfo(jnp.float32).min)


@dataclasses.dataclass(frozen=True)
class AttentionSettings:
    """How the encoders compute attention (hashable: a Flax module attribute).

    Attributes:
      implementation: one of IMPLEMENTATIONS (see the module docstring).
      block_size: query/key block length of "blockwise", and the key length above which "auto"
        leaves the dense path.
    """

    implementation: str = "auto"
    block_size: int = 512

    def __post_init__(self):
        if self.implementation not in IMPLEMENTATIONS:
            raise UserError(
                f"attention implementation {self.implementation!r}: choose one of {IMPLEMENTATIONS}"
            )
        if int(self.block_size) < 1:
            raise UserError(f"attention block_size {self.block_size} must be >= 1")


def resolve_implementation(
    settings: AttentionSettings,
    *,
    k_len: int,
    head_dim: int,
    dtype: Dtype,
    has_bias: bool,
    backend: str | None = None,
    batch: int = 1,
    heads: int = 1,
    mesh: Any = None,
) -> str:
    """The implementation `attend` runs: `settings.implementation`, or auto's choice.

    Auto takes a fused kernel only where it compiles and shards without repeated work: the
    backend has one for this head_dim/dtype, no additive bias, and on the mesh (data x fsdp)
    divides `batch` and tensor divides `heads` (per-device shapes; `flash.fits_mesh`). With no
    mesh on a host of several devices the arrays' layout is unknown, so auto stays blockwise.

    backend: "cpu", "gpu" or "tpu"; None: `flash.backend()` (`jax.default_backend()`).
    mesh: a `Mesh`/`AbstractMesh`; None reads the ambient one (`sharding.mesh_context`).
    """
    if settings.implementation != "auto":
        return settings.implementation
    if k_len <= settings.block_size:
        return "dense"
    if has_bias or not fused.flash_applicable(backend or fused.backend(), head_dim, dtype):
        return "blockwise"
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty and jax.device_count() > 1:
        return "blockwise"
    return "flash" if fused.fits_mesh(mesh, batch, heads) else "blockwise"


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array | None,
    *,
    causal: bool,
    dtype: Dtype,
    settings: AttentionSettings = AttentionSettings(),
    bias: jax.Array | None = None,
) -> jax.Array:
    """Scaled dot-product attention with padding, optional causal mask, GQA and additive bias.

    Args:
      q: [batch, q_len, heads, head_dim]; k, v: [batch, k_len, kv_heads, head_dim] with
        heads % kv_heads == 0 (each kv head serves heads // kv_heads query heads).
      key_mask: [batch, k_len], 1 for tokens and 0 for padding; None: every key is a token.
      causal: query i sees keys 0..i only (q_len == k_len).
      dtype: dtype of the output and of the probabilities times values.
      settings: which implementation (see `AttentionSettings`).
      bias: optional additive float bias broadcastable to [batch, heads, q_len, k_len] (MPNet's
        relative positions); added before the mask.
    Returns:
      [batch, q_len, heads, head_dim] in `dtype`.
    """
    if key_mask is None:
        key_mask = jnp.ones((k.shape[0], k.shape[1]), jnp.int32)
    impl = resolve_implementation(
        settings,
        k_len=k.shape[1],
        head_dim=q.shape[-1],
        dtype=dtype,
        has_bias=bias is not None,
        batch=q.shape[0],
        heads=q.shape[2],
    )
    if impl == "dense":
        full = attention_bias(key_mask, causal)
        full = full if bias is None else full + bias.astype(jnp.float32)
        return dot_product_attention(q, k, v, full, dtype)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, key_mask, causal, dtype, settings.block_size, bias)
    if bias is not None:
        raise UserError(
            "attention 'flash' takes no additive bias (MPNet's relative positions); use "
            "'blockwise' or 'auto'"
        )
    return fused.flash(q, k, v, key_mask, causal, dtype)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    key_mask: jax.Array,
    causal: bool,
    dtype: Dtype,
    block_size: int,
    bias: jax.Array | None = None,
) -> jax.Array:
    """`attend`'s "blockwise" path (same arguments); lengths need not divide `block_size`."""
    batch, q_len, heads, head_dim = q.shape
    k_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    bq, bk = min(block_size, q_len), min(block_size, k_len)
    nq, nk = -(-q_len // bq), -(-k_len // bk)
    q_blocks = _split_blocks(q.reshape(batch, q_len, kv_heads, group, head_dim), nq, bq)
    k_blocks, v_blocks = _split_blocks(k, nk, bk), _split_blocks(v, nk, bk)
    mask_blocks = _split_blocks(key_mask.astype(jnp.int32), nk, bk)
    if bias is not None:
        bias = _padded_bias(bias.astype(jnp.float32), nq * bq, nk * bk)
    norm = jnp.sqrt(jnp.float32(head_dim))
    internal_pad = nk * bk != k_len

    def key_step(carry, xs, q_blk, q_pos, q_index):
        k_blk, v_blk, mask_blk, k_index = xs
        k_pos = k_index * bk + jnp.arange(bk)
        allowed = mask_blk[:, None, None, None, :].astype(bool)
        if causal:
            allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
        add = jnp.where(allowed, 0.0, _NEG).astype(jnp.float32)
        if bias is not None:
            add = add + _bias_block(bias, q_index * bq, k_index * bk, bq, bk, kv_heads, group)
        # Keys beyond k_len do not exist (not even as masked padding).
        exists = (k_pos < k_len) if internal_pad else None
        return _online_softmax_step(carry, q_blk, k_blk, v_blk, add, norm, exists, dtype), None

    @jax.checkpoint
    def query_block(q_blk, q_index):
        q_pos = q_index * bq + jnp.arange(bq)
        shape = (batch, kv_heads, group, bq)
        init = (
            jnp.full(shape, -jnp.inf, jnp.float32),
            jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32),
        )
        xs = (k_blocks, v_blocks, mask_blocks, jnp.arange(nk))
        step = lambda c, x: key_step(c, x, q_blk, q_pos, q_index)
        (_, total, acc), _ = jax.lax.scan(step, init, xs)
        return (acc / total[..., None]).astype(dtype)  # total >= 1: the max term is exp(0)

    out = jax.lax.map(lambda a: query_block(*a), (q_blocks, jnp.arange(nq)))
    # [nq, B, Hkv, G, bq, D] -> [B, nq * bq, heads, D]
    out = jnp.transpose(out, (1, 0, 4, 2, 3, 5)).reshape(batch, nq * bq, heads, head_dim)
    return out[:, :q_len]


def _split_blocks(x: jax.Array, n: int, size: int) -> jax.Array:
    """[B, L, ...] -> [n, B, size, ...], zero-padded at the end."""
    x = jnp.pad(x, [(0, 0), (0, n * size - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)


def _online_softmax_step(carry, q_blk, k_blk, v_blk, add, norm, exists, dtype: Dtype):
    """One key block of the running (max, sum, weighted values) softmax of one query block.

    carry: (m, total: [B, Hkv, G, bq], acc: [B, Hkv, G, bq, D]), float32.
    q_blk: [B, bq, Hkv, G, D]; k_blk, v_blk: [B, bk, Hkv, D]; add: float32 mask + bias,
    broadcastable to the scores [B, Hkv, G, bq, bk]; norm: sqrt(head_dim); exists: [bk] keys
    inside k_len, or None when the blocks hold no key beyond it.
    """
    m, total, acc = carry
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q_blk, k_blk, preferred_element_type=jnp.float32)
    s = s / norm + add
    m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(-1)))
    p = jnp.exp(s - m_new[..., None])
    if exists is not None:
        p = p * exists
    correction = jnp.exp(m - m_new)
    pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(dtype), v_blk, preferred_element_type=jnp.float32)
    return m_new, total * correction + p.sum(-1), acc * correction[..., None] + pv


def _padded_bias(bias: jax.Array, q_total: int, k_total: int) -> jax.Array:
    """Bias as 4-D [B|1, H|1, q|1, k|1], zero-padded along q and k to the block grid."""
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    q_pad = q_total - bias.shape[2] if bias.shape[2] > 1 else 0
    k_pad = k_total - bias.shape[3] if bias.shape[3] > 1 else 0
    return jnp.pad(bias, [(0, 0), (0, 0), (0, q_pad), (0, k_pad)])


def _bias_block(bias, q_start, k_start, bq, bk, kv_heads, group) -> jax.Array:
    """The [B|1, Hkv|1, G|1, bq|1, bk|1] slice of the padded bias at (q_start, k_start)."""
    if bias.shape[2] > 1:
        bias = jax.lax.dynamic_slice_in_dim(bias, q_start, bq, axis=2)
    if bias.shape[3] > 1:
        bias = jax.lax.dynamic_slice_in_dim(bias, k_start, bk, axis=3)
    b, h = bias.shape[:2]
    if h == 1:
        return bias[:, :, None]
    return bias.reshape(b, kv_heads, group, *bias.shape[2:])
