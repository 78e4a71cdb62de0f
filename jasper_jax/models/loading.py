"""Load a local Hugging Face / sentence-transformers folder into an `EmbedderConfig` + params.

Reads `config.json` (architecture), the weights, `modules.json` with `1_Pooling/config.json`
(pooling mode) and any `2_Dense*` folders (projection heads), `sentence_bert_config.json`
(max length) and `config_sentence_transformers.json` (prompts). The tokenizer is the folder's own.
"""

from __future__ import annotations

import dataclasses
import logging
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
from jasper_jax.models.nvembed import NVEmbedConfig, eos_text
from jasper_jax.models.qwen2 import MistralConfig, Qwen2Config, Qwen3Config
from jasper_jax.paths import read_json

ENCODER_CONFIGS = {
    "bert": BertConfig,
    "mpnet": MPNetConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "mistral": MistralConfig,
    "nvembed": NVEmbedConfig,
}
log = logging.getLogger(__name__)
_ST_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last",
}
# sentence-transformers >= 6 names the mode: `"pooling_mode": "lasttoken"`.
_ST_POOLING_NAMES = {"mean": "mean", "cls": "cls", "lasttoken": "last"}
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
    # How texts reach the model beyond prompt + text (NV-Embed's own encode, `models.nvembed`):
    text_suffix: str = ""  # appended to every text before tokenizing (NV-Embed: its EOS)
    pool_prompt: bool = True  # False: the mean leaves the prompt's tokens out


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
            f"{sorted(ENCODER_CONFIGS)} (BERT, MPNet, Qwen2-, Qwen3- and Mistral-style encoders, "
            "NV-Embed)"
        )
    try:
        return ENCODER_CONFIGS[kind].from_hf_dict(d)
    except (TypeError, ValueError) as e:
        raise UnsupportedModel(f"{folder}/config.json: {e}") from e


def _pooling_mode(folder: Path) -> str:
    """Pooling from the sentence-transformers Pooling module; plain HF folders default to mean.

    Reads both spellings: boolean `pooling_mode_*_token(s)` keys (sentence-transformers before
    6, and what TEI reads) and `"pooling_mode": "lasttoken"` (6 and later)."""
    for module in _modules(folder):
        if module.get("type", "").endswith("Pooling"):
            where = folder / module["path"] / "config.json"
            cfg = read_json(where)
            if "pooling_mode" in cfg:
                named = cfg["pooling_mode"]
                named = list(named) if isinstance(named, list | tuple) else [named]
                on = [_ST_POOLING_NAMES.get(str(n), str(n)) for n in named]
            else:
                on = [mode for key, mode in _ST_POOLING_KEYS.items() if cfg.get(key)]
            if len(on) != 1 or on[0] not in _ST_POOLING_KEYS.values():
                raise UnsupportedModel(
                    f"{where} enables pooling {on or 'none'}; exactly one of "
                    f"{sorted(set(_ST_POOLING_KEYS.values()))} is supported"
                )
            if cfg.get("include_prompt") is False:
                log.warning(
                    "%s pools without the prompt's tokens (include_prompt: false); jasper-jax "
                    "pools every token, so vectors of prompted texts differ from "
                    "sentence-transformers'",
                    where,
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


def st_prompts(folder: Path) -> tuple[dict[str, str], str | None]:
    """({name: prompt text}, default prompt name) from `config_sentence_transformers.json`."""
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
    nvembed = isinstance(enc, NVEmbedConfig)  # pools as its own code does, not by ST modules
    config = EmbedderConfig(
        encoder=enc,
        pooling="mean" if nvembed else _pooling_mode(folder),
        heads=tuple(heads),
        default_head=default or POOLED,
        normalize_pooled=normalizes_pooled(_modules(folder)),
    )
    abstract = nn.meta.unbox(abstract_params(config))
    encoder_params, _ = hf_io.params_from_state_dict(state, abstract["encoder"], prefix)
    params = {"encoder": encoder_params}
    if heads:
        params["heads"] = {head_name(d): h for d, h in heads.items()}
    prompts, default_prompt = st_prompts(folder)
    limit = _max_seq_length(folder, enc)
    loaded = LoadedModel(config, params, folder, limit, prompts, default_prompt)
    if nvembed:
        loaded.text_suffix, loaded.pool_prompt = eos_text(folder), not enc.mask_instruction
    return loaded


def _max_seq_length(folder: Path, encoder: Any) -> int:
    """Tokens sentence-transformers cuts a text to: `max_seq_length` in
    `sentence_bert_config.json` (before version 6), else the tokenizer's `model_max_length`
    (6 and later keep it there), capped at the position embeddings as sentence-transformers
    caps it; the position limit when neither is set."""
    limit = int(getattr(encoder, "max_position_embeddings", 512))
    limit = min(limit, getattr(encoder, "attention_window", None) or limit)  # causal Mistral
    st_cfg = folder / "sentence_bert_config.json"
    st_max = read_json(st_cfg).get("max_seq_length") if st_cfg.exists() else None
    if st_max:
        return int(st_max)
    tok_cfg = folder / "tokenizer_config.json"
    model_max = read_json(tok_cfg).get("model_max_length") if tok_cfg.exists() else None
    if isinstance(model_max, int | float) and 0 < model_max < 1e9:  # HF writes 1e30 for none
        return min(int(model_max), limit)
    return limit
