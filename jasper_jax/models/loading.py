"""Load a local Hugging Face / sentence-transformers folder into an `EmbedderConfig` + params.

Reads `config.json` (architecture), the weights, `modules.json` with `1_Pooling/config.json`
(pooling mode) and any `2_Dense*` folders (projection heads), `sentence_bert_config.json`
(max length) and `config_sentence_transformers.json` (prompts). The tokenizer is the folder's own.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import numpy as np
from flax import traverse_util

from jasper_jax.errors import UnsupportedModel, UserError
from jasper_jax.models import hf_io
from jasper_jax.models.bert import BertConfig
from jasper_jax.models.embedder import POOLED, EmbedderConfig, abstract_params, head_name
from jasper_jax.models.mpnet import MPNetConfig
from jasper_jax.models.qwen2 import Qwen2Config
from jasper_jax.paths import read_json

ENCODER_CONFIGS = {"bert": BertConfig, "mpnet": MPNetConfig, "qwen2": Qwen2Config}
_ST_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
}
_IDENTITY = ("torch.nn.modules.linear.Identity", "Identity", None)


@dataclasses.dataclass
class LoadedModel:
    """A model ready to run: architecture, float32 params (numpy tree), and folder metadata."""

    config: EmbedderConfig
    params: Any
    folder: Path
    max_seq_length: int
    prompts: dict[str, str]
    default_prompt_name: str | None = None


def first_non_finite(params: Any) -> str | None:
    """The path ("encoder/layer_0/.../kernel") of the first parameter holding NaN or inf, or
    None when all are finite: such weights give NaN vectors for every input."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(params))  # boxed: logical-axis metadata
    for path, value in sorted(flat.items()):
        if not np.isfinite(np.asarray(value)).all():
            return "/".join(map(str, path))
    return None


def encoder_config_from_folder(folder: Path):
    d = read_json(folder / "config.json")
    kind = d.get("model_type")
    if kind not in ENCODER_CONFIGS:
        raise UnsupportedModel(
            f"{folder}/config.json has model_type {kind!r}; supported architectures are "
            f"{sorted(ENCODER_CONFIGS)} (BERT, MPNet and Qwen2-style encoders)"
        )
    try:
        return ENCODER_CONFIGS[kind].from_hf_dict(d)
    except (TypeError, ValueError) as e:
        raise UnsupportedModel(f"{folder}/config.json: {e}") from e


def _pooling_mode(folder: Path) -> str:
    """Pooling from the sentence-transformers Pooling module; plain HF folders default to mean."""
    for module in _modules(folder):
        if module.get("type", "").endswith("Pooling"):
            cfg = read_json(folder / module["path"] / "config.json")
            on = [mode for key, mode in _ST_POOLING_KEYS.items() if cfg.get(key)]
            if len(on) != 1:
                raise UnsupportedModel(
                    f"{folder / module['path']}/config.json enables pooling {on or 'none'}; "
                    f"exactly one of {sorted(_ST_POOLING_KEYS)} is supported"
                )
            return on[0]
    return "mean"


def _modules(folder: Path) -> list[dict[str, Any]]:
    path = folder / "modules.json"
    return read_json(path) if path.exists() else []


def normalizes_pooled(modules: list[dict[str, Any]]) -> bool:
    """Whether a modules.json list normalises the pooled vector before what follows it."""
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    return any(
        a == "Pooling" and b == "Normalize" and i + 2 < len(kinds)
        for i, (a, b) in enumerate(zip(kinds, kinds[1:], strict=False))
    )


def _dense_heads(folder: Path, hidden: int) -> tuple[dict[int, dict], str | None]:
    """Projection heads from `2_Dense*` folders: {dim: {"kernel", "bias"}}, default head name."""
    in_modules = {m["path"] for m in _modules(folder) if m.get("type", "").endswith("Dense")}
    heads, default = {}, None
    for sub in sorted(p for p in folder.iterdir() if re.fullmatch(r"\d+_Dense(_\d+)?", p.name)):
        cfg = read_json(sub / "config.json")
        if cfg.get("activation_function") not in _IDENTITY:
            raise UnsupportedModel(
                f"{sub}: only Dense heads with Identity activation are supported"
            )
        if cfg["in_features"] != hidden:
            continue  # a head stacked on another head, not on the pooled state
        sd = hf_io.read_state_dict(sub)
        dim = int(cfg["out_features"])
        head = {"kernel": sd["linear.weight"].T}
        head["bias"] = sd.get("linear.bias", np.zeros(dim, np.float32))
        if dim in heads and sub.name not in in_modules:
            continue  # e.g. stella's `2_Dense` duplicates one of its `2_Dense_<dim>`
        heads[dim] = head
        if sub.name in in_modules:
            default = head_name(dim)
    return heads, default


def _prompts(folder: Path) -> tuple[dict[str, str], str | None]:
    path = folder / "config_sentence_transformers.json"
    if not path.exists():
        return {}, None
    d = read_json(path)
    return dict(d.get("prompts") or {}), d.get("default_prompt_name")


def load_model(folder: str | Path) -> LoadedModel:
    """Reads a local HF / sentence-transformers folder of a supported architecture.

    Raises UserError for a missing folder, an unsupported architecture, or weights that do not
    match the config.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist; pass a local HF model folder")
    enc = encoder_config_from_folder(folder)
    state = hf_io.read_state_dict(folder)
    prefix = hf_io.find_prefix(list(state), hf_io.ANCHORS[enc.model_type])
    if isinstance(enc, BertConfig | MPNetConfig):
        enc = dataclasses.replace(enc, add_pooling_layer=f"{prefix}pooler.dense.weight" in state)
    heads, default = _dense_heads(folder, enc.hidden_size)
    config = EmbedderConfig(
        encoder=enc,
        pooling=_pooling_mode(folder),
        heads=tuple(heads),
        default_head=default or POOLED,
        normalize_pooled=normalizes_pooled(_modules(folder)),
    )
    abstract = nn.meta.unbox(abstract_params(config))
    encoder_params, _ = hf_io.params_from_state_dict(state, abstract["encoder"], prefix)
    params = {"encoder": encoder_params}
    if heads:
        params["heads"] = {head_name(d): h for d, h in heads.items()}
    prompts, default_prompt = _prompts(folder)
    st_cfg = folder / "sentence_bert_config.json"
    max_len = read_json(st_cfg).get("max_seq_length") if st_cfg.exists() else None
    max_len = int(max_len or getattr(enc, "max_position_embeddings", 512))
    return LoadedModel(config, params, folder, max_len, prompts, default_prompt)
