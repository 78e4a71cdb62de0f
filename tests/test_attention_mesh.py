"""Flash attention under a device mesh (issue 20 part 1), on 8 fake CPU devices.

The Pallas TPU kernel runs in a `shard_map` (jasper_jax/models/flash.py). CPU has no Mosaic, so
the kernel runs through Pallas' HLO interpreter (`force_tpu_interpret_mode(True)`: the kernel
body as plain JAX ops, every device at once); Pallas' TPU interpreter, which
tests/test_attention.py uses on one device, simulates cross-device barriers with one thread per
device and hangs on a host with fewer cores than fake devices. `flash.backend` is replaced by
"tpu" so that `attend` takes the TPU branch.
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from jax.experimental.pallas import tpu as pltpu

from jasper_jax import sharding
from jasper_jax.config import load_config
from jasper_jax.errors import UserError
from jasper_jax.losses import LossConfig
from jasper_jax.models import flash
from jasper_jax.models.attention import AttentionSettings, attend, resolve_implementation
from jasper_jax.models.embedder import Embedder, EmbedderConfig, abstract_params, init_params
from jasper_jax.models.qwen2 import Qwen2Config
from jasper_jax.train.state import init_state
from jasper_jax.train.step import make_train_step, text_forward

MESHES = [(1, 8, 1), (2, 2, 2), (2, 1, 4)]  # (data, fsdp, tensor)
DENSE = AttentionSettings("dense")
BATCH, LENGTH, TEACHER = 8, 1040, 16  # > the paper's 1024-key block: "auto" leaves dense
# Unit loss weights: the paper's (10, 200, 20) scale gradients to ~100, where float32 summation
# order alone (dense on the mesh vs dense on one device) moves them by 3.4e-5.
LOSS = LossConfig(cosine_weight=1.0, similarity_weight=1.0, resim_weight=1.0)


@pytest.fixture
def tpu_kernels(monkeypatch):
    """`attend` takes the TPU branch; records the per-device q shape each kernel call sees."""
    seen, kernel = [], flash.pallas_tpu

    def recording(q, k, v, key_mask, **kw):
        seen.append((tuple(q.shape), tuple(k.shape)))
        return kernel(q, k, v, key_mask, **kw)

    monkeypatch.setattr(flash, "backend", lambda: "tpu")
    monkeypatch.setattr(flash, "pallas_tpu", recording)
    with pltpu.force_tpu_interpret_mode(True):
        yield seen


def paper_long_attention() -> tuple[AttentionSettings, str]:
    """The attention settings and remat policy of configs/jasper_paper.py:long."""
    c = load_config("configs/jasper_paper.py:long")
    return AttentionSettings(c.model.attention, int(c.model.attention_block)), c.model.remat


def tiny_qwen2() -> EmbedderConfig:
    """4 query heads over 2 kv heads (GQA) of width 128 (auto takes the TPU kernel for
    lane-aligned heads only, as Qwen2-1.5B's), on a 64-wide residual stream."""
    encoder = Qwen2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        head_dim_override=128,
    )
    return EmbedderConfig(encoder=encoder, heads=(TEACHER,))


def train_batch() -> dict:
    """Right-padded rows of 1040 down to 300 tokens (no empty row: flash keeps those finite
    but, unlike dense, does not average every key)."""
    rng = np.random.RandomState(0)
    lengths = np.linspace(LENGTH, 300, BATCH).astype(int)
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask, rng.randint(2, 64, mask.shape), 0).astype(np.int32)
    teacher = rng.randn(BATCH, TEACHER).astype(np.float32)
    return {"input_ids": ids, "attention_mask": mask, "teacher": teacher}


def one_step(cfg, attention, remat, mesh):
    """(parameter change, metrics, head vectors) of one full train step with SGD(lr=1), so
    the change is minus the gradient. mesh None: one device, no mesh."""
    model = Embedder(cfg, remat=remat, attention=attention)
    batch = train_batch()
    params = jax.jit(lambda: nn.meta.unbox(init_params(cfg, jax.random.key(0))))()
    if mesh is not None:
        params = jax.device_put(params, sharding.param_shardings(abstract_params(cfg), mesh))
        rows = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
        batch = {k: rows(v) for k, v in batch.items()}
    paths = frozenset(traverse_util.flatten_dict(params))
    tx = optax.sgd(1.0)
    forward = text_forward(model, cfg.head_names, dropout=False)
    step = make_train_step(forward, LOSS, tx, paths, optax.constant_schedule(1.0), mesh=mesh)
    state = jax.jit(lambda p: init_state(p, paths, tx, seed=0))(params)
    new_state, metrics = jax.jit(step)(state, batch)

    def encode(params, ids, mask):
        with sharding.mesh_context(mesh):
            return model.apply({"params": params}, ids, mask)

    vectors = jax.jit(encode)(params, batch["input_ids"], batch["attention_mask"])
    delta = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), new_state.params, params)
    return delta, jax.tree.map(np.asarray, metrics), jax.tree.map(np.asarray, vectors)


@pytest.fixture(scope="module")
def dense_reference():
    """One step of the same student with dense attention on one device, no mesh."""
    settings, remat = paper_long_attention()
    return one_step(tiny_qwen2(), DENSE, remat, None)


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_flash_on_mesh_equals_dense_in_train_step(shape, tpu_kernels, dense_reference):
    settings, remat = paper_long_attention()
    assert (settings.implementation, settings.block_size, remat) == ("auto", 1024, "full")
    mesh = sharding.make_mesh(shape)
    began = time.perf_counter()
    delta, metrics, vectors = one_step(tiny_qwen2(), settings, remat, mesh)
    seconds = time.perf_counter() - began
    # auto took the kernel, per device: rows over data x fsdp, heads over tensor, all positions
    data, fsdp, tensor = shape
    local_q = (BATCH // (data * fsdp), LENGTH, 4 // tensor, 128)
    assert tpu_kernels and {q for q, _ in tpu_kernels} == {local_q}
    # kv heads: split with their query heads where tensor divides 2, else one per query head
    local_kv = 2 // tensor if 2 % tensor == 0 else 4 // tensor
    assert {k[2] for _, k in tpu_kernels} == {local_kv}
    ref_delta, ref_metrics, ref_vectors = dense_reference
    diffs = {"loss": abs(float(metrics["loss"]) - float(ref_metrics["loss"]))}
    for name, got, want in (("vectors", vectors, ref_vectors), ("grads", delta, ref_delta)):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
            diffs[name] = max(diffs.get(name, 0.0), float(np.abs(a - b).max()))
    np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    print(f"mesh {shape}: max abs diff {diffs}, {seconds:.1f} s")


def test_flash_on_mesh_where_axes_do_not_divide(tpu_kernels):
    """Explicit "flash" where tensor (4) divides neither 6 heads nor does data (2) divide 3
    rows: those axes are left out (work repeated), still equal to dense."""
    rng = np.random.RandomState(1)
    q = jnp.asarray(rng.randn(3, 150, 6, 16), jnp.float32)
    k, v = (jnp.asarray(rng.randn(3, 150, 2, 16), jnp.float32) for _ in range(2))
    mask = jnp.asarray((np.arange(150)[None] < np.array([[150], [90], [7]])).astype(np.int32))
    mesh = sharding.make_mesh((2, 1, 4))

    def run(q, k, v, settings):
        with sharding.mesh_context(mesh):
            return attend(q, k, v, mask, causal=True, dtype=jnp.float32, settings=settings)

    placed = jax.device_put((q, k, v), sharding.replicated(mesh))
    grad = jax.jit(jax.grad(lambda *a: (run(*a, AttentionSettings("flash")) ** 2).sum(), (0, 1, 2)))
    ref = jax.grad(lambda *a: (run(*a, DENSE) ** 2).sum(), (0, 1, 2))(q, k, v)
    for a, b in zip(grad(*placed), ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    assert {s for s, _ in tpu_kernels} == {(3, 150, 6, 16)}  # whole batch and heads per device


def test_auto_takes_flash_only_where_the_mesh_layout_fits():
    s = AttentionSettings("auto", 1024)
    mesh = jax.sharding.AbstractMesh((2, 2, 2), sharding.MESH_AXES)

    def pick(backend, batch, heads, mesh=mesh, dtype=jnp.bfloat16, head_dim=128):
        return resolve_implementation(
            s,
            k_len=4096,
            head_dim=head_dim,
            dtype=dtype,
            has_bias=False,
            backend=backend,
            batch=batch,
            heads=heads,
            mesh=mesh,
        )

    assert pick("tpu", batch=8, heads=12) == "flash"  # 2 rows, 6 heads per device
    assert pick("gpu", batch=4, heads=2) == "flash"
    assert pick("tpu", batch=6, heads=12) == "blockwise"  # data x fsdp = 4 does not divide 6
    assert pick("tpu", batch=8, heads=3) == "blockwise"  # tensor 2 does not divide 3 heads
    assert pick("tpu", batch=8, heads=12, head_dim=72) == "blockwise"  # not lane-aligned
    assert pick("gpu", batch=8, heads=12, dtype=jnp.float32) == "blockwise"  # cuDNN: half only
    fsdp8 = jax.sharding.AbstractMesh((1, 8, 1), sharding.MESH_AXES)
    assert pick("tpu", batch=4, heads=12, mesh=fsdp8) == "blockwise"
    assert pick("tpu", batch=16, heads=12, mesh=fsdp8) == "flash"
    one = jax.sharding.AbstractMesh((1, 1, 1), sharding.MESH_AXES)
    assert pick("tpu", batch=3, heads=3, mesh=one) == "flash"  # one device: nothing to split
    # no mesh on this 8-device host: the layout is unknown, auto stays off the kernel
    assert jax.device_count() == 8 and jax.sharding.get_abstract_mesh().empty
    assert pick("tpu", batch=8, heads=12, mesh=None) == "blockwise"
    # the ambient mesh is read when none is given
    with sharding.mesh_context(sharding.make_mesh((2, 2, 2))):
        assert pick("tpu", batch=8, heads=12, mesh=None) == "flash"
        assert pick("tpu", batch=6, heads=12, mesh=None) == "blockwise"


def test_kernel_block_sizes_fit_per_device_shapes():
    blocks = flash.kernel_block_sizes(1, 1152, 1152)
    edges = (blocks.block_b, blocks.block_q, blocks.block_k_major, blocks.block_k)
    assert edges == (1, 128, 128, 128)
    assert 1152 % blocks.block_q_dkv == 0 and 1152 % blocks.block_k_dq == 0
    with pytest.raises(UserError, match="key length 200 is not a multiple of .*128"):
        flash.kernel_block_sizes(1, 256, 200)
