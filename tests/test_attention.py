"""Attention implementations and remat policies: blockwise equals dense (outputs and gradients),
in every encoder; "auto" resolves as documented; blockwise memory does not grow with L^2; the
config fields are validated."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jasper_jax.config import load_config
from jasper_jax.errors import UserError
from jasper_jax.models.attention import AttentionSettings, attend, resolve_implementation
from jasper_jax.models.bert import BertConfig, BertEncoder
from jasper_jax.models.embedder import Embedder, EmbedderConfig
from jasper_jax.models.layers import remat_policy_name
from jasper_jax.models.mpnet import MPNetConfig, MPNetEncoder
from jasper_jax.models.qwen2 import Qwen2Config, Qwen2Encoder
from jasper_jax.models.siglip import SiglipVisionConfig, SiglipVisionTower

DENSE = AttentionSettings("dense")
BLOCK = 4  # small blocks: several query and key blocks at test lengths


def qkv(batch, q_len, k_len, heads, kv_heads, head_dim=8, seed=0):
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(batch, q_len, heads, head_dim), jnp.float32)
    k = jnp.asarray(rng.randn(batch, k_len, kv_heads, head_dim), jnp.float32)
    v = jnp.asarray(rng.randn(batch, k_len, kv_heads, head_dim), jnp.float32)
    return q, k, v


def padding_mask(batch, length):
    """Row 0 full, row 1 half, the last row fully padded (an empty row of an encode batch)."""
    mask = np.ones((batch, length), np.int32)
    mask[1, length // 2 :] = 0
    mask[-1] = 0
    return jnp.asarray(mask)


CASES = {  # name: (q_len = k_len, heads, kv_heads, causal, with bias)
    "padding": (13, 4, 4, False, False),
    "causal": (13, 4, 4, True, False),
    "gqa": (13, 6, 2, False, False),
    "gqa-causal": (16, 6, 3, True, False),
    "bias": (11, 4, 4, False, True),
    "bias-gqa-causal": (9, 4, 2, True, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_blockwise_equals_dense_outputs_and_gradients(case):
    length, heads, kv_heads, causal, with_bias = CASES[case]
    q, k, v = qkv(3, length, length, heads, kv_heads)
    mask = padding_mask(3, length)
    rng = np.random.RandomState(1)
    bias = jnp.asarray(rng.randn(1, heads, length, length), jnp.float32) if with_bias else None
    cotangent = jnp.asarray(rng.randn(3, length, heads, q.shape[-1]), jnp.float32)

    def run(settings):
        def loss(q, k, v, bias):
            out = attend(
                q, k, v, mask, causal=causal, dtype=jnp.float32, settings=settings, bias=bias
            )
            return (out * cotangent).sum(), out

        grad = jax.grad(loss, argnums=(0, 1, 2, 3) if with_bias else (0, 1, 2), has_aux=True)
        return jax.jit(grad)(q, k, v, bias)

    dense_grads, dense_out = run(DENSE)
    block_grads, block_out = run(AttentionSettings("blockwise", BLOCK))
    assert np.isfinite(np.asarray(block_out)).all()
    np.testing.assert_allclose(block_out, dense_out, atol=1e-5)
    for a, b in zip(block_grads, dense_grads, strict=True):
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the empty row averages every key, as dense does (no NaN)
    np.testing.assert_allclose(
        block_out[-1, 0], jnp.repeat(v[-1].mean(0), heads // kv_heads, axis=0), atol=1e-5
    )


def test_blockwise_cross_lengths_and_bfloat16():
    q, k, v = qkv(2, 7, 10, 4, 2)  # q_len != k_len, neither a multiple of the block
    mask = jnp.asarray(np.array([[1] * 10, [1] * 6 + [0] * 4], np.int32))
    dense = attend(q, k, v, mask, causal=False, dtype=jnp.float32, settings=DENSE)
    block = attend(
        q, k, v, mask, causal=False, dtype=jnp.float32, settings=AttentionSettings("blockwise", 3)
    )
    np.testing.assert_allclose(block, dense, atol=1e-5)
    bf = [
        attend(
            *(x.astype(jnp.bfloat16) for x in (q, k, v)),
            mask,
            causal=False,
            dtype=jnp.bfloat16,
            settings=s,
        )
        for s in (DENSE, AttentionSettings("blockwise", 3))
    ]
    assert bf[1].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(bf[1]), np.float32(bf[0]), atol=3e-2)


def test_auto_resolution():
    kw = dict(head_dim=128, has_bias=False)
    s = AttentionSettings("auto", 512)
    assert resolve_implementation(s, k_len=512, dtype=jnp.float32, backend="cpu", **kw) == "dense"
    assert (
        resolve_implementation(s, k_len=513, dtype=jnp.float32, backend="cpu", **kw) == "blockwise"
    )
    # on this machine (CPU) auto never picks a kernel it does not have
    assert jax.default_backend() == "cpu"
    assert resolve_implementation(s, k_len=8192, dtype=jnp.bfloat16, **kw) == "blockwise"
    # accelerators: the fused kernels where applicable (one device here: no layout to fit; the
    # mesh cases are in tests/test_attention_mesh.py)
    kw["mesh"] = jax.sharding.AbstractMesh((1,), ("data",))
    assert resolve_implementation(s, k_len=4096, dtype=jnp.bfloat16, backend="gpu", **kw) == "flash"
    assert (
        resolve_implementation(s, k_len=4096, dtype=jnp.float32, backend="gpu", **kw) == "blockwise"
    )
    assert resolve_implementation(s, k_len=4096, dtype=jnp.float32, backend="tpu", **kw) == "flash"
    biased = dict(kw, has_bias=True)
    assert resolve_implementation(s, k_len=4096, dtype=jnp.float32, backend="tpu", **biased) == (
        "blockwise"
    )
    odd = dict(kw, head_dim=72)  # SigLIP-so400m heads: not lane-aligned
    assert resolve_implementation(s, k_len=4096, dtype=jnp.float32, backend="tpu", **odd) == (
        "blockwise"
    )
    explicit = AttentionSettings("dense")
    assert resolve_implementation(explicit, k_len=8192, dtype=jnp.float32, **kw) == "dense"


def test_flash_on_cpu_and_bad_settings_are_clear_errors():
    q, k, v = qkv(1, 8, 8, 2, 2)
    with pytest.raises(UserError, match="'flash' needs a GPU.*'cpu'.*blockwise"):
        attend(q, k, v, None, causal=False, dtype=jnp.float32, settings=AttentionSettings("flash"))
    with pytest.raises(UserError, match="'sparse'.*choose one of"):
        AttentionSettings("sparse")
    with pytest.raises(UserError, match="block_size 0"):
        AttentionSettings("blockwise", 0)


def test_blockwise_memory_does_not_grow_with_length_squared():
    """Compiled temp bytes of forward + backward at L=4096 (XLA's own accounting)."""
    length = 4096
    q = jax.ShapeDtypeStruct((1, length, 4, 16), jnp.float32)
    k = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def temp_bytes(settings):
        def loss(q, k, v, mask):
            out = attend(q, k, v, mask, causal=False, dtype=jnp.float32, settings=settings)
            return out.sum()

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(q, k, k, mask).compile().memory_analysis().temp_size_in_bytes

    dense, block = temp_bytes(DENSE), temp_bytes(AttentionSettings("blockwise", 512))
    scores = 4 * length * length * 4  # one [heads, L, L] float32 matrix: 256 MiB
    assert dense >= scores
    assert block < scores / 4 and block * 8 < dense


def encoder_cases():
    bert = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    mpnet = MPNetConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=34,
    )
    qwen = Qwen2Config(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return {
        "bert": (BertEncoder, bert),
        "mpnet": (MPNetEncoder, mpnet),
        "qwen2": (Qwen2Encoder, qwen),
        "qwen2-causal": (Qwen2Encoder, dataclasses.replace(qwen, is_causal=True)),
    }


def batch(length=13, vocab=50):
    rng = np.random.RandomState(2)
    mask = np.ones((3, length), np.int32)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    ids = np.where(mask, rng.randint(2, vocab, mask.shape), 1).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.parametrize("name", sorted(encoder_cases()))
def test_every_encoder_blockwise_equals_dense(name):
    cls, cfg = encoder_cases()[name]
    ids, mask = batch()
    params = cls(cfg).init(jax.random.key(0), ids, mask)
    blockwise = cls(cfg, attention=AttentionSettings("blockwise", BLOCK))
    real = np.asarray(mask, bool)

    def pooled(module, params):
        hidden = module.apply(params, ids, mask)
        return (hidden * mask[..., None]).sum(1).sum()

    def run(module):
        grad = jax.grad(lambda p: pooled(module, p))
        return jax.jit(lambda p: (module.apply(p, ids, mask), grad(p)))(params)

    ref, g_ref = run(cls(cfg, attention=DENSE))
    out, g_out = run(blockwise)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_out), jax.tree.leaves(g_ref), strict=True):
        # float32 sums in another order: parameter gradients of size ~1 agree to ~1e-5
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_siglip_blockwise_equals_dense():
    cfg = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=24,
        patch_size=4,
    )  # 36 patches: 9 blocks of 4
    pixels = jnp.asarray(np.random.RandomState(3).randn(2, 24, 24, 3), jnp.float32)
    params = SiglipVisionTower(cfg).init(jax.random.key(0), pixels)
    run = jax.jit(
        lambda s: SiglipVisionTower(cfg, attention=s).apply(params, pixels), static_argnums=0
    )
    ref, out = run(DENSE), run(AttentionSettings("blockwise", BLOCK))
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state, atol=1e-5)
    np.testing.assert_allclose(out.pooler_output, ref.pooler_output, atol=1e-5)


@pytest.mark.parametrize("arch", ["bert", "qwen2"])
def test_remat_policies_give_the_same_gradients(arch):
    _, enc = encoder_cases()[arch]
    cfg = EmbedderConfig(encoder=enc, heads=(8,))
    ids, mask = batch()
    params = nn.meta.unbox(Embedder(cfg).init(jax.random.key(1), ids, mask)["params"])

    def grads(remat, attention=DENSE):
        model = Embedder(cfg, remat=remat, attention=attention)

        def loss(p):
            out = model.apply({"params": p}, ids, mask, deterministic=False, rngs={"dropout": key})
            return (out["dense_8"] ** 3).sum()

        return jax.jit(jax.grad(loss))(params)

    key = jax.random.key(7)  # BERT runs with dropout: remat must replay the same masks
    ref = grads("none")
    for remat in ("full", "dots"):
        for a, b in zip(jax.tree.leaves(grads(remat)), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
    if arch == "qwen2":  # remat around blockwise attention (its own checkpoints inside)
        blockwise = grads("full", AttentionSettings("blockwise", BLOCK))
        for a, b in zip(jax.tree.leaves(blockwise), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    # same parameter tree whatever the policy or implementation
    other = Embedder(cfg, remat="dots", attention=AttentionSettings("blockwise", BLOCK))
    tree = jax.eval_shape(lambda: other.init(jax.random.key(1), ids, mask))["params"]
    assert jax.tree.structure(nn.meta.unbox(tree)) == jax.tree.structure(params)


def test_remat_names():
    assert [remat_policy_name(x) for x in (True, False, "true", "dots")] == [
        "full",
        "none",
        "full",
        "dots",
    ]


def test_bad_remat_name_is_a_clear_error():
    _, enc = encoder_cases()["bert"]
    ids, mask = batch()
    with pytest.raises(UserError, match="remat 'some'.*none.*full.*dots"):
        Embedder(EmbedderConfig(encoder=enc), remat="some").init(jax.random.key(0), ids, mask)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.remat=partial", "model.remat: 'partial' must be one of"),
        ("--config.model.attention=sparse", "model.attention: 'sparse' must be one of"),
        ("--config.model.attention_block=0", "model.attention_block: 0 must be >= 1"),
        ("--config.model.rope_scaling=ntk:2", "model.rope_scaling: .*'ntk'.*supported"),
        ("--config.model.rope_scaling=yarn", "model.rope_scaling: .*TYPE:FACTOR"),
    ],
)
def test_config_validation_names_the_field(override, message):
    with pytest.raises(UserError, match=message):
        load_config("configs/embedded_default.py:1", [override])


def test_config_fields_accepted():
    c = load_config(
        "configs/embedded_default.py:1",
        [
            "--config.model.remat=dots",
            "--config.model.attention=blockwise",
            "--config.model.attention_block=256",
            "--config.model.rope_scaling=yarn:4:512",
        ],
    )
    assert (c.model.remat, c.model.attention, c.model.attention_block) == ("dots", "blockwise", 256)
    assert load_config("configs/jasper_paper.py:1").model.remat == "full"


def test_blockwise_sharded_matches_unsharded():
    """Blockwise attention under the (data, fsdp, tensor) = (2, 1, 4) mesh, params sharded."""
    from jasper_jax import sharding
    from jasper_jax.models.embedder import abstract_params

    _, enc = encoder_cases()["qwen2"]
    cfg = EmbedderConfig(encoder=enc, heads=(8,))
    ids, mask = batch(length=19)
    ids, mask = jnp.tile(ids, (3, 1))[:8], jnp.tile(mask, (3, 1))[:8]
    model = Embedder(cfg, attention=AttentionSettings("blockwise", BLOCK))
    params = nn.meta.unbox(model.init(jax.random.key(2), ids, mask)["params"])
    run = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m)["dense_8"])
    plain = run(params, ids, mask)
    mesh = sharding.make_mesh((2, 1, 4))
    sharded_params = jax.device_put(params, sharding.param_shardings(abstract_params(cfg), mesh))
    rows = sharding.batch_sharding(mesh, 2)
    out = run(sharded_params, jax.device_put(ids, rows), jax.device_put(mask, rows))
    np.testing.assert_allclose(np.asarray(out), np.asarray(plain), atol=1e-5)


def test_pallas_tpu_wrapper_in_interpret_mode():
    """The TPU flash branch (segment ids, padding to 128, GQA, layout) through Pallas' TPU
    interpreter on CPU: equals dense on every non-empty row, finite on the empty one. (Mosaic
    compilation on a real TPU stays untested here.)"""
    from jax.experimental.pallas import tpu as pltpu

    from jasper_jax.models.flash import pallas_tpu

    q, k, v = qkv(3, 150, 150, 4, 2, head_dim=16)
    mask = padding_mask(3, 150)
    dense = lambda q: attend(q, k, v, mask, causal=True, dtype=jnp.float32, settings=DENSE)
    flash = lambda q: pallas_tpu(q, k, v, mask, causal=True, dtype=jnp.float32)
    cotangent = jnp.asarray(np.random.RandomState(4).randn(*q.shape), jnp.float32)
    cotangent = cotangent.at[-1].set(0.0)  # the empty row's output is not dense's
    with pltpu.force_tpu_interpret_mode():
        out, pull = jax.vjp(flash, q)
        (grad,) = pull(cotangent)
    ref, pull_ref = jax.vjp(dense, q)
    (grad_ref,) = pull_ref(cotangent)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out[:-1], ref[:-1], atol=1e-5)
    np.testing.assert_allclose(grad, grad_ref, atol=1e-5)
