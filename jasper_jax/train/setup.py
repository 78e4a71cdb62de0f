"""What a stage trains on, behind one small interface (`Task`), so the loop is stage-agnostic.

A task gives the loop: the Flax module and its random init, the pretrained parameters to load
(HF weights; the previous stage's params are loaded by the loop), the input pipeline, the
forward `(params, batch, rng) -> (student vectors per head, targets)`, the batch keys to put on
devices, and a held-out evaluation. `TextTask` covers stages 1-3.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jasper_jax.errors import UserError
from jasper_jax.models.attention import AttentionSettings
from jasper_jax.models.embedder import (
    HEAD_INPUT,
    Embedder,
    EmbedderConfig,
    head_name,
    init_params,
)
from jasper_jax.models.loading import LoadedModel, load_model


class Task(Protocol):
    model: nn.Module
    batch_keys: tuple[str, ...]

    def init(self, rng: jax.Array) -> Any: ...  # boxed params (with logical axes)
    def pretrained(self) -> tuple[dict, str]: ...  # ({"encoder": ...}, description)
    def pipeline(self, c: ml_collections.ConfigDict) -> Any: ...
    def forward(self, c: ml_collections.ConfigDict) -> Any: ...
    def evaluate(self, c, params: Any, mesh: Any) -> dict[str, dict[str, float]]: ...
    def identity(self) -> dict: ...


def resolve_model_folder(name_or_path: str) -> Path:
    """A local folder, or the name of a bundled teacher (e.g. all-MiniLM-L6-v2)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    from jasper_jax.data.teacher_assets import KNOWN_TEACHERS, teacher_folder

    if name_or_path in KNOWN_TEACHERS:
        return teacher_folder(name_or_path)
    raise UserError(
        f"model {name_or_path!r} is neither a local folder nor a bundled teacher "
        f"({sorted(KNOWN_TEACHERS)}); download it to a folder and pass its path"
    )


def teacher_dim_of(data_dir: str) -> int:
    from jasper_jax.data.teacher_dataset import open_teacher_dataset

    source, _ = open_teacher_dataset(data_dir)
    return int(source[0]["teacher"].shape[-1])


def embedder_config_to_dict(config: EmbedderConfig) -> dict:
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


def attention_settings(c: ml_collections.ConfigDict) -> AttentionSettings:
    """model.attention / model.attention_block as the encoders' `attention` attribute."""
    return AttentionSettings(c.model.attention, int(c.model.attention_block))


def with_rope_scaling(encoder: Any, rope_scaling: str) -> Any:
    """The encoder config with model.rope_scaling applied ("" keeps the checkpoint's)."""
    if not rope_scaling:
        return encoder
    if encoder.model_type != "qwen2":
        raise UserError(
            f"config field model.rope_scaling={rope_scaling!r} applies to Qwen2 students only; "
            f"this student is {encoder.model_type!r}: set it to ''"
        )
    from jasper_jax.models.rope import RopeScaling

    return dataclasses.replace(encoder, rope_scaling=RopeScaling.parse(rope_scaling))


def student_config(c: ml_collections.ConfigDict, loaded: LoadedModel, teacher_dim: int):
    heads = tuple(int(d) for d in c.model.heads)
    if teacher_dim not in heads:
        raise UserError(
            f"config field model.heads {heads} has no head of the teacher dim {teacher_dim}: "
            "the config and the teacher data disagree (wrong teachers or heads)"
        )
    return EmbedderConfig(
        encoder=with_rope_scaling(loaded.config.encoder, c.model.rope_scaling),
        pooling=c.model.pooling,
        heads=heads,
        default_head=head_name(teacher_dim),
        normalize_pooled=bool(c.model.normalize_pooled),
    )


@dataclasses.dataclass
class TextTask:
    """Stages 1-3: texts in, student head vectors vs concatenated teacher vectors."""

    config: EmbedderConfig
    loaded: LoadedModel
    teacher_dim: int
    model: nn.Module
    batch_keys: tuple[str, ...] = ("input_ids", "attention_mask", "teacher")

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> TextTask:
        if not c.data.train_dir:
            raise UserError("config field data.train_dir is empty: point it at a teacher dataset")
        teacher_dim = teacher_dim_of(c.data.train_dir)
        if c.data.max_chunks:
            from jasper_jax.data.chunk_pipeline import require_chunks
            from jasper_jax.data.teacher_dataset import open_teacher_dataset

            require_chunks(open_teacher_dataset(c.data.train_dir)[1], c.data.train_dir)
        loaded = load_model(resolve_model_folder(c.model.init_hf))
        config = student_config(c, loaded, teacher_dim)
        model = Embedder(
            config, dtype=jnp.dtype(c.dtype), remat=c.model.remat, attention=attention_settings(c)
        )
        keys = cls.batch_keys
        if c.data.max_chunks:
            keys = (*keys, "chunk_spans", "chunk_mask", "chunk_teacher")
        return cls(config, loaded, teacher_dim, model, keys)

    @property
    def folder(self) -> Path:
        return self.loaded.folder

    def init(self, rng: jax.Array) -> Any:
        return init_params(self.config, rng)

    def pretrained(self) -> tuple[dict, str]:
        return {"encoder": self.loaded.params["encoder"]}, f"HF weights {self.folder}"

    def describe(self, c: ml_collections.ConfigDict) -> dict:
        """What `model.json` records so the checkpoint can be used without the config."""
        from jasper_jax.data.teacher_dataset import open_teacher_dataset

        _, meta = open_teacher_dataset(c.data.train_dir)
        return {
            "embedder": embedder_config_to_dict(self.config),
            "tokenizer_folder": str(Path(self.folder).resolve()),
            "max_seq_length": int(c.data.max_length),
            "prompt": c.data.prompt,
            "teachers": meta.get("teachers", []),
            "stage": c.stage,
            "config": c.name,
        }

    def identity(self) -> dict:
        return {
            "student": self.config.encoder.model_type,
            "hidden": self.config.hidden_size,
            "teacher_dim": self.teacher_dim,
        }

    def pipeline(self, c: ml_collections.ConfigDict):
        from jasper_jax.data.pipeline import make_text_pipeline

        return make_text_pipeline(
            c.data.train_dir,
            self.folder,
            batch_size=c.data.batch_size,
            max_length=c.data.max_length,
            seed=c.seed,
            prompt=c.data.prompt or None,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            worker_count=c.data.worker_count,
            max_chunks=c.data.max_chunks,
            length_groups=c.data.length_groups,
            pad_multiple=c.data.pad_multiple,
        )

    def loaded_model(self, c: ml_collections.ConfigDict, params: Any) -> LoadedModel:
        """The student with `params`, usable by `TextEncoder` and evaluators."""
        prompts = {"query": c.data.prompt} if c.data.prompt else {}
        return LoadedModel(self.config, params, self.folder, c.data.max_length, prompts)

    def head_features(self, params: Any, batch: dict) -> jax.Array:
        """[B, hidden] float32: what the heads read for this batch (no dropout)."""
        return self.model.apply(
            {"params": params}, batch["input_ids"], batch["attention_mask"], heads=(HEAD_INPUT,)
        )[HEAD_INPUT]

    def forward(self, c: ml_collections.ConfigDict):
        from jasper_jax.train.step import text_forward

        return text_forward(
            self.model, self.config.head_names, c.model.dropout, chunks=c.data.max_chunks > 0
        )

    def evaluate(self, c, params, mesh) -> dict[str, dict[str, float]]:
        """Held-out fidelity per head: cosine to teacher (full head), pairwise Spearman, NN
        recall@10 of the teacher's neighbours."""
        from jasper_jax.data.pipeline import load_eval_arrays
        from jasper_jax.encode import TextEncoder
        from jasper_jax.fidelity import fidelity_metrics

        if not c.data.eval_dir:
            return {}
        texts, teacher, _ = load_eval_arrays(c.data.eval_dir, limit=c.data.eval_texts)
        if teacher.shape[1] != self.teacher_dim:
            raise UserError(
                f"eval data {c.data.eval_dir} has teacher dim {teacher.shape[1]} but the train "
                f"data has {self.teacher_dim}; build both with the same teachers"
            )
        model = self.loaded_model(c, params)
        encoder = TextEncoder(
            model,
            dtype=c.dtype,
            mesh=mesh,
            batch_size=c.data.batch_size,
            attention=attention_settings(c),
        )
        vectors = encoder.encode_heads(texts, heads=self.config.head_names, prompt=c.data.prompt)
        scores = {name: fidelity_metrics(v, teacher) for name, v in vectors.items()}
        if c.data.max_chunks:
            scores.update(_chunk_fidelity(c, encoder, self.config.head_names))
        return scores


def _chunk_fidelity(c, encoder, heads: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Held-out fidelity of the chunk vectors of one pass over each document, per head
    ("chunks/<head>"), against each chunk's own teacher vector."""
    from jasper_jax.data.chunk_pipeline import load_eval_chunks
    from jasper_jax.encode_chunks import ChunkEncoder
    from jasper_jax.fidelity import fidelity_metrics

    documents, spans, teacher = load_eval_chunks(c.data.eval_dir, limit=c.data.eval_texts)
    result = ChunkEncoder(encoder).encode(
        documents, spans=spans, heads=heads, prompt=c.data.prompt, max_length=c.data.max_length
    )
    kept = teacher[result.source]  # chunks cut by max_length are left out of both sides
    return {f"chunks/{h}": fidelity_metrics(result.chunks[h], kept) for h in heads}


def make_task(c: ml_collections.ConfigDict) -> Task:
    """The task for the config's stage (stage 4 registers a vision task)."""
    if c.stage == 4:
        from jasper_jax.train.vision_task import VisionTask

        return VisionTask.from_config(c)
    return TextTask.from_config(c)


abstract_init = functools.partial(jax.eval_shape)
