"""RoPE scaling (linear, dynamic, yarn, llama3): parity with transformers' Qwen2 beyond the
trained length, HF config round trips, and the config-string spelling."""

import dataclasses

import numpy as np
import pytest
import torch
import transformers

from jasper_jax.errors import UserError
from jasper_jax.models.qwen2 import Qwen2Config, Qwen2Encoder
from jasper_jax.models.rope import RopeScaling
from tests.test_text_encoders import to_params

TRAINED = 24  # original_max_position_embeddings of the tiny model
LENGTH = 61  # beyond it (and not a power of two)

ROPES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": TRAINED},
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": TRAINED,
        "beta_fast": 16.0,
        "mscale": 0.8,
        "mscale_all_dim": 0.5,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "original_max_position_embeddings": TRAINED,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
}


def tiny_qwen2_with_rope(params: dict):
    torch.manual_seed(4)
    cfg = transformers.Qwen2Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: yarn's ramp and llama3's bands span several dims
        num_key_value_heads=1,
        # dynamic scales beyond max_position_embeddings; yarn/llama3 beyond the original length
        max_position_embeddings=TRAINED if params["rope_type"] == "dynamic" else 4 * TRAINED,
        rope_parameters={**params, "rope_theta": 500.0},
    )
    cfg._attn_implementation = "eager"
    ours = Qwen2Config.from_hf_dict(cfg.to_dict())
    return transformers.Qwen2Model(cfg).eval(), ours


def padded_batch(vocab: int):
    rng = np.random.RandomState(5)
    mask = np.zeros((2, LENGTH), np.int32)
    mask[0] = 1
    mask[1, :40] = 1
    ids = np.where(mask, rng.randint(1, vocab, mask.shape), 0).astype(np.int32)
    return ids, mask


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rope_scaling_matches_torch_beyond_trained_length(name):
    model, enc = tiny_qwen2_with_rope(ROPES[name])
    assert enc.rope_scaling is not None and enc.rope_scaling.rope_type == ROPES[name]["rope_type"]
    ids, mask = padded_batch(enc.vocab_size)
    t_mask = torch.zeros(2, 1, LENGTH, LENGTH).masked_fill(
        ~torch.tensor(mask)[:, None, None, :].bool(), torch.finfo(torch.float32).min
    )  # bidirectional, padding masked
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=t_mask).last_hidden_state.numpy()
    _, params = to_params(model, enc)
    ours = np.asarray(Qwen2Encoder(enc).apply({"params": params["encoder"]}, ids, mask))
    real = mask.astype(bool)
    assert np.abs(ours[real] - ref[real]).max() < 1e-4
    # the scaling is really in effect: plain RoPE on the same weights differs
    plain = Qwen2Encoder(dataclasses.replace(enc, rope_scaling=None))
    other = np.asarray(plain.apply({"params": params["encoder"]}, ids, mask))
    assert np.abs(other[real] - ref[real]).max() > 1e-3


def test_dynamic_is_plain_rope_within_the_trained_length():
    enc = Qwen2Config(hidden_size=64, num_attention_heads=2, max_position_embeddings=64)
    dynamic = dataclasses.replace(enc, rope_scaling=RopeScaling("dynamic", 4.0))
    from jasper_jax.models.rope import inverse_frequencies

    a, _ = inverse_frequencies(32, 1e4, None, 64, 64)
    b, _ = inverse_frequencies(32, 1e4, dynamic.rope_scaling, 64, 64)
    c, _ = inverse_frequencies(32, 1e4, dynamic.rope_scaling, 128, 64)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert (c[1:] < a[1:]).all()  # longer than trained: lower frequencies (larger base)


@pytest.mark.parametrize("name", sorted(ROPES))
def test_hf_dict_round_trips(name):
    _, enc = tiny_qwen2_with_rope(ROPES[name])
    d = enc.to_hf_dict()
    assert Qwen2Config.from_hf_dict(d) == enc
    # transformers reads what we write back to the same rope parameters
    hf = transformers.Qwen2Config(**{k: v for k, v in d.items() if k != "architectures"})
    want = {k: v for k, v in ROPES[name].items()}
    got = {k: hf.rope_parameters.get(k) for k in want}
    assert got == want


def test_legacy_rope_scaling_spellings():
    d = Qwen2Config().to_hf_dict()
    old = Qwen2Config.from_hf_dict({**d, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert old.rope_scaling == RopeScaling("linear", 2.0)
    # transformers 5: rope_parameters only, with the trained length at the top level (Phi3-style)
    new = Qwen2Config.from_hf_dict(
        {
            **d,
            "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
            "original_max_position_embeddings": 4096,
        }
    )
    assert new.rope_scaling.original_max_position_embeddings == 4096
    assert Qwen2Config(rope_scaling=("linear", 3.0)).rope_scaling == RopeScaling("linear", 3.0)


def test_unsupported_types_are_clear_errors():
    d = Qwen2Config().to_hf_dict()
    with pytest.raises(UserError, match="'longrope'.*supported: default, linear, dynamic, yarn"):
        Qwen2Config.from_hf_dict({**d, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    with pytest.raises(UserError, match="'ntk'.*supported"):
        RopeScaling.parse("ntk:2")
    with pytest.raises(UserError, match="TYPE:FACTOR"):
        RopeScaling.parse("yarn")
    with pytest.raises(UserError, match="TYPE:FACTOR"):
        RopeScaling.parse("yarn:four")


def test_config_strings():
    assert RopeScaling.parse("none") is None
    assert RopeScaling.parse("linear:4") == RopeScaling("linear", 4.0)
    assert RopeScaling.parse("yarn:4:32768") == RopeScaling("yarn", 4.0, 32768)
    assert RopeScaling.parse("dynamic:2").to_hf() == {"rope_type": "dynamic", "factor": 2.0}
