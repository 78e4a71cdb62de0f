"""The fused attention kernels behind `attend`'s "flash", and how they run on a device mesh.

Kernels: cuDNN through `jax.nn.dot_product_attention(implementation="cudnn")` on GPU, and the
Pallas TPU kernel (`jax.experimental.pallas.ops.tpu.flash_attention`) on TPU. Neither can be
partitioned by XLA (a Mosaic or cuDNN custom call has no sharding rule), so under a mesh both
run inside one `jax.shard_map` (`_on_mesh`, shared by the two): batch rows split over the
`(data, fsdp)` axes, heads over `tensor`, the sequence whole on every device. kv heads split over
`tensor` with the query heads when `tensor` divides them (each device then holds whole GQA
groups); otherwise they are repeated to one per query head first. An axis that does not divide
its dimension is left out (the work is repeated along it), so an explicit "flash" still runs;
`fits_mesh` says where no axis is left out, which is where "auto" takes the kernel.

The mesh is the ambient (abstract) one, `jax.sharding.get_abstract_mesh()`: set while tracing by
`sharding.mesh_context` (the train step, `TextEncoder`). Without one the kernel runs as is, which
is right on one device.

Tested on CPU (tests/test_attention.py, tests/test_attention_mesh.py): the Pallas wrapper
through Pallas' TPU interpreter on one device, and under `shard_map` on 8 fake devices through
Pallas' HLO interpreter (`force_tpu_interpret_mode(True)`: the kernel body as plain JAX ops;
the TPU interpreter's simulated cross-device barriers need a thread per device and hang on a
2-core host), equal to dense inside a full train step. Not tested: Mosaic compilation on a real
TPU, and the cuDNN kernel (no GPU here); its sharding goes through the same `_on_mesh`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import flash_attention as fa
from jax.sharding import PartitionSpec

from jasper_jax import sharding
from jasper_jax.errors import UserError

Dtype = jnp.dtype | type
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
LANES = 128  # the Pallas kernel's block edge; lengths are padded to a multiple of it


def backend() -> str:
    """The platform the kernels are chosen for (tests replace this to simulate "tpu")."""
    return jax.default_backend()


def _mesh_layout(mesh, batch: int, heads: int, kv_heads: int) -> tuple[tuple[str, ...], bool, bool]:
    """(batch axes that divide `batch`, heads split over tensor, kv heads split with them)."""
    sizes = dict(mesh.shape)
    rows: list[str] = []
    for axis in BATCH_AXES:
        size = sizes.get(axis, 1)
        if size > 1 and batch % (size * math.prod(sizes[a] for a in rows)) == 0:
            rows.append(axis)
    tensor = sizes.get(HEAD_AXIS, 1)
    split_heads = tensor > 1 and heads % tensor == 0
    return tuple(rows), split_heads, split_heads and kv_heads % tensor == 0


def fits_mesh(mesh, batch: int, heads: int) -> bool:
    """Whether the kernel's shard_map uses every mesh axis: (data x fsdp) divides `batch` and
    tensor divides `heads` (no work repeated). True without a mesh or on one device."""
    if mesh is None or mesh.empty or mesh.size == 1:
        return True
    sizes = dict(mesh.shape)
    rows, split_heads, _ = _mesh_layout(mesh, batch, heads, heads)
    every_row_axis = rows == tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    return every_row_axis and (split_heads or sizes.get(HEAD_AXIS, 1) == 1)


def flash_applicable(platform: str, head_dim: int, dtype: Dtype) -> bool:
    """Conservative: auto only takes the kernels in their documented sweet spot; an explicit
    "flash" still tries them elsewhere."""
    if platform == "gpu":  # cuDNN flash attention: half precision, head_dim <= 128, multiple of 8
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return half and head_dim <= 128 and head_dim % 8 == 0
    # Pallas TPU: lane-aligned heads (Qwen2-1.5B's 128; not SigLIP-so400m's 72)
    return platform == "tpu" and head_dim % LANES == 0


def flash(q, k, v, key_mask, causal: bool, dtype: Dtype) -> jax.Array:
    """`attend`'s "flash" (same shapes), on the ambient mesh if there is one. On GPU, padding
    must be on the right (cuDNN takes per-row key lengths), as every encoder here produces."""
    platform = backend()
    if platform == "gpu":
        if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
            raise UserError(
                f"attention 'flash' on GPU (cuDNN) needs bfloat16/float16 compute, got "
                f"{jnp.dtype(dtype).name}; set dtype=bfloat16 or use 'blockwise'"
            )
        kernel = _cudnn
    elif platform == "tpu":
        kernel = pallas_tpu
    else:
        raise UserError(
            f"attention 'flash' needs a GPU (cuDNN) or TPU (Pallas) backend; this one is "
            f"{platform!r}: use 'blockwise' (any backend) or 'auto'"
        )
    mesh = sharding.ambient_mesh()
    local = functools.partial(kernel, causal=causal, dtype=dtype)
    if mesh is None:
        return local(q, k, v, key_mask)
    return _on_mesh(local, mesh, q, k, v, key_mask)


def _on_mesh(local, mesh, q, k, v, key_mask) -> jax.Array:
    """`local(q, k, v, key_mask)` per device under `shard_map` (see the module docstring)."""
    rows, split_heads, split_kv = _mesh_layout(mesh, q.shape[0], q.shape[2], k.shape[2])
    if split_heads and not split_kv:  # GQA groups would straddle devices: one kv per head
        group = q.shape[2] // k.shape[2]
        k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
    batch = rows if len(rows) > 1 else (rows[0] if rows else None)
    heads = HEAD_AXIS if split_heads else None
    qkv = PartitionSpec(batch, None, heads, None)
    mask = PartitionSpec(batch, None)
    # check_vma=False: a pallas/cuDNN custom call has no replication rule; axes left out of the
    # specs hold identical copies, which is what out_specs then states.
    run = jax.shard_map(
        local, mesh=mesh, in_specs=(qkv, qkv, qkv, mask), out_specs=qkv, check_vma=False
    )
    return run(q, k, v, key_mask)


def _cudnn(q, k, v, key_mask, *, causal: bool, dtype: Dtype) -> jax.Array:
    """cuDNN flash attention (GQA native). Padding as per-row key lengths; an empty row gets
    one key so that it stays finite. Untested here (no GPU)."""
    lengths = jnp.maximum(key_mask.astype(jnp.int32).sum(-1), 1)
    q, k, v = (x.astype(dtype) for x in (q, k, v))
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, key_value_seq_lengths=lengths, implementation="cudnn"
    )


def kernel_block_sizes(batch: int, q_len: int, k_len: int) -> fa.BlockSizes:
    """The Pallas kernel's tiles for per-device shapes (lengths already padded to LANES): its
    defaults (128 everywhere, one row per block), checked so that a misfit is our error, not
    Mosaic's."""
    blocks = fa.BlockSizes.get_default(batch, None, q_len, k_len, None)
    for name, length in (("query", q_len), ("key", k_len)):
        if length % LANES or length < LANES:
            raise UserError(
                f"flash attention: padded {name} length {length} is not a multiple "
                f"of the kernel's {LANES}-token blocks"
            )
    if batch < blocks.block_b:
        raise UserError(f"flash attention: {batch} rows per device, fewer than a block")
    return blocks


def pallas_tpu(q, k, v, key_mask, *, causal: bool, dtype: Dtype) -> jax.Array:
    """Pallas TPU flash attention; padding through segment ids, lengths padded to 128."""
    batch, q_len, heads, head_dim = q.shape
    k_len = k.shape[1]
    group = heads // k.shape[2]
    k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))  # the kernel has no GQA
    lq, lk = (-(-n // LANES) * LANES for n in (q_len, k_len))

    def layout(x, total):  # [B, L, H, D] -> [B, H, total, D]
        x = jnp.pad(x.astype(dtype), [(0, 0), (0, total - x.shape[1]), (0, 0), (0, 0)])
        return jnp.transpose(x, (0, 2, 1, 3))

    # Queries are segment 1; real keys segment 1 where unmasked, 0 where masked or internal
    # padding. An empty row keeps all its real keys (finite, as dense), never none.
    real = jnp.arange(lk)[None] < k_len
    mask = jnp.pad(key_mask.astype(jnp.int32), [(0, 0), (0, lk - k_len)])
    empty = mask.sum(-1, keepdims=True) == 0
    kv_seg = jnp.where(real & (empty | (mask > 0)), 1, 0).astype(jnp.int32)
    segments = fa.SegmentIds(q=jnp.ones((batch, lq), jnp.int32), kv=kv_seg)
    out = fa.flash_attention(
        layout(q, lq),
        layout(k, lk),
        layout(v, lk),
        segment_ids=segments,
        causal=causal,
        sm_scale=1.0 / math.sqrt(head_dim),
        block_sizes=kernel_block_sizes(batch, lq, lk),
    )
    return jnp.transpose(out, (0, 2, 1, 3))[:, :q_len].astype(dtype)
