"""Gradient cache equals the plain step; per-device in-batch losses are the per-block mean."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jasper_jax.config import to_settings
from jasper_jax.losses import LossConfig, distillation_loss
from jasper_jax.models.bert import BertConfig
from jasper_jax.models.embedder import Embedder, EmbedderConfig, init_params
from jasper_jax.train.loop import train_and_evaluate
from jasper_jax.train.state import merge_params, split_params
from jasper_jax.train.step import gradcache_value_and_grad, in_batch_loss, text_forward
from tests.train_fixtures import read_metrics, tiny_config, tiny_settings, tiny_setup  # noqa: F401

BATCH, LENGTH = 16, 12


@pytest.fixture(scope="module")
def tiny():
    encoder = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    config = EmbedderConfig(encoder=encoder, pooling="mean", heads=(24, 8), default_head="dense_24")
    params = init_params(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, LENGTH + 1, size=BATCH)
    mask = (np.arange(LENGTH)[None, :] < lengths[:, None]).astype(np.int32)
    batch = {
        "input_ids": jnp.asarray(rng.integers(0, 64, size=(BATCH, LENGTH)) * mask, jnp.int32),
        "attention_mask": jnp.asarray(mask),
        "teacher": jnp.asarray(rng.normal(size=(BATCH, 24)), jnp.float32),
    }
    forward = text_forward(Embedder(config), config.head_names, dropout=False)
    return params, batch, forward


def _trainable_split(params):
    """Everything trains except the word embeddings (so the frozen half is not empty)."""
    paths = frozenset(k for k in traverse_util.flatten_dict(params) if "word_embeddings" not in k)
    return split_params(params, paths)


@pytest.mark.parametrize("chunks", [2, 4, 8])
def test_gradcache_equals_plain_value_and_grad(tiny, chunks):
    params, batch, forward = tiny
    trainable, frozen = _trainable_split(params)
    loss_fn = in_batch_loss(LossConfig())
    rng = jax.random.key(1)

    def plain(p):
        return loss_fn(*forward(merge_params(p, frozen), batch, rng))

    (want, _), want_grads = jax.jit(jax.value_and_grad(plain, has_aux=True))(trainable)
    cached = jax.jit(
        lambda p: gradcache_value_and_grad(forward, loss_fn, p, frozen, batch, rng, chunks)
    )
    (got, metrics), grads = cached(trainable)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert set(metrics) >= {"cos/dense_24", "sim/dense_8", "resim/dense_8"}
    # Summation order differs (per chunk, then across chunks): within 1e-5 of the largest
    # gradient entry, leaf by leaf.
    scale = max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want_grads))
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale)
    assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)) > 0


def test_per_device_losses_are_the_mean_over_row_blocks(tiny):
    params, batch, forward = tiny
    student, teacher = forward(params, batch, jax.random.key(0))
    got, metrics = in_batch_loss(LossConfig(), groups=4)(student, teacher)
    blocks = [slice(k * 4, (k + 1) * 4) for k in range(4)]
    per_block = [
        distillation_loss({h: v[b] for h, v in student.items()}, teacher[b], LossConfig())[0]
        for b in blocks
    ]
    np.testing.assert_allclose(got, np.mean(per_block), rtol=1e-6)
    whole, _ = in_batch_loss(LossConfig())(student, teacher)
    assert abs(float(whole) - float(got)) > 1e-4  # the switch changes what is optimised
    assert metrics["total"].shape == ()


def test_gradcache_training_run_equals_plain_run(tiny_setup, tmp_path):  # noqa: F811
    settings = {"model.dropout": False, "mesh_shape": (2, 1, 1)}
    train_and_evaluate(tiny_settings(tiny_setup, 3, **settings), tmp_path / "plain")
    cached = tiny_config(tiny_setup, 3, **settings, **{"train.gradcache_chunk": 2})
    train_and_evaluate(to_settings(cached), tmp_path / "cached")
    a = [m["train/loss"] for m in read_metrics(tmp_path / "plain")]
    b = [m["train/loss"] for m in read_metrics(tmp_path / "cached")]
    np.testing.assert_allclose(b, a, rtol=1e-5)
