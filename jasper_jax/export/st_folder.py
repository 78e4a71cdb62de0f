"""The Hugging Face / sentence-transformers folder: encoder, heads, tokenizer, pooling, prompts.

Layout (the classic sentence-transformers format, which sentence-transformers 2.x-6.x and
`jasper_jax.models.loading.load_model` all read):

    config.json, model.safetensors      the encoder (`AutoModel.from_pretrained(OUT)`); decoder
                                        students say `"is_causal": false`, and a head trained
                                        with Matryoshka prefixes adds `matryoshka_dimensions`
    tokenizer files                     copied from the run's tokenizer folder
    modules.json                        Transformer -> Pooling -> the default Dense -> Normalize
    sentence_bert_config.json           max_seq_length
    1_Pooling/config.json               pooling mode
    2_Dense_<dim>/                      one folder per head (config.json + model.safetensors)
    config_sentence_transformers.json   query / document prompts
    vision/                             stage 4 only: the SigLIP tower as `SiglipVisionModel`,
                                        its `preprocessor_config.json` and `jasper_bridge.json`

Every weight is written as float32 safetensors; nothing is pickled.

Serving stacks read this folder by their own, narrower rules (Text Embeddings Inference,
vLLM): module types only as the `sentence_transformers.models.*` strings, boolean pooling keys,
Dense weights as `linear.weight` [out, in] / `linear.bias` [out] with an Identity activation,
the first Dense in modules.json as the head, `is_causal` and `matryoshka_dimensions` from
config.json. Both apply the Dense straight to the pooled vector: a Normalize written before it
(`normalize_pooled` models) is skipped there, so such heads are exact only in
sentence-transformers and jasper-jax (the `pooled` head is exact everywhere).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from jasper_jax.data.images import MEAN, STD
from jasper_jax.encode import resolve_head
from jasper_jax.errors import UserError
from jasper_jax.models.embedder import POOLED, head_name
from jasper_jax.models.hf_io import params_to_state_dict
from jasper_jax.models.loading import LoadedModel, normalizes_pooled
from jasper_jax.models.siglip import SiglipVisionConfig
from jasper_jax.models.siglip_hf import siglip_params_to_hf
from jasper_jax.paths import honour_umask, read_json, write_text_atomic
from jasper_jax.run_folder import MODEL_FILE

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
)
VISION_DIR = "vision"
_ST_POOLING = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "last": "pooling_mode_lasttoken",
}
_ST_MODULE = "sentence_transformers.models."
# config.json: which head the Matryoshka prefixes were trained on and their widths, so that
# `set_default_head` can give vLLM `matryoshka_dimensions` for that head only.
MATRYOSHKA_RECORD = "jasper_matryoshka"
_MATRYOSHKA_FIELDS = ("is_matryoshka", "matryoshka_dimensions")
BRIDGE_FILE = "jasper_bridge.json"
PREPROCESSOR_FILE = "preprocessor_config.json"


def write_json(path: Path, payload: Any) -> None:
    """Indented, key-sorted JSON (parents created); for files of a folder being built."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    contiguous = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    save_file(contiguous, str(path), metadata={"format": "pt"})  # "pt": what HF loaders expect
    honour_umask(path)  # safetensors creates its files 0600


def dense_folder_name(dim: int) -> str:
    return f"2_Dense_{dim}"


def modules_json(default_head: str, normalize_pooled: bool = False) -> list[dict[str, Any]]:
    """The module list: Transformer, Pooling, [Normalize], [the default head's Dense],
    Normalize. With `normalize_pooled` the heads read the unit pooled vector, so a Normalize
    sits between Pooling and the head; it is written for the pooled default too (two Normalize
    in a row change nothing), so the folder always says what its heads read."""
    names = [("", "Transformer"), ("1_Pooling", "Pooling")]
    if normalize_pooled:
        names.append(("2_Normalize", "Normalize"))
    if default_head != POOLED:
        names.append((dense_folder_name(int(default_head.removeprefix("dense_"))), "Dense"))
    names.append((f"{len(names)}_Normalize", "Normalize"))
    return [
        {"idx": i, "name": str(i), "path": path, "type": _ST_MODULE + kind}
        for i, (path, kind) in enumerate(names)
    ]


def pooling_config(mode: str, hidden: int) -> dict[str, Any]:
    """1_Pooling/config.json for our pooling `mode` ("mean", "cls" or "last")."""
    keys = {key: key == _ST_POOLING[mode] for key in _ST_POOLING.values()}
    keys.update(pooling_mode_max_tokens=False, pooling_mode_mean_sqrt_len_tokens=False)
    return {"word_embedding_dimension": hidden, **keys}


def write_heads(heads: dict[str, Any], hidden: int, folder: Path) -> list[int]:
    """One `2_Dense_<dim>` folder per head: Identity activation, torch Linear layout."""
    dims = []
    for name, head in sorted(heads.items()):
        dim = int(name.removeprefix("dense_"))
        sub = folder / dense_folder_name(dim)
        write_json(
            sub / "config.json",
            {
                "in_features": hidden,
                "out_features": dim,
                "bias": True,
                "activation_function": "torch.nn.modules.linear.Identity",
            },
        )
        kernel = np.asarray(head["kernel"], np.float32)  # [hidden, dim] -> torch [dim, hidden]
        tensors = {"linear.weight": kernel.T, "linear.bias": np.asarray(head["bias"], np.float32)}
        _save_safetensors(tensors, sub / "model.safetensors")
        dims.append(dim)
    return dims


def matryoshka_record(mrl_dims: Sequence[int] | None, heads: Sequence[int]) -> dict | None:
    """{"head": "dense_<widest>", "dims": [...]} when training compared Matryoshka prefixes
    (`loss.mrl_dims`): the loss applies them to the full teacher-width head, the widest; the
    head's own width is listed too (a request for the full width is valid). None: no prefixes
    were trained, or no head is wide enough to hold them.
    """
    if not mrl_dims or not heads:
        return None
    widest = max(int(h) for h in heads)
    dims = sorted({int(d) for d in mrl_dims} | {widest})
    if dims[0] < 1 or dims[-1] > widest:
        return None
    return {"head": head_name(widest), "dims": dims}


def matryoshka_fields(record: dict | None, default_head: str) -> dict[str, Any]:
    """config.json's `is_matryoshka` / `matryoshka_dimensions` (what vLLM checks before it
    truncates to a requested `dimensions`): only while modules.json runs the head whose
    prefixes were trained; any other head would be cut where it was never trained to be."""
    if record is None or record.get("head") != default_head:
        return {}
    return {"is_matryoshka": True, "matryoshka_dimensions": list(record["dims"])}


def encoder_config(
    model: LoadedModel, default_head: str, mrl_dims: Sequence[int] | None = None
) -> dict[str, Any]:
    """config.json: the encoder's HF config (Qwen2-style students carry `is_causal`, which
    transformers >= 5.2 and vLLM honour), plus the Matryoshka record and fields."""
    cfg = model.config
    payload = {**cfg.encoder.to_hf_dict(), "torch_dtype": "float32"}
    record = matryoshka_record(mrl_dims, cfg.heads)
    if record is not None:
        payload[MATRYOSHKA_RECORD] = record
    return {**payload, **matryoshka_fields(record, default_head)}


def copy_tokenizer(source: Path, folder: Path) -> list[str]:
    """Copies the tokenizer files of `source` into `folder`; returns their names."""
    copied = [n for n in TOKENIZER_FILES if (source / n).is_file()]
    if "tokenizer.json" not in copied and "vocab.txt" not in copied and "vocab.json" not in copied:
        raise UserError(
            f"tokenizer folder {source} (from {MODEL_FILE}) holds no tokenizer files; restore "
            "it or edit tokenizer_folder in the workdir's model.json"
        )
    for name in copied:
        shutil.copyfile(source / name, folder / name)  # contents only: the mode follows the umask
    return copied


def resolve_default_head(model: LoadedModel, requested: str | None) -> str:
    """`--default-head` (None, "pooled", "dense_<dim>" or "<dim>") -> a head name; None picks
    the model's own default, else its largest head (the full teacher-dim head)."""
    if requested is not None:
        return resolve_head(model.config, requested)
    if model.config.default_head not in (None, POOLED):
        return model.config.default_head
    return head_name(max(model.config.heads)) if model.config.heads else POOLED


def write_text_model(
    model: LoadedModel,
    folder: Path,
    default_head: str,
    max_seq_length: int,
    mrl_dims: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Writes the text model (everything but README.md, vision/ and the marker) into `folder`;
    returns a summary: heads (dims), default_head, pooling, tokenizer_files, matryoshka (the
    record, or None), normalize_pooled.

    `mrl_dims`: the run's `loss.mrl_dims` (model.json "mrl_dims"), None or () when none."""
    cfg = model.config
    encoder_cfg = encoder_config(model, default_head, mrl_dims)
    write_json(folder / "config.json", encoder_cfg)
    _save_safetensors(params_to_state_dict(model.params["encoder"]), folder / "model.safetensors")
    tokenizer = copy_tokenizer(Path(model.folder), folder)
    dims = write_heads(model.params.get("heads", {}), cfg.hidden_size, folder)
    write_json(folder / "modules.json", modules_json(default_head, cfg.normalize_pooled))
    write_json(folder / "1_Pooling" / "config.json", pooling_config(cfg.pooling, cfg.hidden_size))
    write_json(
        folder / "sentence_bert_config.json",
        {"max_seq_length": max_seq_length, "do_lower_case": False},
    )
    prompts = {
        "query": model.prompts.get("query", ""),
        "document": model.prompts.get("document", ""),
    }
    write_json(
        folder / "config_sentence_transformers.json",
        {
            "prompts": prompts,
            # Plain `encode` is mostly used on corpora: it gets the document prompt.
            "default_prompt_name": "document" if prompts["document"] else None,
            "similarity_fn_name": "cosine",
            "model_type": "SentenceTransformer",
        },
    )
    return {
        "heads": dims,
        "default_head": default_head,
        "pooling": cfg.pooling,
        "tokenizer_files": tokenizer,
        "matryoshka": encoder_cfg.get(MATRYOSHKA_RECORD),
        "normalize_pooled": cfg.normalize_pooled,
    }


def image_processor_config(image_size: int) -> dict[str, Any]:
    """preprocessor_config.json for `SiglipImageProcessor`: what `data/images.py` does in
    training (RGB, bicubic resize to a square `image_size` without keeping the aspect ratio,
    x / 255, then (x - 0.5) / 0.5 per channel)."""
    return {
        "image_processor_type": "SiglipImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": image_size, "width": image_size},
        "resample": 3,  # PIL.Image.Resampling.BICUBIC
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [MEAN] * 3,
        "image_std": [STD] * 3,
    }


def bridge_description(config: SiglipVisionConfig, image_tokens: int | None) -> dict[str, Any]:
    """jasper_bridge.json: how the tower's patch states become the text model's image tokens."""
    return {
        "pool": "adaptive_avg_pool2d over (patch tokens, channels) of last_hidden_state",
        "patch_tokens": (config.image_size // config.patch_size) ** 2,
        "vision_hidden_size": config.hidden_size,
        "image_tokens": image_tokens,
        "target": "the text model's input embeddings at the image-token positions",
    }


def write_vision_model(
    config: SiglipVisionConfig, params: Any, folder: Path, image_tokens: int | None = None
) -> None:
    """The SigLIP tower as an HF `SiglipVisionModel` folder (config.json + model.safetensors),
    its image processor config, and `jasper_bridge.json` saying how its patch states enter the
    text model; everything a reader without jasper-jax needs sits in this one folder."""
    write_json(folder / "config.json", {**config.to_hf_dict(), "torch_dtype": "float32"})
    write_json(folder / PREPROCESSOR_FILE, image_processor_config(config.image_size))
    write_json(folder / BRIDGE_FILE, bridge_description(config, image_tokens))
    state = siglip_params_to_hf(params, config, prefix="")
    tensors = {k: np.asarray(v, np.float32) for k, v in state.items()}
    _save_safetensors(tensors, folder / "model.safetensors")


def set_default_head(folder: str | Path, head: str | int) -> None:
    """Switches which head an exported folder's modules.json runs ("pooled", "dense_<dim>",
    "<dim>" or the int dim).

    Raises:
      UserError: the folder has no such head.
    """
    folder = Path(folder)
    head = str(head)
    head = f"dense_{head}" if head.isdigit() else head
    if head != POOLED:
        dim = int(head.removeprefix("dense_"))
        if not (folder / dense_folder_name(dim) / "config.json").is_file():
            raise UserError(f"{folder} has no head {head!r} ({dense_folder_name(dim)}/ missing)")
    path = folder / "modules.json"
    modules = modules_json(head, normalizes_pooled(read_json(path)))
    write_text_atomic(path, json.dumps(modules, indent=2) + "\n")
    _retarget_matryoshka(folder / "config.json", head)


def _retarget_matryoshka(path: Path, head: str) -> None:
    """Rewrites config.json's Matryoshka fields for the head modules.json now runs."""
    config = read_json(path)
    record = config.get(MATRYOSHKA_RECORD)
    if record is None and not any(k in config for k in _MATRYOSHKA_FIELDS):
        return
    config = {k: v for k, v in config.items() if k not in _MATRYOSHKA_FIELDS}
    config.update(matryoshka_fields(record, head))
    write_text_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
