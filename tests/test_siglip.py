"""SigLIP vision tower: parity with transformers' torch `SiglipVisionModel`, HF weight round-trip,
folder loading, bf16, and logical sharding of every parameter."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from jasper_jax.errors import UserError
from jasper_jax.models import siglip, siglip_hf
from jasper_jax.models.siglip import (
    SIGLIP_SO400M_PATCH14_384,
    SiglipVisionConfig,
    SiglipVisionTower,
)
from jasper_jax.models.siglip_hf import (
    load_siglip_folder,
    siglip_params_from_hf,
    siglip_params_to_hf,
)
from jasper_jax.sharding import LOGICAL_AXIS_RULES, make_mesh, param_shardings

# image 30 with patch 7: a 4x4 grid that drops 2 border pixels, as so400m's 384/14 drops 6.
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=30,
    patch_size=7,
)


def _torch_model(use_head: bool, seed: int = 0) -> transformers.SiglipVisionModel:
    """Tiny HF model with every parameter randomised (HF init leaves biases and norms trivial)."""
    torch.manual_seed(seed)
    model = transformers.SiglipVisionModel(
        transformers.SiglipVisionConfig(**TINY, vision_use_head=use_head)
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if is_norm_scale else 0.2 * torch.randn_like(p))
    return model


def _state_dict(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _pixels(batch: int = 2, size: int = 30) -> np.ndarray:
    """NCHW, as torch takes them."""
    return np.random.default_rng(1).standard_normal((batch, 3, size, size)).astype(np.float32)


def _torch_forward(model, pixels_nchw: np.ndarray):
    with torch.no_grad():
        return model(torch.from_numpy(pixels_nchw))


def _flax_forward(config, params, pixels_nchw, **module_kw):
    apply = jax.jit(SiglipVisionTower(config, **module_kw).apply)
    return apply({"params": params}, jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1)))


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@pytest.fixture(scope="module", params=[True, False], ids=["head", "no_head"])
def hf_model(request):
    return _torch_model(request.param)


def _config_of(model) -> SiglipVisionConfig:
    return SiglipVisionConfig.from_hf_dict(model.config.to_dict())


def test_fp32_parity_with_transformers(hf_model):
    config = _config_of(hf_model)
    params = siglip_params_from_hf(_state_dict(hf_model), config)
    pixels = _pixels()
    ref = _torch_forward(hf_model, pixels)
    out = _flax_forward(config, params, pixels)
    assert out.last_hidden_state.shape == (2, 16, 32)
    assert _max_diff(out.last_hidden_state, ref.last_hidden_state) < 1e-4
    if config.vision_use_head:
        assert _max_diff(out.pooler_output, ref.pooler_output) < 1e-4
    else:
        assert out.pooler_output is None and ref.pooler_output is None


def test_round_trip_is_exact(hf_model):
    config = _config_of(hf_model)
    sd = _state_dict(hf_model)
    for prefix in ("", "vision_model."):
        prefixed = {prefix + k: v for k, v in sd.items()}
        back = siglip_params_to_hf(siglip_params_from_hf(prefixed, config), config, prefix=prefix)
        assert set(back) == set(prefixed)
        for k, v in prefixed.items():
            assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k
    # HF itself accepts the export with strict key checking.
    fresh = transformers.SiglipVisionModel(hf_model.config)
    exported = siglip_params_to_hf(siglip_params_from_hf(sd, config), config)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)


def test_head_can_be_skipped_but_stays_in_params():
    model = _torch_model(use_head=True)
    config = _config_of(model)
    params = siglip_params_from_hf(_state_dict(model), config)
    pixels = _pixels()
    full = _flax_forward(config, params, pixels)
    bridge = _flax_forward(config, params, pixels, with_head=False)
    assert bridge.pooler_output is None
    assert _max_diff(bridge.last_hidden_state, full.last_hidden_state) < 1e-6
    assert "head" in params


def test_bf16_compute_agrees_with_fp32():
    model = _torch_model(use_head=True)
    config = _config_of(model)
    params = siglip_params_from_hf(_state_dict(model), config)
    pixels = _pixels(batch=4)
    fp32 = _flax_forward(config, params, pixels).pooler_output
    bf16 = _flax_forward(config, params, pixels, dtype=jnp.bfloat16)
    assert bf16.last_hidden_state.dtype == jnp.bfloat16
    assert jax.tree.leaves(params)[0].dtype == np.float32
    a, b = np.asarray(fp32, np.float32), np.asarray(bf16.pooler_output, np.float32)
    cosine = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cosine.min() >= 0.999, cosine


@pytest.mark.parametrize("use_head", [True, False], ids=["head", "no_head"])
def test_load_folder_saved_by_transformers(tmp_path, use_head):
    model = _torch_model(use_head, seed=2)
    model.save_pretrained(tmp_path)
    config, params = load_siglip_folder(tmp_path)
    assert config == _config_of(model)
    pixels = _pixels()
    ref = _torch_forward(model, pixels)
    out = _flax_forward(config, params, pixels)
    assert _max_diff(out.last_hidden_state, ref.last_hidden_state) < 1e-4


def test_load_vision_tower_from_full_siglip_model(tmp_path):
    """A full SiglipModel folder: keys under `vision_model.`, text tower keys are not ours."""
    torch.manual_seed(3)
    full = transformers.SiglipModel(
        transformers.SiglipConfig(
            text_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=50,
                max_position_embeddings=8,
            ),
            vision_config=TINY,
        )
    ).eval()
    full.save_pretrained(tmp_path)
    config, params = load_siglip_folder(tmp_path)
    assert config == SiglipVisionConfig(**TINY)
    pixels = _pixels()
    ref = _torch_forward(full.vision_model, pixels)
    out = _flax_forward(config, params, pixels)
    assert _max_diff(out.last_hidden_state, ref.last_hidden_state) < 1e-4
    assert _max_diff(out.pooler_output, ref.pooler_output) < 1e-4


def test_missing_and_unexpected_keys_are_named():
    model = _torch_model(use_head=True)
    sd = _state_dict(model)
    sd.pop("encoder.layers.1.mlp.fc2.bias")
    sd["encoder.layers.2.mlp.fc2.bias"] = np.zeros(32, np.float32)
    with pytest.raises(UserError) as err:
        siglip_params_from_hf(sd, _config_of(model))
    assert "missing keys [encoder.layers.1.mlp.fc2.bias]" in str(err.value)
    assert "unexpected keys [encoder.layers.2.mlp.fc2.bias]" in str(err.value)


def test_head_flag_mismatch_and_wrong_shape_are_errors():
    model = _torch_model(use_head=True)
    sd = _state_dict(model)
    no_head = dataclasses.replace(_config_of(model), vision_use_head=False)
    with pytest.raises(UserError, match=r"unexpected keys \[head\.attention"):
        siglip_params_from_hf(sd, no_head)
    wider_mlp = dataclasses.replace(_config_of(model), intermediate_size=48)
    with pytest.raises(UserError, match=r"encoder.layers.0.mlp.fc1.weight \(64, 32\)"):
        siglip_params_from_hf(sd, wider_mlp)
    params = siglip_params_from_hf(sd, _config_of(model))
    with pytest.raises(UserError, match="missing keys"):
        siglip_params_to_hf({k: v for k, v in params.items() if k != "head"}, _config_of(model))


def test_nchw_pixels_are_rejected_with_the_fix():
    config = SiglipVisionConfig(**TINY)
    with pytest.raises(UserError, match="transpose"):
        SiglipVisionTower(config).init(jax.random.key(0), jnp.zeros((1, 3, 30, 30)))


def test_so400m_config_matches_hf_shapes():
    hub_vision_config = {  # the non-default fields, as google/siglip-so400m-patch14-384 lists them
        "hidden_size": 1152,
        "image_size": 384,
        "intermediate_size": 4304,
        "model_type": "siglip_vision_model",
        "num_attention_heads": 16,
        "num_hidden_layers": 27,
        "patch_size": 14,
    }
    full_config = {"model_type": "siglip", "vision_config": hub_vision_config}
    config = SiglipVisionConfig.from_hf_dict(full_config)
    assert config == SIGLIP_SO400M_PATCH14_384 and config.num_patches == 729
    hf_config = transformers.SiglipVisionConfig(**config.to_hf_dict())
    assert SiglipVisionConfig.from_hf_dict(hf_config.to_dict()) == config
    with torch.device("meta"):  # shapes only, no 1.7 GB of weights
        hf_model = transformers.SiglipVisionModel(hf_config)
    hf_shapes = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    abstract = nn.meta.unbox(siglip.abstract_params(config))
    flat = traverse_util.flatten_dict(abstract)
    ours = {
        siglip_hf._hf_key(p): siglip_hf._relayout(
            p, np.empty(s.shape, np.bool_), to_torch=True
        ).shape
        for p, s in flat.items()
    }
    assert ours == hf_shapes
    assert sum(np.prod(s) for s in ours.values()) == 428_225_600
    pixels = jax.ShapeDtypeStruct((1, 384, 384, 3), jnp.float32)
    out = jax.eval_shape(SiglipVisionTower(config).apply, {"params": abstract}, pixels)
    assert out.last_hidden_state.shape == (1, 729, 1152) and out.pooler_output.shape == (1, 1152)


def test_every_param_is_logically_partitioned_and_shards():
    config = SiglipVisionConfig(**TINY)
    boxed = siglip.abstract_params(config)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned)
        assert set(leaf.names) - {None} <= known, leaf.names
    # flax's own rule resolution is stricter (no logical name twice in one array)
    nn.logical_to_mesh(nn.get_partition_spec(boxed), LOGICAL_AXIS_RULES)
    mesh = make_mesh((2, 1, 4))
    shardings = param_shardings(boxed, mesh)
    model = _torch_model(use_head=True)
    params = jax.device_put(siglip_params_from_hf(_state_dict(model), config), shardings)
    assert params["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].sharding.spec[1] == "tensor"
    pixels = _pixels()
    ref = _torch_forward(model, pixels)
    out = jax.jit(SiglipVisionTower(config).apply)({"params": params}, pixels.transpose(0, 2, 3, 1))
    assert _max_diff(out.pooler_output, ref.pooler_output) < 1e-4
