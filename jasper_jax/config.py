"""Configs are data: `configs/<name>.py` defines `get_config(arg) -> ConfigDict`.

`load_config("configs/embedded_default.py:2", ["--config.optim.lr=3e-5"])` imports the file, calls
`get_config("2")`, applies overrides (command-line strings typed by the existing field, or a dict
`{"optim.lr": 3e-5}` of values), and validates the whole config before any work starts, naming the
field that is wrong. `to_settings` turns the validated config into the typed, frozen `Settings`
that library code reads; only the CLI and this module see a `ConfigDict`.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jasper_jax.errors import UserError
from jasper_jax.models.attention import IMPLEMENTATIONS
from jasper_jax.models.layers import REMAT_POLICIES, remat_policy_name
from jasper_jax.models.rope import RopeScaling
from jasper_jax.settings import Settings, from_mapping

TRAINABLE = ("heads", "heads+last_layers", "all", "vision")
DTYPES = ("float32", "bfloat16")
HEAD_INIT_MODES = ("lstsq", "random")  # new heads: closed-form ridge fit, or random (paper)


def import_config_module(path: Path):
    """The config file as a module (configs may build on each other this way)."""
    spec = importlib.util.spec_from_file_location(f"_jasper_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"{path} defines no get_config(arg=None) function")
    return module


def resolve_config_path(spec: str) -> tuple[Path, str | None]:
    """ "configs/x.py:2" -> (path, "2"); a bare name ("embedded_default") looks in configs/."""
    path_text, _, arg = spec.partition(":")
    path = Path(path_text)
    if not path.exists() and not path.suffix:
        path = Path(__file__).resolve().parent.parent / "configs" / f"{path_text}.py"
    if not path.exists():
        raise UserError(
            f"config file {path_text} does not exist (e.g. configs/embedded_default.py)"
        )
    return path, arg or None


def _parse_value(text: str, current):
    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(current, int) and not isinstance(current, bool):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str) or current is None:
        return text
    value = ast.literal_eval(text)  # tuples and lists: --config.model.heads=(1152,256)
    return tuple(value) if isinstance(current, tuple) else value


Overrides = Sequence[str] | Mapping[str, Any]


def apply_overrides(config: ml_collections.ConfigDict, overrides: Overrides) -> None:
    """Applies `--config.a.b=value` strings, or a `{"a.b": value}` dict of typed values, in
    place; unknown fields and values of the wrong type raise UserError."""
    if isinstance(overrides, Mapping):
        for key, value in overrides.items():
            parent, name = _field(config, key, f"override {key}={value!r}")
            try:
                parent[name] = _coerce(value, parent[name])
            except TypeError as e:
                raise UserError(f"override {key}={value!r}: {e}") from e
        return
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise UserError(f"override {item!r}: write it as --config.section.field=value")
        key, _, text = item[len("--config.") :].partition("=")
        parent, name = _field(config, key, f"override {item!r}")
        try:
            parent[name] = _parse_value(text, parent[name])
        except (ValueError, SyntaxError, TypeError) as e:
            raise UserError(f"override {item!r}: {e}") from e


def _field(config: ml_collections.ConfigDict, key: str, what: str):
    """(the section holding `key` "a.b.c", the field's name), or UserError naming what's wrong."""
    parent, name = config, key.split(".")[-1]
    for part in key.split(".")[:-1]:
        if part not in parent:
            raise UserError(f"{what}: config has no section {part!r}")
        parent = parent[part]
    if name not in parent:
        raise UserError(f"{what}: no field {name!r}; fields here: {sorted(parent.keys())}")
    return parent, name


def _coerce(value: Any, current: Any) -> Any:
    """A dict override's value in the type of the field it replaces (paths become strings)."""
    if isinstance(current, bool) or isinstance(value, bool):
        if not isinstance(value, bool) or not isinstance(current, bool):
            raise TypeError(f"expected {type(current).__name__}, got {type(value).__name__}")
        return value
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    if (isinstance(current, str) or current is None) and isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(current, tuple) and isinstance(value, list):
        return tuple(value)
    if current is not None and not isinstance(value, type(current)):
        raise TypeError(f"expected {type(current).__name__}, got {type(value).__name__}")
    return value


def load_config(spec: str, overrides: Overrides = ()) -> ml_collections.ConfigDict:
    """The config file `spec` ("path.py:arg"), overridden and validated."""
    path, arg = resolve_config_path(spec)
    config = import_config_module(path).get_config(arg)
    apply_overrides(config, overrides)
    validate_config(config)
    return config


def load_settings(spec: str, overrides: Overrides = ()) -> Settings:
    """The settings of `load_config(spec, overrides)` (validated there, once): what drivers
    pass to the train loop."""
    return _typed(load_config(spec, overrides))


def to_settings(config: ml_collections.ConfigDict) -> Settings:
    """The typed, frozen settings of a config, validated first.

    Raises:
      UserError: a wrong field, or a field no part of jasper-jax reads (a typo in a config file).
    """
    validate_config(config)
    return _typed(config)


def _typed(config: ml_collections.ConfigDict) -> Settings:
    """`Settings` of an already validated config."""
    try:
        return from_mapping(Settings, config.to_dict())
    except ValueError as e:
        raise UserError(f"config field {e}: remove it or fix its name") from e


def _check(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise UserError(f"config field {field}: {message}")


def validate_config(c: ml_collections.ConfigDict) -> None:
    """Checks every field the engine reads; raises UserError naming the first wrong one."""
    _check_finite(c)
    _check(c.stage in (1, 2, 3, 4), "stage", f"{c.stage!r} must be 1, 2, 3 or 4")
    _check(c.trainable in TRAINABLE, "trainable", f"{c.trainable!r} must be one of {TRAINABLE}")
    _check(c.dtype in DTYPES, "dtype", f"{c.dtype!r} must be one of {DTYPES}")
    _validate_model(c.model)
    _validate_memory_fields(c.model)
    _validate_data(c)
    _validate_optim_and_train(c)
    _validate_loss(c)
    mesh = tuple(c.mesh_shape)
    _check(len(mesh) == 3, "mesh_shape", "give (data, fsdp, tensor)")
    _check(
        all(n == -1 or n >= 1 for n in mesh) and mesh.count(-1) <= 1,
        "mesh_shape",
        f"{mesh}: sizes >= 1, at most one -1 (the remaining devices)",
    )
    if c.stage == 4 or c.trainable == "vision":
        _validate_vision(c)


def _validate_model(m: ml_collections.ConfigDict) -> None:
    _check(m.pooling in ("mean", "cls", "last"), "model.pooling", "use mean, cls or last")
    heads = tuple(m.heads)
    _check(len(heads) > 0 and all(int(d) > 0 for d in heads), "model.heads", "positive dims")
    _check(len(set(heads)) == len(heads), "model.heads", f"{heads} has a repeated dim")
    _check(m.trainable_last_layers >= 0, "model.trainable_last_layers", "must be >= 0")
    _check(
        m.head_init in HEAD_INIT_MODES,
        "model.head_init",
        f"{m.head_init!r} must be one of {HEAD_INIT_MODES}",
    )
    _check(m.head_init_texts >= 1, "model.head_init_texts", "must be >= 1 text")
    _check(
        math.isfinite(m.head_init_ridge) and m.head_init_ridge >= 0,
        "model.head_init_ridge",
        f"{m.head_init_ridge} must be a finite number >= 0",
    )
    _check(isinstance(m.normalize_pooled, bool), "model.normalize_pooled", "must be True/False")


def _validate_data(c: ml_collections.ConfigDict) -> None:
    _check(c.data.batch_size >= 2, "data.batch_size", "in-batch losses need at least 2 rows")
    _check(c.data.max_length >= 4, "data.max_length", "must be at least 4 tokens")
    _check(c.data.max_chunks >= 0, "data.max_chunks", "must be >= 0 (0: no chunk alignment)")
    _check(c.data.length_groups >= 1, "data.length_groups", "must be >= 1 (1: fixed length)")
    _check(c.data.pad_multiple >= 1, "data.pad_multiple", "must be >= 1 token")
    _check(
        c.data.max_chunks == 0 or c.stage in (1, 2, 3),
        "data.max_chunks",
        "chunk alignment is a text stage (1-3) option; set it to 0 for stage 4",
    )
    _check(c.data.negatives >= -1, "data.negatives", "must be >= 0, or -1 (all stored)")
    for f in ("eval_texts", "train_texts", "worker_count", "eval_images", "train_images"):
        _check(c.data[f] >= 0, f"data.{f}", f"{c.data[f]} must be >= 0")


def _validate_optim_and_train(c: ml_collections.ConfigDict) -> None:
    o = c.optim
    _check(o.lr > 0, "optim.lr", f"{o.lr} must be > 0")
    for f in ("b1", "b2"):
        _check(0 <= o[f] < 1, f"optim.{f}", f"{o[f]} must be in [0, 1) (Adam's decay rate)")
    _check(0 <= o.warmup_fraction < 1, "optim.warmup_fraction", "must be in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(o.clip_norm > 0, "optim.clip_norm", "must be > 0")
    t = c.train
    _check(t.steps >= 0, "train.steps", "must be >= 0 (0: fit the heads, no gradient steps)")
    _check(
        t.steps >= 1 or (c.model.head_init == "lstsq" and c.trainable == "heads"),
        "train.steps",
        "0 steps only makes sense for a head-only stage with model.head_init=lstsq",
    )
    for f in ("log_every", "checkpoint_every", "keep_checkpoints", "max_nonfinite_in_row"):
        _check(t[f] >= 1, f"train.{f}", "must be >= 1")
    chunk = t.gradcache_chunk
    _check(
        chunk == 0 or (chunk > 0 and c.data.batch_size % chunk == 0),
        "train.gradcache_chunk",
        f"{chunk} must be 0 (off) or divide data.batch_size {c.data.batch_size}",
    )


LOSS_WEIGHTS = (
    "cosine",
    "similarity",
    "relative_similarity",
    "infonce",
    "gor",
    "chunk_cosine",
    "chunk_similarity",
    "chunk_relative_similarity",
)


def _validate_loss(c: ml_collections.ConfigDict) -> None:
    w = c.loss
    for f in LOSS_WEIGHTS:
        _check(w[f] >= 0, f"loss.{f}", "weights must be >= 0")
    _check(w.margin >= 0, "loss.margin", "must be >= 0")
    _check(w.infonce_temperature > 0, "loss.infonce_temperature", "must be > 0")
    _check(
        0 < w.min_temperature <= w.max_temperature,
        "loss.min_temperature",
        f"{w.min_temperature} must be > 0 and <= loss.max_temperature {w.max_temperature}",
    )
    _check(
        not w.learn_temperature or w.min_temperature <= w.infonce_temperature <= w.max_temperature,
        "loss.infonce_temperature",
        f"{w.infonce_temperature} (where the learned one starts) must lie in "
        f"[loss.min_temperature, loss.max_temperature] = [{w.min_temperature}, "
        f"{w.max_temperature}]",
    )
    _check(
        any(w[f] > 0 for f in ("cosine", "similarity", "relative_similarity", "infonce")),
        "loss.cosine",
        "cosine, similarity, relative_similarity and infonce are all 0: nothing would train; "
        "give distillation weights, an infonce weight (pair data), or both",
    )
    _check(w.resim_block_size >= 0, "loss.resim_block_size", "must be >= 0 (0: automatic)")
    _check(all(int(d) > 0 for d in w.mrl_dims), "loss.mrl_dims", f"{w.mrl_dims}: dims must be > 0")
    _check(w.in_batch in ("global", "per_device"), "loss.in_batch", "global or per_device")
    if w.mrl_dims:
        widest = max(tuple(c.model.heads))
        _check(max(w.mrl_dims) <= widest, "loss.mrl_dims", "dims must fit the widest head")


def _check_finite(c: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Every float field finite: inf or nan (`--config.optim.lr=inf`) is never meant."""
    for key, value in c.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            _check_finite(value, f"{name}.")
        elif isinstance(value, float):
            _check(math.isfinite(value), name, f"{value} must be a finite number")
        elif isinstance(value, (tuple, list)):
            bad = [v for v in value if isinstance(v, float) and not math.isfinite(v)]
            _check(not bad, name, f"{value} must hold finite numbers")


def _validate_memory_fields(m: ml_collections.ConfigDict) -> None:
    """model.remat, model.attention, model.attention_block, model.rope_scaling."""
    try:
        remat_policy_name(m.remat)
    except UserError:
        _check(False, "model.remat", f"{m.remat!r} must be one of {tuple(REMAT_POLICIES)}")
    _check(
        m.attention in IMPLEMENTATIONS,
        "model.attention",
        f"{m.attention!r} must be one of {IMPLEMENTATIONS}",
    )
    _check(m.attention_block >= 1, "model.attention_block", f"{m.attention_block} must be >= 1")
    if m.rope_scaling:
        try:
            RopeScaling.parse(m.rope_scaling)
        except UserError as e:
            _check(False, "model.rope_scaling", str(e))


def _validate_vision(c: ml_collections.ConfigDict) -> None:
    """Stage 4: the tower's shape, the bridge, and where the frozen student comes from."""
    _check(c.stage == 4 and c.trainable == "vision", "trainable", "stage 4 trains only 'vision'")
    _check(bool(c.init_from), "init_from", "stage 4 needs the stage-3 workdir (frozen student)")
    v = c.model.vision
    for f in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
        _check(v.init_hf or v[f] >= 1, f"model.vision.{f}", "must be >= 1")
    _check(
        v.init_hf or v.hidden_size % max(v.num_attention_heads, 1) == 0,
        "model.vision.num_attention_heads",
        f"{v.num_attention_heads} must divide model.vision.hidden_size {v.hidden_size}",
    )
    _check(
        v.init_hf or v.patch_size <= v.image_size,
        "model.vision.patch_size",
        f"{v.patch_size} must be <= model.vision.image_size {v.image_size}",
    )
    _check(c.model.image_tokens >= 1, "model.image_tokens", "must be >= 1")
    _check(c.data.eval_images >= 0, "data.eval_images", "must be >= 0")
