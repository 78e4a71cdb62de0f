"""Weights in and out: Hugging Face state dicts <-> our Flax parameter trees.

Our trees mirror HF names, so one rule converts both ways: a Flax path
`("encoder", "layer_3", "attention", "self", "query", "kernel")` is the HF key
`encoder.layer.3.attention.self.query.weight` (kernels transposed; `scale` and `embedding` leaves
are HF `weight`). `encoder_params_from_hf` walks our abstract tree, so every parameter is either
found or reported missing, and every HF tensor is either used or reported unexpected.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from safetensors import safe_open

from jasper_jax.errors import UnsupportedModel, UserError

# Buffers that HF checkpoints carry but that are not parameters of an encoder.
_IGNORED = re.compile(r"(^|\.)(position_ids|rotary_emb\.inv_freq)$|^lm_head\.")
# Flax `layers_3` is HF `layers.3` (torch ModuleList / Sequential items; NV-Embed's latent layer
# has `cross_attend_blocks.0` and `net.0`).
_LIST_COMPONENT = re.compile(r"^(layer|layers|cross_attend_blocks|net)_(\d+)$")
# Parameters that HF registers under their own name rather than as a module's weight.
_NAMED_LEAVES = ("latents",)
# Keys that identify where an architecture's tensors start inside a checkpoint.
ANCHORS = {
    "bert": "embeddings.word_embeddings.weight",
    "mpnet": "embeddings.word_embeddings.weight",
    "qwen2": "embed_tokens.weight",
    "qwen3": "embed_tokens.weight",
    "mistral": "embed_tokens.weight",
    "nvembed": "embedding_model.embed_tokens.weight",
}


def flax_path_to_hf(path: tuple[str, ...]) -> str:
    """("layer_3", "output", "dense", "kernel") -> "layer.3.output.dense.weight"."""
    parts = []
    for p in path[:-1]:
        m = _LIST_COMPONENT.match(p)
        parts.extend([m.group(1), m.group(2)] if m else [p])
    leaf = path[-1]
    parts.append(leaf if leaf in ("bias", *_NAMED_LEAVES) else "weight")
    return ".".join(parts)


def _to_flax_array(path: tuple[str, ...], tensor: np.ndarray) -> np.ndarray:
    return tensor.T if path[-1] == "kernel" and tensor.ndim == 2 else tensor


def find_prefix(keys: list[str], anchor: str) -> str:
    """The prefix ("", "bert.", "model.", ...) under which `anchor` appears in `keys`."""
    hits = sorted((k[: -len(anchor)] for k in keys if k.endswith(anchor)), key=len)
    if not hits:
        raise UnsupportedModel(
            f"the checkpoint has no tensor named like {anchor!r}: it is not a model of this "
            "architecture, or it is a different export format"
        )
    return hits[0]


def params_from_state_dict(
    state_dict: Mapping[str, np.ndarray], abstract: Any, prefix: str = ""
) -> tuple[Any, list[str]]:
    """Fills the (unboxed) abstract tree from HF tensors.

    Returns:
      (params as float32 numpy tree, unused HF keys under `prefix` excluding known buffers).
    Raises:
      UserError listing missing tensors or tensors whose shape does not match.
    """
    flat = traverse_util.flatten_dict(abstract)
    out, missing, bad_shape, used = {}, [], [], set()
    for path, leaf in flat.items():
        key = prefix + flax_path_to_hf(path)
        if key not in state_dict and path[-1] in ("scale", "bias"):  # old BERT gamma/beta names
            alt = key.rsplit(".", 1)[0] + (".gamma" if path[-1] == "scale" else ".beta")
            key = alt if alt in state_dict else key
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        value = _to_flax_array(path, np.asarray(state_dict[key], dtype=np.float32))
        if value.shape != tuple(leaf.shape):
            bad_shape.append(f"{key}: checkpoint {value.shape} vs model {tuple(leaf.shape)}")
        out[path] = value
    if missing or bad_shape:
        raise UserError(
            "checkpoint does not match the model config: "
            + (f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}; " if missing else "")
            + (f"wrong shapes {bad_shape[:8]}" if bad_shape else "")
            + " (is config.json the one saved with these weights?)"
        )
    unused = [k for k in state_dict if k.startswith(prefix) and k not in used]
    unused = [k for k in unused if not _IGNORED.search(k[len(prefix) :])]
    return traverse_util.unflatten_dict(out), unused


def params_to_state_dict(params: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """Inverse of `params_from_state_dict`: HF-named float32 numpy tensors."""
    flat = traverse_util.flatten_dict(jax.device_get(params))
    return {
        prefix + flax_path_to_hf(path): np.ascontiguousarray(
            _to_flax_array(path, np.asarray(v, np.float32))
        )
        for path, v in flat.items()
    }


def read_state_dict(folder: Path) -> dict[str, np.ndarray]:
    """All tensors of a local HF folder as float32 numpy: safetensors (single or sharded), or a
    pytorch `.bin` (read with torch, weights only) when no safetensors file exists."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if files:
        out = {}
        for f in files:
            try:
                # framework="flax" reads bf16 too (numpy has no bfloat16 dtype).
                with safe_open(str(f), framework="flax") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                        out[key] = np.asarray(handle.get_tensor(key), dtype=np.float32)
            except Exception as e:  # safetensors raises its own error types for corrupt files
                raise UserError(
                    f"{f} is corrupt or truncated ({e}); re-download or re-export the model"
                ) from e
        return out
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise UserError(
            f"{folder} holds no model.safetensors or pytorch_model.bin; point --model at a "
            "Hugging Face / sentence-transformers folder that contains the weights"
        )
    try:
        import torch  # optional (the `teachers` extra): only pytorch `.bin` checkpoints need it
    except ImportError as e:
        raise UserError(
            f"{bins[0]} is a pytorch checkpoint; install torch==2.13.0 to convert it, or save "
            "the model as safetensors"
        ) from e
    out = {}
    for f in bins:
        for k, v in _torch_load(torch, f).items():
            if isinstance(v, torch.Tensor):  # buffers of other kinds are not weights
                out[k] = v.float().numpy()
    return out


def _torch_load(torch: Any, path: Path) -> dict:
    """A pytorch checkpoint read as plain tensors only: torch's weights-only unpickler refuses
    any other object (a pickle can run code when loaded), which we report as the user's fix."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(
            f"{path} holds a pickle that is not plain tensors; refusing to load it (convert the "
            "model to safetensors)"
        ) from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise UserError(
            f"{path} is corrupt or truncated ({str(e).splitlines()[0][:120]}); re-download the "
            "model, or convert it to safetensors"
        ) from e
    if not isinstance(state, dict):
        raise UserError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors; convert the "
            "model to safetensors"
        )
    return state
