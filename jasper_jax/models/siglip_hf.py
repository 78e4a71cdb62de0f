"""HF weight import/export for the SigLIP vision tower (`jasper_jax.models.siglip`).

Flax path -> HF key: `layers_3` -> `layers.3`; kernel/scale/embedding -> weight (Linear kernels
transposed, the patch conv [p, p, C, D] <-> torch [D, C, p, p]); the pooling head's fused
`in_proj_kernel` [D, 3D] is `in_proj_weight` transposed. transformers 5 saves
`SiglipVisionModel` keys without a prefix; 4.x and full `SiglipModel` checkpoints use
`vision_model.`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np
from flax import traverse_util

from jasper_jax.errors import UserError
from jasper_jax.models.hf_io import read_state_dict
from jasper_jax.models.siglip import SiglipVisionConfig, abstract_params
from jasper_jax.paths import read_json

_PATCH_SUFFIX = "embeddings.patch_embedding.weight"
# torch conv weight [out, in, kh, kw] <-> flax [kh, kw, in, out]
_CONV_TO_FLAX, _CONV_TO_TORCH = (2, 3, 1, 0), (3, 2, 0, 1)


def _hf_key(path: tuple[str, ...]) -> str:
    """Flax path -> HF key (without prefix): `layers_3` -> `layers.3`, kernel/scale/embedding ->
    weight, in_proj_kernel -> in_proj_weight."""
    parts = [re.sub(r"^layers_(\d+)$", r"layers.\1", p) for p in path[:-1]]
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(path[-1], path[-1])
    leaf = "in_proj_weight" if leaf == "in_proj_kernel" else leaf
    return ".".join([*parts, leaf])


def _relayout(path: tuple[str, ...], x: np.ndarray, to_torch: bool) -> np.ndarray:
    """Flax <-> torch layout of one tensor; Linear kernels are transposes of each other."""
    if path[-2:] == ("patch_embedding", "kernel"):
        return x.transpose(_CONV_TO_TORCH if to_torch else _CONV_TO_FLAX)
    return x.T if path[-1] in ("kernel", "in_proj_kernel") else x


def _expected(config: SiglipVisionConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(config)))
    return {path: tuple(s.shape) for path, s in flat.items()}


def _key_mismatch_error(what: str, missing: list[str], unexpected: list[str]) -> UserError:
    def show(keys: list[str]) -> str:
        more = f" ... (+{len(keys) - 20} more)" if len(keys) > 20 else ""
        return ", ".join(keys[:20]) + more if keys else "none"

    return UserError(
        f"{what} do not match the SigLIP config: missing keys [{show(missing)}]; unexpected keys "
        f"[{show(unexpected)}]. Check that config.json belongs to these weights (layer count, "
        "vision_use_head) and that the key prefix is right (transformers 5 saves "
        "SiglipVisionModel keys without a prefix, 4.x and full SiglipModel under 'vision_model.')."
    )


def detect_prefix(keys: Any) -> str:
    """The prefix in front of the vision tower's keys ('' or e.g. 'vision_model.')."""
    found = sorted(k[: -len(_PATCH_SUFFIX)] for k in keys if k.endswith(_PATCH_SUFFIX))
    if len(found) != 1:
        raise UserError(
            f"found {len(found)} SigLIP vision towers (keys ending in {_PATCH_SUFFIX!r}: "
            f"prefixes {found}); pass prefix= to choose one"
        )
    return found[0]


def siglip_params_from_hf(
    state_dict: dict[str, np.ndarray], config: SiglipVisionConfig, prefix: str | None = None
) -> dict[str, Any]:
    """HF `SiglipVisionModel` state dict -> Flax params (nested dict of float32 numpy arrays).

    Args:
      state_dict: every key must belong to the tower; `prefix` is stripped first.
      prefix: '' (transformers 5 `SiglipVisionModel`), 'vision_model.' (4.x or `SiglipModel`);
        None detects it from the patch-embedding key.
    Raises:
      UserError listing missing and unexpected keys, or a key whose shape the config rejects.
    """
    prefix = detect_prefix(state_dict) if prefix is None else prefix
    expected = _expected(config)
    by_key = {prefix + _hf_key(path): path for path in expected}
    missing = sorted(set(by_key) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(by_key))
    if missing or unexpected:
        raise _key_mismatch_error("HF weights", missing, unexpected)
    flat, bad_shapes = {}, []
    for key, path in by_key.items():
        value = _relayout(path, np.asarray(state_dict[key], dtype=np.float32), to_torch=False)
        if value.shape != expected[path]:
            bad_shapes.append(f"{key} {np.shape(state_dict[key])}")
        flat[path] = np.ascontiguousarray(value)
    if bad_shapes:
        raise UserError(
            f"HF weights with shapes that do not fit the SigLIP config: {', '.join(bad_shapes)}; "
            "check that config.json (hidden_size, intermediate_size, patch_size, image_size) "
            "belongs to these weights"
        )
    return traverse_util.unflatten_dict(flat)


def siglip_params_to_hf(
    params: dict[str, Any], config: SiglipVisionConfig, prefix: str = ""
) -> dict[str, np.ndarray]:
    """Flax params -> HF state dict (contiguous numpy, the dtype of `params`); the exact inverse
    of `siglip_params_from_hf`. `prefix=''` is what transformers 5 `SiglipVisionModel` saves."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))
    expected = _expected(config)
    if set(flat) != set(expected):
        missing = sorted("/".join(p) for p in set(expected) - set(flat))
        unexpected = sorted("/".join(p) for p in set(flat) - set(expected))
        raise _key_mismatch_error("Flax params", missing, unexpected)
    return {
        prefix + _hf_key(path): np.ascontiguousarray(
            _relayout(path, np.asarray(value), to_torch=True)
        )
        for path, value in flat.items()
    }


def load_siglip_folder(
    path: str | os.PathLike, prefix: str | None = None
) -> tuple[SiglipVisionConfig, dict[str, Any]]:
    """Reads a local HF folder: config.json + safetensors (single file or shards).

    The folder may hold a `SiglipVisionModel`, a full `SiglipModel`, or a larger model with a
    `vision_config` (Jasper VL): only keys under the tower's prefix are used (detected from the
    patch-embedding key unless given). `vision_use_head` follows the weights, since checkpoints
    saved without the head may still carry HF's default (True) in config.json.
    """
    config = SiglipVisionConfig.from_hf_dict(read_json(Path(path) / "config.json"))
    everything = read_state_dict(Path(path))
    prefix = detect_prefix(everything) if prefix is None else prefix
    # position_ids is a torch buffer some exports include; it is not a parameter.
    state_dict = {
        k: v
        for k, v in everything.items()
        if k.startswith(prefix) and not k.endswith("embeddings.position_ids")
    }
    has_head = any(k.startswith(prefix + "head.") for k in state_dict)
    config = dataclasses.replace(config, vision_use_head=has_head)
    return config, siglip_params_from_hf(state_dict, config, prefix=prefix)
