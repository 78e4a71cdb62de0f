"""A training run's folder (workdir) as a model: its format, and the one reader of it.

    WORKDIR/run.json          what run the checkpoints belong to (written by the Checkpointer)
    WORKDIR/model.json        the student's architecture, tokenizer folder, prompt, teachers;
                              stage 4 adds the SigLIP tower ("vision") and "image_tokens"
    WORKDIR/checkpoints/STEP  orbax checkpoints: "state", "data" and "integrity"

`encode`, `eval`, `export` and a stage hand-off (`train.checkpoint.restore_params`, through
`first_verified` and `verify`) read a workdir through this module only.

Integrity: each checkpoint holds, besides "state" and "data", an "integrity" item with the
fingerprint of every state array (`fingerprint.py`), computed on device at save. Every read
recomputes and compares them; a checkpoint that fails is skipped with a warning (the previous
one is used), or refused when it was asked for by step. Checkpoints written before integrity
items existed are read unverified, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jasper_jax import fingerprint
from jasper_jax.errors import UserError, one_line
from jasper_jax.models.embedder import EmbedderConfig
from jasper_jax.models.loading import ENCODER_CONFIGS, LoadedModel, load_model
from jasper_jax.models.multimodal import MultimodalConfig
from jasper_jax.models.siglip import SiglipVisionConfig
from jasper_jax.paths import PathLike, as_path, read_json, write_json_atomic

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
MODEL_FILE = "model.json"  # the student's architecture, tokenizer folder, teachers
CHECKPOINT_DIR = "checkpoints"
INTEGRITY = "integrity"  # checkpoint item: {"algorithm", "arrays": {key path: fingerprint}}
TEXT_PARAMS = ("encoder", "heads")  # the text model's part of a checkpoint's params
MODEL_JSON_FIX = (
    "restore it from a copy, or re-run the `jasper-jax train` of this workdir (it writes "
    f"{MODEL_FILE} at the start)"
)
_REQUIRED = ("embedder", "tokenizer_folder", "max_seq_length")


class DamagedCheckpoint(Exception):
    """A checkpoint whose files cannot be read or whose arrays fail their fingerprints."""


# ---- model.json ------------------------------------------------------------------------------


def is_workdir(path: PathLike) -> bool:
    """Whether `path` holds a model.json and a checkpoints/ folder."""
    path = as_path(path)
    return (path / MODEL_FILE).is_file() and (path / CHECKPOINT_DIR).is_dir()


def write_model_json(workdir: PathLike, meta: dict[str, Any]) -> None:
    """Writes `meta` (a task's `describe`) as the workdir's model.json, atomically."""
    write_json_atomic(as_path(workdir) / MODEL_FILE, meta)


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


def embedder_config_to_dict(config: EmbedderConfig) -> dict:
    """model.json's "embedder" entry (read back by `embedder_config_from_dict`)."""
    encoder = config.encoder.to_hf_dict()
    if hasattr(config.encoder, "add_pooling_layer"):
        encoder["add_pooling_layer"] = config.encoder.add_pooling_layer
    return {
        "encoder": encoder,
        "pooling": config.pooling,
        "heads": list(config.heads),
        "default_head": config.default_head,
        "normalize_pooled": config.normalize_pooled,
    }


def embedder_config_from_dict(d: dict) -> EmbedderConfig:
    """The student's architecture from model.json's "embedder" entry.

    Raises:
      UserError: an unknown encoder type or a damaged entry.
    """
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


def has_vision(path: PathLike) -> bool:
    """Whether `path` is a training workdir whose model has a vision tower (stage 4)."""
    return (as_path(path) / MODEL_FILE).is_file() and "vision" in read_model_json(path)


def _vision_config(meta: dict, workdir: PathLike) -> SiglipVisionConfig:
    """The SigLIP config that stage 4 records in model.json's "vision" (an HF-style dict)."""
    entry = meta.get("vision")
    if not isinstance(entry, dict):
        raise UserError(
            f"{workdir}/{MODEL_FILE} has no 'vision' entry with the SigLIP config, but the "
            "checkpoint holds a vision tower; re-run stage 4 with this version of jasper-jax "
            "(it records the tower's config), or export the text model from the stage-3 workdir"
        )
    return SiglipVisionConfig.from_hf_dict(entry)


# ---- checkpoint params, verified -------------------------------------------------------------


def integrity_record(state: Any) -> dict:
    """What a checkpoint records about its state: every array's fingerprint."""
    return {"algorithm": fingerprint.ALGORITHM, "arrays": fingerprint.tree_fingerprints(state)}


def verify(manager: ocp.CheckpointManager, step: int, state: Any, partial: bool = False) -> None:
    """Compares a restored state with the fingerprints its checkpoint recorded, on device (only
    one uint32 per array comes to the host). `partial`: `state` holds a part of the checkpoint
    (a stage hand-off's params): only its arrays are compared, each must have a record.

    Raises:
      DamagedCheckpoint: a fingerprint differs (or the record is unreadable).
    """
    if not (as_path(manager.directory) / str(step) / INTEGRITY).exists():
        log.warning(
            "checkpoint %s has no integrity record (written by an older jasper-jax): restored "
            "unverified",
            as_path(manager.directory) / str(step),
        )
        return
    try:
        record = manager.restore(
            step, args=ocp.args.Composite(**{INTEGRITY: ocp.args.JsonRestore()})
        )[INTEGRITY]
        recorded = dict(record["arrays"])
    except Exception as e:
        raise DamagedCheckpoint(f"its integrity record cannot be read: {one_line(e)}") from e
    if record.get("algorithm") != fingerprint.ALGORITHM:
        raise DamagedCheckpoint(f"unknown fingerprint algorithm {record.get('algorithm')!r}")
    actual = fingerprint.tree_fingerprints(state)
    if partial:
        recorded = {k: v for k, v in recorded.items() if k in actual}
    bad = fingerprint.mismatches(recorded, actual)
    if bad:
        raise DamagedCheckpoint(
            f"{len(bad)} of {len(recorded)} arrays differ from their recorded fingerprints "
            f"(e.g. {bad[0]})"
        )


def _read_verified(manager: ocp.CheckpointManager, step: int) -> Any:
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    except Exception as e:  # orbax raises many types for truncated or damaged files
        raise DamagedCheckpoint(f"cannot be read: {one_line(e)}") from e
    verify(manager, step, restored["state"])
    return restored["state"]["params"]


def first_verified(
    workdir: PathLike,
    step: int | None,
    read: Callable[[ocp.CheckpointManager, int], Any],
    state_handler: ocp.CheckpointHandler,
) -> tuple[Any, int]:
    """(`read(manager, step)`, step) of the latest checkpoint whose read verifies, falling back
    past damaged ones with a warning, or of exactly `step`. `read` raises DamagedCheckpoint;
    `state_handler` reads the "state" item (the pytree one can restore a part of it).

    Raises:
      UserError: no checkpoints/ folder, no such step, or no checkpoint that verifies.
    """
    directory = as_path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        raise UserError(
            f"{workdir} has no {CHECKPOINT_DIR}/ folder: run the previous stage first, or "
            "point init_from / --workdir at a finished stage's workdir"
        )
    manager = ocp.CheckpointManager(
        directory,
        item_handlers={
            "state": state_handler,
            INTEGRITY: ocp.JsonCheckpointHandler(),
        },
        options=ocp.CheckpointManagerOptions(create=False),
    )
    try:
        steps = manager.all_steps()
        if not steps or (step is not None and step not in steps):
            raise UserError(
                f"{directory} has no checkpoint {step if step is not None else ''} "
                f"(available steps: {sorted(steps)})"
            )
        candidates = sorted(steps, reverse=True) if step is None else [step]
        damaged = []
        for candidate in candidates:
            try:
                value = read(manager, candidate)
            except DamagedCheckpoint as e:
                damaged.append(f"step {candidate}: {e}")
                log.warning("checkpoint %s is damaged (%s)", directory / str(candidate), e)
                continue
            if damaged:
                log.warning("using checkpoint %s instead", directory / str(candidate))
            return value, candidate
    finally:
        manager.close()
    raise UserError(
        f"no good checkpoint in {directory} ({'; '.join(damaged)}); restore it from a backup, "
        "pass --step of an intact one, or re-run the stage"
    )


def load_params(workdir: PathLike, step: int | None = None) -> tuple[Any, int]:
    """(params as a host numpy tree, step) of a workdir's checkpoint: the latest that verifies,
    or exactly `step`. For encode/eval/export (a stage hand-off uses
    `train.checkpoint.restore_params`).

    Raises:
      UserError: no checkpoints/ folder, no such step, or no checkpoint that verifies.
    """
    params, step = first_verified(workdir, step, _read_verified, ocp.StandardCheckpointHandler())
    return jax.device_get(params), step


# ---- the workdir as a model ------------------------------------------------------------------


@dataclasses.dataclass
class RunModel:
    """What one checkpoint of a workdir holds, read once.

    Attributes:
      text: the text embedder (encoder + heads), float32 numpy params.
      meta: model.json of the run, plus "step" (the checkpoint's step).
      vision: the SigLIP tower's config, or None when the checkpoint holds no tower.
      vision_params: the tower's params (numpy tree), or None.
    """

    text: LoadedModel
    meta: dict
    vision: SiglipVisionConfig | None = None
    vision_params: Any = None

    @property
    def image_tokens(self) -> int | None:
        """Pooled image tokens the text model takes (stage 4), if recorded."""
        tokens = self.meta.get("image_tokens")
        return int(tokens) if tokens else None


def load_run(workdir: PathLike, step: int | None = None) -> RunModel:
    """model.json and one checkpoint (the latest that verifies, or `step`) of a training
    workdir (a local folder or a gs:// URL).

    Raises:
      UserError: not a workdir, a damaged model.json, no (good) checkpoint.
    """
    workdir = as_path(workdir)
    if not (workdir / MODEL_FILE).is_file():
        raise UserError(
            f"{workdir} is not a jasper-jax workdir (no {MODEL_FILE}); pass the --workdir of a "
            "`jasper-jax train` run"
        )
    meta = read_model_json(workdir)
    config = embedder_config_from_dict(meta["embedder"])
    params, meta["step"] = load_params(workdir, step)
    prompts = {role: text for role, text in meta.get("prompts", {}).items() if text}
    text = LoadedModel(
        config,
        {k: v for k, v in params.items() if k in TEXT_PARAMS},
        Path(meta["tokenizer_folder"]),
        int(meta["max_seq_length"]),
        prompts,
        # As the export's config_sentence_transformers.json: plain encode gets documents' prompt.
        "document" if prompts.get("document") else None,
    )
    if "vision" not in params:
        return RunModel(text, meta)
    return RunModel(text, meta, _vision_config(meta, workdir), params["vision"])


def load_workdir_model(workdir: PathLike, step: int | None = None) -> tuple[LoadedModel, dict]:
    """(text model from checkpoint `step` or the latest, model.json + "step") of a workdir."""
    run = load_run(workdir, step)
    return run.text, run.meta


def load_any_model(path: str | Path, step: int | None = None) -> LoadedModel:
    """An HF / sentence-transformers folder, or a training workdir (latest checkpoint)."""
    return load_workdir_model(path, step)[0] if is_workdir(path) else load_model(path)


@dataclasses.dataclass
class ImageModel:
    """A multimodal model ready to run: architecture and float32 params (numpy tree)."""

    config: MultimodalConfig
    params: Any
    meta: dict


def load_image_model(workdir: PathLike, step: int | None = None) -> ImageModel:
    """The multimodal model of a stage-4 workdir (latest checkpoint, or `step`).

    Raises:
      UserError: the workdir's model has no vision tower, or as `load_run`.
    """
    if not has_vision(workdir):
        raise UserError(
            f"{workdir} is not a model with a vision tower (no 'vision' in its model.json); "
            "fix: pass the --workdir of a stage-4 run, or use --input for texts"
        )
    run = load_run(workdir, step)
    if run.vision is None:
        raise UserError(
            f"checkpoint step {run.meta['step']} of {workdir} holds no vision tower although "
            f"its {MODEL_FILE} records one; pass the --workdir of a finished stage-4 run"
        )
    config = MultimodalConfig(run.text.config, run.vision, int(run.meta["image_tokens"]))
    return ImageModel(config, {**run.text.params, "vision": run.vision_params}, run.meta)
