"""Export a training workdir as a Hugging Face / sentence-transformers folder (safetensors only).

Layout of `OUT` (the classic sentence-transformers format, which sentence-transformers 2.x-6.x
and `jasper_jax.models.loading.load_model` all read):

    config.json, model.safetensors      the encoder (`AutoModel.from_pretrained(OUT)`)
    tokenizer files                     copied from the run's tokenizer folder
    modules.json                        Transformer -> Pooling -> the default Dense -> Normalize
    sentence_bert_config.json           max_seq_length
    1_Pooling/config.json               pooling mode
    2_Dense_<dim>/                      one folder per head (config.json + model.safetensors)
    config_sentence_transformers.json   query / document prompts
    README.md                           model card
    jasper_export.json                  marks the folder as an export: source workdir, step
    vision/                             stage 4 only: the SigLIP tower as `SiglipVisionModel`

The folder is written next to `OUT` under a temporary name and renamed into place, so `OUT` is
either the old folder or the complete new one, never half-written. `--overwrite` replaces only
a previous export (a folder holding `jasper_export.json`), never the source workdir, the current
folder, home or a parent of those. One export at a time writes an `OUT` (a lock beside it);
temporary folders carry the writer's process tag, so the next export removes those of a killed
one.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from jasper_jax import __version__
from jasper_jax.errors import UserError
from jasper_jax.locks import FolderLock, process_tag, remove_leftovers, tag_alive
from jasper_jax.models.embedder import POOLED, head_name
from jasper_jax.models.hf_io import params_to_state_dict
from jasper_jax.models.loading import LoadedModel, first_non_finite, normalizes_pooled
from jasper_jax.paths import honour_umask, read_json, write_text_atomic
from jasper_jax.train.checkpoint import MODEL_FILE, load_params

log = logging.getLogger(__name__)

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
MARKER = "jasper_export.json"  # what `--overwrite` may replace: a folder an export wrote
MARKER_FORMAT = 1
EVAL_JSON = Path("eval") / "eval.json"  # where `jasper-jax eval --model WORKDIR` writes
_ST_POOLING = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "last": "pooling_mode_lasttoken",
}
_ST_MODULE = "sentence_transformers.models."


@dataclasses.dataclass
class ExportSource:
    """What a workdir checkpoint holds: the text model, model.json, and the vision tower if any.

    Attributes:
      model: text embedder (encoder + heads), float32 numpy params.
      meta: model.json of the run, plus "step" (the checkpoint's step).
      vision: (SiglipVisionConfig, params) of the stage-4 tower, or None.
      image_tokens: how many pooled image tokens the text model takes (stage 4), if recorded.
    """

    model: LoadedModel
    meta: dict
    vision: tuple[Any, Any] | None = None
    image_tokens: int | None = None


def load_export_source(workdir: str | Path, step: int | None = None) -> ExportSource:
    """Reads model.json and one checkpoint (the latest, or `step`) of a training workdir."""
    from jasper_jax.workdir import embedder_config_from_dict, read_model_json

    workdir = Path(workdir)
    if not (workdir / MODEL_FILE).is_file():
        raise UserError(
            f"{workdir} is not a jasper-jax workdir (no {MODEL_FILE}); pass the --workdir of a "
            "finished `jasper-jax train` run"
        )
    meta = read_model_json(workdir)
    config = embedder_config_from_dict(meta["embedder"])
    params, meta["step"] = load_params(workdir, step)
    check_finite_params(params, workdir, meta["step"])
    prompts = {"query": meta["prompt"], "document": ""} if meta.get("prompt") else {}
    text_params = {k: v for k, v in params.items() if k in ("encoder", "heads")}
    model = LoadedModel(
        config, text_params, Path(meta["tokenizer_folder"]), int(meta["max_seq_length"]), prompts
    )
    vision = None
    if "vision" in params:
        vision = (vision_config_from_meta(meta, workdir), params["vision"])
    return ExportSource(model, meta, vision, image_tokens_from_meta(meta))


def check_finite_params(params: Any, workdir: Path, step: int) -> None:
    """Refuses a checkpoint holding NaN/inf: its export would give NaN for every text."""
    bad = first_non_finite(params)
    if bad is not None:
        raise UserError(
            f"checkpoint step {step} of {workdir} holds NaN/inf in parameter {bad} (training "
            "diverged or the checkpoint is corrupt); export an earlier --step (nothing was "
            "written)"
        )


def image_tokens_from_meta(meta: dict) -> int | None:
    entry = meta.get("vision") or meta.get("vision_config") or {}
    tokens = entry.get("image_tokens") if isinstance(entry, dict) else None
    tokens = tokens or meta.get("image_tokens")
    return int(tokens) if tokens else None


def vision_config_from_meta(meta: dict, workdir: Path):
    """The SigLIP config recorded in model.json ("vision" or "vision_config": an HF-style dict,
    optionally nested as {"config": {...}})."""
    from jasper_jax.models.siglip import SiglipVisionConfig

    entry = meta.get("vision") or meta.get("vision_config")
    if isinstance(entry, dict) and isinstance(entry.get("config"), dict):
        entry = entry["config"]
    if not isinstance(entry, dict):
        raise UserError(
            f"{workdir}/{MODEL_FILE} has no 'vision' entry with the SigLIP config, but the "
            "checkpoint holds a vision tower; re-run stage 4 with this version of jasper-jax "
            "(it records the tower's config), or export the text model from the stage-3 workdir"
        )
    return SiglipVisionConfig.from_hf_dict(entry)


# ---- the sentence-transformers folder --------------------------------------------------------


def _write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

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
    keys = {key: key == _ST_POOLING[mode] for key in _ST_POOLING.values()}
    keys.update(pooling_mode_max_tokens=False, pooling_mode_mean_sqrt_len_tokens=False)
    return {"word_embedding_dimension": hidden, **keys}


def write_heads(heads: dict[str, Any], hidden: int, folder: Path) -> list[int]:
    """One `2_Dense_<dim>` folder per head: Identity activation, torch Linear layout."""
    dims = []
    for name, head in sorted(heads.items()):
        dim = int(name.removeprefix("dense_"))
        sub = folder / dense_folder_name(dim)
        _write_json(
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


def copy_tokenizer(source: Path, folder: Path) -> list[str]:
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
    from jasper_jax.encode import resolve_head

    if requested is not None:
        return resolve_head(model.config, requested)
    if model.config.default_head not in (None, POOLED):
        return model.config.default_head
    return head_name(max(model.config.heads)) if model.config.heads else POOLED


def write_text_model(
    model: LoadedModel, folder: Path, default_head: str, max_seq_length: int
) -> dict[str, Any]:
    """Writes everything but README.md and vision/ into `folder`; returns a summary."""
    cfg = model.config
    encoder_cfg = {**cfg.encoder.to_hf_dict(), "torch_dtype": "float32"}
    _write_json(folder / "config.json", encoder_cfg)
    _save_safetensors(params_to_state_dict(model.params["encoder"]), folder / "model.safetensors")
    tokenizer = copy_tokenizer(Path(model.folder), folder)
    dims = write_heads(model.params.get("heads", {}), cfg.hidden_size, folder)
    _write_json(folder / "modules.json", modules_json(default_head, cfg.normalize_pooled))
    _write_json(folder / "1_Pooling" / "config.json", pooling_config(cfg.pooling, cfg.hidden_size))
    _write_json(
        folder / "sentence_bert_config.json",
        {"max_seq_length": max_seq_length, "do_lower_case": False},
    )
    query = model.prompts.get("query", "")
    _write_json(
        folder / "config_sentence_transformers.json",
        {
            "prompts": {"query": query, "document": model.prompts.get("document", "")},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
            "model_type": "SentenceTransformer",
        },
    )
    return {
        "heads": dims,
        "default_head": default_head,
        "pooling": cfg.pooling,
        "tokenizer_files": tokenizer,
    }


def write_vision_model(
    config: Any, params: Any, folder: Path, image_tokens: int | None = None
) -> None:
    """The SigLIP tower as an HF `SiglipVisionModel` folder (config.json + model.safetensors),
    plus `jasper_bridge.json` saying how its patch states enter the text model."""
    from jasper_jax.models.siglip_hf import siglip_params_to_hf

    _write_json(folder / "config.json", {**config.to_hf_dict(), "torch_dtype": "float32"})
    bridge = {
        "pool": "adaptive_avg_pool2d over (patch tokens, channels) of last_hidden_state",
        "image_tokens": image_tokens,
        "target": "the text model's input embeddings at the image-token positions",
    }
    _write_json(folder / "jasper_bridge.json", bridge)
    state = siglip_params_to_hf(params, config, prefix="")
    tensors = {k: np.asarray(v, np.float32) for k, v in state.items()}
    _save_safetensors(tensors, folder / "model.safetensors")


# ---- atomic folder replacement ---------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies below it (both resolved)."""
    return path == folder or folder in path.parents


def _unsafe_reason(output: Path, workdir: Path | None) -> str | None:
    """Why replacing the (resolved) `output` would delete what export did not write, if so."""
    if output.parent == output:
        return "is a filesystem root"
    if _inside(Path.home().resolve(), output):
        return "is your home folder or one of its parents"
    if _inside(Path.cwd().resolve(), output):
        return "is the current folder or one of its parents"
    if workdir is None:
        return None
    if output == workdir:
        return "is the source --workdir"
    if _inside(workdir, output):
        return f"holds the source --workdir {workdir}"
    return None


def check_output(output: Path, overwrite: bool, workdir: str | Path | None = None) -> None:
    """Refuses an `output` (resolved) that exists, unless `overwrite` and it is a previous export
    that is none of: the source workdir or a parent of it, the current folder or a parent of it,
    home or a parent of it, a filesystem root.

    Raises:
      UserError: naming the reason and the fix; nothing has been touched.
    """
    if not output.exists():
        return
    reason = _unsafe_reason(output, None if workdir is None else Path(workdir).resolve())
    if reason:
        raise UserError(
            f"--output {output} {reason}; export writes a new folder (--overwrite replaces only a "
            "previous export): choose a new --output (nothing was touched)"
        )
    if not output.is_dir():
        raise UserError(f"--output {output} is a file, not a folder; choose another path")
    if not overwrite:
        raise UserError(
            f"output folder {output} already exists; pass --overwrite to replace it, or choose "
            "another --output (nothing was written)"
        )
    if not (output / MARKER).is_file():
        raise UserError(
            f"{output} exists and is not a jasper-jax export (no {MARKER}); choose a new "
            "--output or remove it yourself"
        )


def _temp_prefix(output: Path, kind: str) -> str:
    """`.NAME.tmp-PID@HOST~` / `.NAME.old-PID@HOST~`: a later export can tell a dead writer's."""
    return f".{output.name}.{kind}-{process_tag()}"


def leftover_patterns(output: Path) -> list[str]:
    """Globs of the temporary folders an export of `output` makes (any process, old or new)."""
    name = glob.escape(output.name)
    return [f".{name}.tmp-*", f".{name}.old-*"]


def restore_interrupted(output: Path) -> None:
    """A killed export may have moved the previous export aside (`.NAME.old-*/NAME`) without
    putting the new one in place: moves it back, before the leftovers are removed."""
    if output.exists():
        return
    prefix = f".{output.name}.old-"
    for old in sorted(output.parent.glob(leftover_patterns(output)[1]), reverse=True):
        kept = old / output.name
        if kept.is_dir() and not tag_alive(old.name[len(prefix) :]):
            kept.rename(output)
            log.warning("restored %s, moved aside by an interrupted export", output)
            return


def install_folder(built: Path, output: Path) -> None:
    """Moves a finished folder into place; an old `output` is removed only after the move, and
    put back if the move fails."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(dir=output.parent, prefix=_temp_prefix(output, "old")))
        try:
            output.rename(old / output.name)
        except BaseException:
            old.rmdir()
            raise
    try:
        built.rename(output)
    except BaseException:
        if old is not None:
            (old / output.name).rename(output)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_marker(folder: Path, workdir: str | Path, step: int, default_head: str) -> None:
    """`jasper_export.json`: what this folder was exported from; `--overwrite` requires it."""
    _write_json(
        folder / MARKER,
        {
            "format": MARKER_FORMAT,
            "jasper_jax_version": __version__,
            "workdir": str(Path(workdir).resolve()),
            "step": int(step),
            "default_head": default_head,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )


def _evaluation(workdir: str | Path) -> dict | None:
    """The workdir's eval.json for the model card; a damaged one is left out, not fatal."""
    path = Path(workdir) / EVAL_JSON
    if not path.is_file():
        return None
    try:
        evaluation = read_json(path)
    except UserError as e:
        log.warning("model card without evaluation: %s", e)
        return None
    return evaluation if isinstance(evaluation, dict) else None


def build_folder(
    source: ExportSource, workdir: str | Path, folder: Path, head: str, max_len: int
) -> dict[str, Any]:
    """Writes the whole export into the (empty, temporary) `folder`; returns its summary."""
    from jasper_jax.model_card import model_card

    summary = write_text_model(source.model, folder, head, max_len)
    if source.vision is not None:
        write_vision_model(*source.vision, folder / VISION_DIR, source.image_tokens)
    summary["vision"] = source.vision is not None
    card = model_card(source.meta, summary, _evaluation(workdir))
    (folder / "README.md").write_text(card, encoding="utf-8")
    write_marker(folder, workdir, source.meta["step"], head)
    honour_umask(folder, directory=True)  # mkdtemp made it 0700
    return summary


def export_workdir(
    workdir: str | Path,
    output: str | Path,
    *,
    step: int | None = None,
    default_head: str | None = None,
    overwrite: bool = False,
    max_seq_length: int | None = None,
) -> dict[str, Any]:
    """Exports a workdir's checkpoint (latest or `step`) to `output`; returns a summary dict.

    Raises:
      UserError: not a workdir, no checkpoint, NaN/inf parameters, unknown head, an existing
        output without `overwrite`, or one `overwrite` may not replace (checked before anything
        is written); another export writing `output`.
      OSError: writing failed (e.g. disk full); the temporary folder is removed and an existing
        output is left as it was.
    """
    output = Path(output).resolve()  # symlinks and `.` resolved before any comparison
    check_output(output, overwrite, workdir)
    lock = FolderLock(
        output.parent, "export", name=f".{output.name}.lock", what="output folder", flag="--output"
    )
    with lock:
        restore_interrupted(output)
        remove_leftovers(output.parent, leftover_patterns(output))
        check_output(output, overwrite, workdir)  # again: it may have appeared meanwhile
        source = load_export_source(workdir, step)
        head = resolve_default_head(source.model, default_head)
        max_len = int(max_seq_length or source.model.max_seq_length)
        tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=_temp_prefix(output, "tmp")))
        try:
            summary = build_folder(source, workdir, tmp, head, max_len)
            check_output(output, overwrite, workdir)  # made meanwhile by something unlocked
            install_folder(tmp, output)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("exported %s step %d to %s", workdir, source.meta["step"], output)
    return {**summary, "output": str(output), "step": source.meta["step"]}


def set_default_head(folder: str | Path, head: str) -> None:
    """Switches which head an exported folder's modules.json runs ("pooled" or "dense_<dim>")."""
    folder = Path(folder)
    head = f"dense_{head}" if head.isdigit() else head
    if head != POOLED:
        dim = int(head.removeprefix("dense_"))
        if not (folder / dense_folder_name(dim) / "config.json").is_file():
            raise UserError(f"{folder} has no head {head!r} ({dense_folder_name(dim)}/ missing)")
    path = folder / "modules.json"
    modules = modules_json(head, normalizes_pooled(read_json(path)))
    write_text_atomic(path, json.dumps(modules, indent=2) + "\n")
