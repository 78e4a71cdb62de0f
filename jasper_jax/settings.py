"""Typed, frozen settings of a run: what library code reads instead of a `ConfigDict`.

Built once by `jasper_jax.config.to_settings` from a validated config; the sections and fields
mirror `configs/embedded_default.py` one to one (a field of the config is a field here, with
the same name), so `settings.data.batch_size` reads as `config.data.batch_size` did.
Units: lengths in tokens, sizes in rows, learning rates per step, images in pixels.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any


@dataclasses.dataclass(frozen=True)
class VisionSettings:
    """Stage 4's SigLIP tower: a local HF folder (`init_hf`) or these shapes, from scratch."""

    init_hf: str = ""
    image_size: int = 64
    patch_size: int = 8
    hidden_size: int = 192
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 6


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    init_hf: str = ""  # local HF folder or a bundled teacher's name
    pooling: str = "mean"
    heads: tuple[int, ...] = ()  # output dims of the projection heads
    trainable_last_layers: int = 3
    head_init: str = "lstsq"
    head_init_texts: int = 12000
    head_init_ridge: float = 1e-3
    normalize_pooled: bool = True
    dropout: bool = False
    remat: str = "none"
    attention: str = "auto"
    attention_block: int = 512
    rope_scaling: str = ""
    image_tokens: int = 8
    vision: VisionSettings = VisionSettings()


@dataclasses.dataclass(frozen=True)
class DataSettings:
    train_dir: str = ""
    eval_dir: str = ""
    batch_size: int = 64  # global rows per step
    max_length: int = 48  # tokens
    length_groups: int = 16
    pad_multiple: int = 16
    # Student prompts by role: pair data's column 0 gets query_prompt, its documents and every
    # text of single-text data get document_prompt (Jasper: passages take no prompt).
    query_prompt: str = ""
    document_prompt: str = ""
    negatives: int = -1  # hard negatives per pair row used (-1: all the pair dataset holds)
    worker_count: int = 0
    eval_texts: int = 1000
    train_texts: int = 12000
    train_pairs: int = 4800
    corpus: str = "embedded"
    text_eval_dir: str = ""
    eval_images: int = 500
    train_images: int = 6000
    max_chunks: int = 0
    # The demo's long-document data (configs/embedded_default.py:long).
    chunking: str = ""
    document_tokens: tuple[int, ...] = ()
    train_documents: int = 0


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """Weights of each term (0 turns it off) and their knobs; see SPEC.md."""

    cosine: float = 10.0
    similarity: float = 200.0
    relative_similarity: float = 20.0
    margin: float = 0.015
    mrl_dims: tuple[int, ...] = ()
    infonce: float = 0.0
    infonce_temperature: float = 0.05
    infonce_symmetric: bool = True
    learn_temperature: bool = False
    min_temperature: float = 0.01
    max_temperature: float = 1.0
    gor: float = 0.0
    resim_block_size: int = 0
    in_batch: str = "global"
    chunk_cosine: float = 10.0
    chunk_similarity: float = 200.0
    chunk_relative_similarity: float = 0.0


@dataclasses.dataclass(frozen=True)
class OptimSettings:
    lr: float = 1e-4
    warmup_fraction: float = 0.05
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int = 0
    log_every: int = 10
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    max_nonfinite_in_row: int = 5
    gradcache_chunk: int = 0  # rows encoded at a time; 0: the whole batch


@dataclasses.dataclass(frozen=True)
class Settings:
    """One stage of one recipe."""

    name: str
    stage: int
    seed: int = 0
    dtype: str = "float32"  # compute dtype
    mesh_shape: tuple[int, ...] = (-1, 1, 1)  # (data, fsdp, tensor)
    trainable: str = "heads"
    init_from: str = ""  # previous stage's workdir
    teachers: tuple[str, ...] = ()
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    loss: LossSettings = LossSettings()
    optim: OptimSettings = OptimSettings()
    train: TrainSettings = TrainSettings()


def from_mapping(cls: type, values: typing.Mapping[str, Any], where: str = "") -> Any:
    """`cls` (a settings dataclass) from a nested mapping of plain values, each converted to
    its field's type; a field the mapping lacks keeps its default (tests/test_settings.py checks
    that every recipe states them all). Raises ValueError naming a key no setting has."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}{unknown[0]} is not a setting jasper-jax reads")
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        kwargs[field.name] = _convert(hints[field.name], values[field.name], f"{where}{field.name}")
    return cls(**kwargs)


def _convert(kind: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(kind):
        return from_mapping(kind, value, f"{where}.")
    origin = typing.get_origin(kind)
    if origin is tuple:
        (item, _) = typing.get_args(kind)
        return tuple(_convert(item, v, where) for v in value)
    if kind is bool:
        return bool(value)
    return kind(value)
