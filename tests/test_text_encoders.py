"""Parity of our Flax BERT / MPNet / Qwen2 / Qwen3 encoders with transformers' torch models
(same weights)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from jasper_jax import sharding
from jasper_jax.models import hf_io
from jasper_jax.models.bert import BertConfig
from jasper_jax.models.embedder import Embedder, EmbedderConfig, abstract_params
from jasper_jax.models.mpnet import MPNetConfig, relative_position_bucket
from jasper_jax.models.qwen2 import Qwen2Config, Qwen3Config

TOL = 1e-4


def tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=120,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg).eval(), BertConfig.from_hf_dict(cfg.to_dict())


# Sizes of the tiny Qwen2 / Qwen3 decoders (GQA: 4 query heads over 2 key/value heads).
TINY_DECODER = dict(
    vocab_size=130,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_theta=10000.0,
)


def tiny_qwen2(causal: bool):
    torch.manual_seed(1)
    cfg = transformers.Qwen2Config(**TINY_DECODER)
    cfg._attn_implementation = "eager"
    ours = Qwen2Config.from_hf_dict({**cfg.to_dict(), "is_causal": causal})
    return transformers.Qwen2Model(cfg).eval(), ours


def tiny_qwen3(causal: bool = True, attention_bias: bool = False):
    """Head width 24 apart from hidden / heads = 16, as real Qwen3 checkpoints have."""
    torch.manual_seed(4)
    cfg = transformers.Qwen3Config(**TINY_DECODER, head_dim=24, attention_bias=attention_bias)
    cfg._attn_implementation = "eager"
    model = transformers.Qwen3Model(cfg).eval()
    with torch.no_grad():  # q/k norms start at 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    d = cfg.to_dict() if causal else {**cfg.to_dict(), "is_causal": False}
    return model, Qwen3Config.from_hf_dict(d)


def tiny_mpnet():
    torch.manual_seed(2)
    cfg = transformers.MPNetConfig(
        vocab_size=110,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    return transformers.MPNetModel(cfg).eval(), MPNetConfig.from_hf_dict(cfg.to_dict())


def mixed_batch(vocab: int, seed: int = 0):
    """Right-padded batch with lengths 12, 7, 1 and 4 tokens."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, (4, 12)).astype(np.int32)
    mask = np.zeros((4, 12), np.int32)
    for row, n in enumerate([12, 7, 1, 4]):
        mask[row, :n] = 1
    return np.where(mask, ids, 0).astype(np.int32), mask


def to_params(torch_model, encoder_cfg, pooling="mean", heads=()):
    cfg = EmbedderConfig(encoder=encoder_cfg, pooling=pooling, heads=heads)
    abstract = nn.meta.unbox(abstract_params(cfg))
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    enc, unused = hf_io.params_from_state_dict(state, abstract["encoder"])
    assert unused == []
    return cfg, {"encoder": enc}


def torch_pooled(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    if mode == "mean":
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    if mode == "cls":
        return hidden[:, 0]
    return hidden[np.arange(len(mask)), mask.sum(1) - 1]


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("mode", ["mean", "cls", "last"])
def test_bert_pooled_matches_torch(mode):
    model, enc = tiny_bert()
    ids, mask = mixed_batch(enc.vocab_size)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    ref = unit(torch_pooled(hidden.last_hidden_state.numpy(), mask, mode))
    cfg, params = to_params(model, enc, mode)
    ours = Embedder(cfg).apply({"params": params}, ids, mask)["pooled"]
    assert np.abs(np.asarray(ours) - ref).max() < TOL


def test_mpnet_pooled_matches_torch():
    model, enc = tiny_mpnet()
    ids, mask = mixed_batch(enc.vocab_size)
    ids = np.where(mask, np.maximum(ids, 2), enc.pad_token_id).astype(np.int32)  # 1 pads
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    ref = unit(torch_pooled(hidden.last_hidden_state.numpy(), mask, "mean"))
    cfg, params = to_params(model, enc)
    ours = Embedder(cfg).apply({"params": params}, ids, mask)["pooled"]
    assert np.abs(np.asarray(ours) - ref).max() < TOL


def test_mpnet_relative_buckets_match_hf():
    offsets = np.arange(-300, 301)[None, :]
    want = transformers.models.mpnet.modeling_mpnet.MPNetEncoder.relative_position_bucket(
        torch.tensor(offsets)
    ).numpy()
    np.testing.assert_array_equal(
        np.asarray(relative_position_bucket(jnp.asarray(offsets), 32)), want
    )


@pytest.mark.parametrize("causal", [False, True])
def test_qwen2_pooled_matches_torch(causal):
    model, enc = tiny_qwen2(causal)
    ids, mask = mixed_batch(enc.vocab_size, seed=3)
    t_mask = torch.tensor(mask)
    if not causal:  # a 4-D additive mask makes HF attention bidirectional in any version
        t_mask = torch.zeros(4, 1, 12, 12).masked_fill(
            ~t_mask[:, None, None, :].bool(), torch.finfo(torch.float32).min
        )
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor(ids), attention_mask=t_mask).last_hidden_state
    cfg, params = to_params(model, enc, "mean")
    ours = Embedder(cfg).apply({"params": params}, ids, mask)["pooled"]
    ref = unit(torch_pooled(hidden.numpy(), mask, "mean"))
    assert np.abs(np.asarray(ours) - ref).max() < TOL
    # causal and bidirectional genuinely differ, so the switch is exercised
    other = Embedder(
        cfg.__class__(encoder=Qwen2Config(**{**enc.__dict__, "is_causal": not causal}))
    )
    assert (
        np.abs(np.asarray(other.apply({"params": params}, ids, mask)["pooled"]) - ref).max() > 1e-3
    )


@pytest.mark.parametrize(
    ("causal", "pooling", "attention_bias"),
    [(True, "last", False), (True, "mean", True), (False, "mean", False)],
)
def test_qwen3_pooled_matches_torch(causal, pooling, attention_bias):
    model, enc = tiny_qwen3(causal, attention_bias)
    assert enc.head_dim == 24 and enc.qk_norm and enc.is_causal == causal
    ids, mask = mixed_batch(enc.vocab_size, seed=5)
    t_mask = torch.tensor(mask)
    if not causal:
        t_mask = torch.zeros(4, 1, 12, 12).masked_fill(
            ~t_mask[:, None, None, :].bool(), torch.finfo(torch.float32).min
        )
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor(ids), attention_mask=t_mask).last_hidden_state
    cfg, params = to_params(model, enc, pooling)
    ours = Embedder(cfg).apply({"params": params}, ids, mask)["pooled"]
    ref = unit(torch_pooled(hidden.numpy(), mask, pooling))
    assert np.abs(np.asarray(ours) - ref).max() < TOL
    # the q/k norms are applied: without them the result moves
    no_norm = dataclasses.replace(enc, qk_norm=False)
    trimmed = jax.tree_util.tree_map(lambda x: x, params)
    for layer in trimmed["encoder"].values():
        if isinstance(layer, dict) and "self_attn" in layer:
            layer["self_attn"] = {
                k: v for k, v in layer["self_attn"].items() if k not in ("q_norm", "k_norm")
            }
    other = Embedder(cfg.__class__(encoder=no_norm, pooling=pooling))
    moved = np.asarray(other.apply({"params": trimmed}, ids, mask)["pooled"])
    assert np.abs(moved - ref).max() > 1e-3


def test_qwen3_folder_loads_and_round_trips(tmp_path):
    from jasper_jax.models.loading import load_model

    model, enc = tiny_qwen3()
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config.encoder == enc
    back = Qwen3Config.from_hf_dict(enc.to_hf_dict())
    assert back == enc and enc.to_hf_dict()["architectures"] == ["Qwen3Model"]
    assert enc.to_hf_dict()["head_dim"] == 24
    # a Qwen2 config written by us carries none of the Qwen3 fields
    assert not {"qk_norm", "head_dim_override", "attention_bias"} & set(Qwen2Config().to_hf_dict())


def test_heads_are_linear_maps_of_the_pooled_vector():
    model, enc = tiny_bert()
    cfg, params = to_params(model, enc, "mean")
    cfg = EmbedderConfig(encoder=enc, pooling="mean", heads=(10, 6))
    rng = np.random.RandomState(0)
    params["heads"] = {
        f"dense_{d}": {"kernel": rng.randn(48, d).astype(np.float32), "bias": rng.randn(d)}
        for d in (10, 6)
    }
    ids, mask = mixed_batch(enc.vocab_size)
    out = Embedder(cfg).apply({"params": params}, ids, mask)
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    pooled = torch_pooled(hidden.last_hidden_state.numpy(), mask, "mean")
    for d in (10, 6):
        head = params["heads"][f"dense_{d}"]
        ref = unit(pooled @ head["kernel"] + head["bias"])
        assert np.abs(np.asarray(out[f"dense_{d}"]) - ref).max() < TOL


def test_state_dict_round_trip_is_exact():
    model, enc = tiny_bert()
    _, params = to_params(model, enc)
    back = hf_io.params_to_state_dict(params["encoder"])
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert set(back) == set(state) - {"embeddings.position_ids"}
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k])


def test_mismatched_checkpoint_is_a_clear_error():
    from jasper_jax.errors import UserError

    model, enc = tiny_bert()
    cfg = EmbedderConfig(encoder=BertConfig(**{**enc.__dict__, "intermediate_size": 50}))
    abstract = nn.meta.unbox(abstract_params(cfg))
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    with pytest.raises(UserError, match="wrong shapes.*intermediate.dense.weight"):
        hf_io.params_from_state_dict(state, abstract["encoder"])
    del state["encoder.layer.1.output.dense.bias"]
    abstract = nn.meta.unbox(abstract_params(EmbedderConfig(encoder=enc)))
    with pytest.raises(UserError, match="missing.*encoder.layer.1.output.dense.bias"):
        hf_io.params_from_state_dict(state, abstract["encoder"])


@pytest.mark.parametrize("arch", ["bert", "qwen2", "qwen3"])
def test_sharded_and_bf16_match_unsharded(arch):
    model, enc = {
        "bert": tiny_bert,
        "qwen2": lambda: tiny_qwen2(causal=False),
        "qwen3": tiny_qwen3,
    }[arch]()
    cfg, params = to_params(model, enc, "mean", heads=(16,))
    params["heads"] = {"dense_16": {"kernel": np.eye(enc.hidden_size, 16, dtype=np.float32)}}
    params["heads"]["dense_16"]["bias"] = np.zeros(16, np.float32)
    ids, mask = mixed_batch(enc.vocab_size)
    ids, mask = np.tile(ids, (2, 1)), np.tile(mask, (2, 1))  # 8 rows: divisible by the mesh
    run = lambda m, p, i, a: m.apply({"params": p}, i, a)
    plain = jax.jit(run, static_argnums=0)(Embedder(cfg), params, ids, mask)

    mesh = sharding.make_mesh((2, 1, 4))
    assert len(mesh.devices.flatten()) == 8
    shardings = sharding.param_shardings(abstract_params(cfg), mesh)
    sharded_params = jax.device_put(params, shardings)
    # the tensor axis really splits some weights (not everything replicated)
    specs = jax.tree.leaves(jax.tree.map(lambda s: s.spec, shardings))
    assert any("tensor" in str(s) for s in specs)
    batch = sharding.batch_sharding(mesh, 2)
    sharded = jax.jit(run, static_argnums=0)(
        Embedder(cfg), sharded_params, jax.device_put(ids, batch), jax.device_put(mask, batch)
    )
    bf16 = jax.jit(run, static_argnums=0)(Embedder(cfg, dtype=jnp.bfloat16), params, ids, mask)
    for name in plain:
        a, b = np.asarray(plain[name]), np.asarray(sharded[name])
        assert np.abs(a - b).max() < 1e-5
        cos = (a * np.asarray(bf16[name], np.float32)).sum(-1)
        assert cos.min() >= 0.999
