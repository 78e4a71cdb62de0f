"""The vision bridge: SigLIP patch tokens -> adaptive average pool -> the text student's encoder.

References are independent code paths: the SigLIP tower and the text Embedder applied on their
own, with torch's `AdaptiveAvgPool2d` doing the pooling between them.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from jasper_jax.errors import UserError
from jasper_jax.models import embedder as embedder_lib
from jasper_jax.models.bert import BertConfig
from jasper_jax.models.embedder import Embedder, EmbedderConfig
from jasper_jax.models.multimodal import MultimodalConfig, MultimodalEmbedder, init_params
from jasper_jax.models.qwen2 import Qwen2Config
from jasper_jax.models.siglip import SiglipVisionConfig, SiglipVisionTower
from jasper_jax.train.vision_task import recall_at_1

BERT = BertConfig(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=40,
)
QWEN = Qwen2Config(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
# 20px / patch 4 = 25 patch tokens of width 24, pooled to 7 x 32 (non-dividing on both axes).
VISION = SiglipVisionConfig(
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=20,
    patch_size=4,
    vision_use_head=False,
)


def _config(encoder=BERT, tokens: int = 7) -> MultimodalConfig:
    return MultimodalConfig(EmbedderConfig(encoder, heads=(16, 8)), VISION, tokens)


def _shapes(tree) -> dict:
    return {p: tuple(x.shape) for p, x in traverse_util.flatten_dict(tree).items()}


def _pixels(batch: int = 3) -> jax.Array:
    return jax.random.normal(jax.random.key(1), (batch, 20, 20, 3))


@pytest.mark.parametrize("encoder", [BERT, QWEN], ids=["bert", "qwen2"])
def test_image_forward_equals_encoder_on_pooled_patch_tokens(encoder):
    config = _config(encoder)
    params = nn.meta.unbox(init_params(config, jax.random.key(0)))
    got = MultimodalEmbedder(config).apply(
        {"params": params}, _pixels(), method=MultimodalEmbedder.embed_images
    )

    patches = SiglipVisionTower(VISION, with_head=False).apply(
        {"params": params["vision"]}, _pixels()
    )
    pooled = torch.nn.AdaptiveAvgPool2d((7, encoder.hidden_size))(
        torch.from_numpy(np.asarray(patches.last_hidden_state))
    ).numpy()
    mask = jnp.ones((3, 7), jnp.int32)
    text_params = {"encoder": params["encoder"], "heads": params["heads"]}
    want = Embedder(config.text).apply(
        {"params": text_params}, jnp.zeros_like(mask), mask, inputs_embeds=jnp.asarray(pooled)
    )
    assert set(got) == set(want) == {"pooled", "dense_16", "dense_8"}
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-5)
    # images differ, so their vectors do: the forward is not constant
    assert float(jnp.abs(got["pooled"][0] - got["pooled"][1]).max()) > 1e-3


def test_text_forward_is_the_plain_embedder():
    config = _config()
    params = nn.meta.unbox(init_params(config, jax.random.key(0)))
    ids = jax.random.randint(jax.random.key(2), (2, 9), 1, 64)
    mask = jnp.array([[1] * 9, [1] * 5 + [0] * 4])
    got = MultimodalEmbedder(config).apply(
        {"params": params}, ids, mask, method=MultimodalEmbedder.embed_text
    )
    text_params = {"encoder": params["encoder"], "heads": params["heads"]}
    want = Embedder(config.text).apply({"params": text_params}, ids, mask)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_no_parameters_besides_the_vision_tower():
    config = _config()
    params = nn.meta.unbox(init_params(config, jax.random.key(0)))
    assert set(params) == {"vision", "encoder", "heads"}
    text_alone = nn.meta.unbox(embedder_lib.init_params(config.text, jax.random.key(0)))
    tower_alone = SiglipVisionTower(VISION, with_head=False).init(jax.random.key(0), _pixels(1))[
        "params"
    ]
    assert _shapes({k: params[k] for k in ("encoder", "heads")}) == _shapes(text_alone)
    assert _shapes(params["vision"]) == _shapes(nn.meta.unbox(tower_alone))


def test_too_many_image_tokens_is_a_user_error():
    with pytest.raises(UserError, match="image_tokens=41"):
        _config(BERT, tokens=41)


def test_recall_at_1_counts_own_or_identical_caption():
    captions = ["a", "b", "c", "a"]
    images = np.eye(4, dtype=np.float32)
    texts = np.eye(4, dtype=np.float32)[[0, 2, 1, 0]]  # image 1 <-> caption "c", image 3 -> "a"
    hits = recall_at_1(images, texts, captions, group=4)
    # image 0 finds captions 0 and 3 (both "a"); image 1 finds "c" (wrong); image 2 finds "b"
    # (wrong); image 3's best is caption 0, whose text equals its own.
    np.testing.assert_array_equal(hits, [True, False, False, True])
    assert recall_at_1(images, texts, captions, group=3).shape == (3,)  # remainder dropped
