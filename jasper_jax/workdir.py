"""A training workdir as a model: `model.json` + the params of a checkpoint -> `LoadedModel`.

`encode`, `eval` and `export` accept a workdir wherever they accept an HF folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jasper_jax.errors import UserError
from jasper_jax.models.embedder import EmbedderConfig
from jasper_jax.models.loading import ENCODER_CONFIGS, LoadedModel
from jasper_jax.paths import PathLike, as_path, read_json
from jasper_jax.train.checkpoint import CHECKPOINT_DIR, MODEL_FILE, load_params


def is_workdir(path: PathLike) -> bool:
    path = as_path(path)
    return (path / MODEL_FILE).is_file() and (path / CHECKPOINT_DIR).is_dir()


MODEL_JSON_FIX = (
    "restore it from a copy, or re-run the `jasper-jax train` of this workdir (it writes "
    f"{MODEL_FILE} at the start)"
)
_REQUIRED = ("embedder", "tokenizer_folder", "max_seq_length")


def read_model_json(workdir: PathLike) -> dict[str, Any]:
    """A workdir's model.json, checked for what loading the model needs.

    Raises:
      UserError: missing, truncated or not JSON, or without the entries a model needs.
    """
    path = as_path(workdir) / MODEL_FILE
    meta = read_json(path, MODEL_JSON_FIX)
    missing = [k for k in _REQUIRED if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise UserError(f"{path} lacks {missing}: {MODEL_JSON_FIX}")
    return meta


def embedder_config_from_dict(d: dict) -> EmbedderConfig:
    enc = d.get("encoder") if isinstance(d, dict) else None
    kind = enc.get("model_type") if isinstance(enc, dict) else None
    if kind not in ENCODER_CONFIGS:
        raise UserError(
            f"{MODEL_FILE} names encoder {kind!r}; supported: {sorted(ENCODER_CONFIGS)}"
        )
    try:
        return EmbedderConfig(
            encoder=ENCODER_CONFIGS[kind].from_hf_dict(dict(enc)),
            pooling=d["pooling"],
            heads=tuple(d["heads"]),
            default_head=d.get("default_head"),
            normalize_pooled=bool(d.get("normalize_pooled", False)),
        )
    except (KeyError, TypeError, ValueError) as e:  # a hand-edited or damaged entry
        raise UserError(
            f"{MODEL_FILE} 'embedder' entry is invalid ({e!r}): {MODEL_JSON_FIX}"
        ) from e


def load_workdir_model(workdir: PathLike, step: int | None = None) -> tuple[LoadedModel, dict]:
    """(model from checkpoint `step` or the latest, the raw model.json) of a training workdir
    (a local folder or a gs:// URL)."""
    workdir = as_path(workdir)
    if not (workdir / MODEL_FILE).is_file():
        raise UserError(
            f"{workdir} is not a jasper-jax workdir (no {MODEL_FILE}); pass the --workdir of a "
            "`jasper-jax train` run"
        )
    meta = read_model_json(workdir)
    config = embedder_config_from_dict(meta["embedder"])
    params, step = load_params(workdir, step)
    meta["step"] = step
    params = {k: v for k, v in params.items() if k in ("encoder", "heads")}
    prompts = {"query": meta["prompt"]} if meta.get("prompt") else {}
    model = LoadedModel(
        config, params, Path(meta["tokenizer_folder"]), meta["max_seq_length"], prompts
    )
    return model, meta


def load_any_model(path: str | Path, step: int | None = None) -> LoadedModel:
    """An HF / sentence-transformers folder, or a training workdir (latest checkpoint)."""
    from jasper_jax.models.loading import load_model

    return load_workdir_model(path, step)[0] if is_workdir(path) else load_model(path)
