"""Stages 1-3 as a `Task` (`train/task.py`): texts in, student head vectors vs concatenated
teacher vectors; also the student's settings shared with stage 4 (attention, RoPE scaling)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jasper_jax.data.eval_records import load_eval_arrays, load_eval_chunks
from jasper_jax.data.pair_pipeline import make_pair_pipeline, used_negatives
from jasper_jax.data.pipeline import make_text_pipeline, require_chunks
from jasper_jax.data.teacher_assets import resolve_model_folder
from jasper_jax.data.teacher_dataset import open_teacher_dataset, pair_width
from jasper_jax.encode import TextEncoder
from jasper_jax.encode_chunks import ChunkEncoder
from jasper_jax.errors import UserError
from jasper_jax.fidelity import fidelity_metrics
from jasper_jax.losses.pair_loss import LOG_TEMPERATURE
from jasper_jax.models.attention import AttentionSettings
from jasper_jax.models.embedder import (
    HEAD_INPUT,
    Embedder,
    EmbedderConfig,
    head_name,
    init_params,
)
from jasper_jax.models.loading import LoadedModel, load_model
from jasper_jax.models.rope import RopeScaling
from jasper_jax.run_folder import embedder_config_to_dict
from jasper_jax.settings import Settings
from jasper_jax.train.step import LOSS_PARAMS, pair_forward, text_forward


def teacher_dim_of(data_dir: str) -> int:
    source, _ = open_teacher_dataset(data_dir)
    return int(source[0]["teacher"].shape[-1])


def attention_settings(s: Settings) -> AttentionSettings:
    """model.attention / model.attention_block as the encoders' `attention` attribute."""
    return AttentionSettings(s.model.attention, int(s.model.attention_block))


def with_rope_scaling(encoder: Any, rope_scaling: str) -> Any:
    """The encoder config with model.rope_scaling applied ("" keeps the checkpoint's)."""
    if not rope_scaling:
        return encoder
    if encoder.model_type not in ("qwen2", "qwen3"):
        raise UserError(
            f"config field model.rope_scaling={rope_scaling!r} applies to Qwen2/Qwen3 students "
            "only; "
            f"this student is {encoder.model_type!r}: set it to ''"
        )
    return dataclasses.replace(encoder, rope_scaling=RopeScaling.parse(rope_scaling))


def student_config(s: Settings, loaded: LoadedModel, teacher_dim: int):
    heads = tuple(int(d) for d in s.model.heads)
    if teacher_dim not in heads:
        raise UserError(
            f"config field model.heads {heads} has no head of the teacher dim {teacher_dim}: "
            "the config and the teacher data disagree (wrong teachers or heads)"
        )
    return EmbedderConfig(
        encoder=with_rope_scaling(loaded.config.encoder, s.model.rope_scaling),
        pooling=s.model.pooling,
        heads=heads,
        default_head=head_name(teacher_dim),
        normalize_pooled=bool(s.model.normalize_pooled),
    )


@dataclasses.dataclass
class TextTask:
    """Stages 1-3: texts in, student head vectors vs concatenated teacher vectors."""

    config: EmbedderConfig
    loaded: LoadedModel
    teacher_dim: int
    model: nn.Module
    batch_keys: tuple[str, ...] = ("input_ids", "attention_mask", "teacher")
    pairs: bool = False  # the train data is a pair dataset (query, positive, negatives)
    learn_temperature: bool = False
    initial_temperature: float = 0.05

    @classmethod
    def from_settings(cls, s: Settings) -> TextTask:
        if not s.data.train_dir:
            raise UserError("config field data.train_dir is empty: point it at a teacher dataset")
        teacher_dim = teacher_dim_of(s.data.train_dir)
        metadata = open_teacher_dataset(s.data.train_dir)[1]
        pairs = check_pair_settings(s, metadata)
        if s.data.max_chunks:
            require_chunks(metadata, s.data.train_dir)
        loaded = load_model(resolve_model_folder(s.model.init_hf))
        config = student_config(s, loaded, teacher_dim)
        model = Embedder(
            config, dtype=jnp.dtype(s.dtype), remat=s.model.remat, attention=attention_settings(s)
        )
        keys = cls.batch_keys
        if s.data.max_chunks:
            keys = (*keys, "chunk_spans", "chunk_mask", "chunk_teacher")
        learn = pairs and s.loss.learn_temperature and s.loss.infonce > 0
        return cls(
            config, loaded, teacher_dim, model, keys, pairs, learn, s.loss.infonce_temperature
        )

    @property
    def folder(self) -> Path:
        return self.loaded.folder

    def init(self, rng: jax.Array) -> Any:
        params = init_params(self.config, rng)
        if self.learn_temperature:  # log-parametrised: exp keeps it positive
            log_t = jnp.log(jnp.asarray(self.initial_temperature, jnp.float32))
            params = {**params, LOSS_PARAMS: {LOG_TEMPERATURE: log_t}}
        return params

    def pretrained(self) -> tuple[dict, str]:
        return {"encoder": self.loaded.params["encoder"]}, f"HF weights {self.folder}"

    def describe(self, s: Settings) -> dict:
        """What `model.json` records so the checkpoint can be used without the config."""
        _, meta = open_teacher_dataset(s.data.train_dir)
        return {
            "embedder": embedder_config_to_dict(self.config),
            "tokenizer_folder": str(Path(self.folder).resolve()),
            "max_seq_length": int(s.data.max_length),
            "prompts": student_prompts(s),
            "teachers": meta.get("teachers", []),
            "stage": s.stage,
            "config": s.name,
            "mrl_dims": list(s.loss.mrl_dims),  # the export's Matryoshka metadata
        }

    def identity(self) -> dict:
        return {
            "student": self.config.encoder.model_type,
            "hidden": self.config.hidden_size,
            "teacher_dim": self.teacher_dim,
        }

    def pipeline(self, s: Settings):
        common = dict(
            batch_size=s.data.batch_size,
            max_length=s.data.max_length,
            seed=s.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            worker_count=s.data.worker_count,
            length_groups=s.data.length_groups,
            pad_multiple=s.data.pad_multiple,
        )
        if self.pairs:
            return make_pair_pipeline(
                s.data.train_dir,
                self.folder,
                negatives=s.data.negatives,
                query_prompt=s.data.query_prompt,
                document_prompt=s.data.document_prompt,
                **common,
            )
        return make_text_pipeline(
            s.data.train_dir,
            self.folder,
            prompt=s.data.document_prompt or None,
            max_chunks=s.data.max_chunks,
            **common,
        )

    def loaded_model(self, s: Settings, params: Any) -> LoadedModel:
        """The student with `params`, usable by `TextEncoder` and evaluators."""
        prompts = {k: v for k, v in student_prompts(s).items() if v}
        default = "document" if prompts.get("document") else None
        model_params = {k: v for k, v in params.items() if k != LOSS_PARAMS}
        return LoadedModel(
            self.config, model_params, self.folder, s.data.max_length, prompts, default
        )

    def head_features(self, params: Any, batch: dict) -> jax.Array:
        """[B, hidden] float32: what the heads read for this batch (no dropout)."""
        model_params = {k: v for k, v in params.items() if k != LOSS_PARAMS}
        return self.model.apply(
            {"params": model_params},
            batch["input_ids"],
            batch["attention_mask"],
            heads=(HEAD_INPUT,),
        )[HEAD_INPUT]

    def forward(self, s: Settings):
        if self.pairs:
            return pair_forward(
                self.model, self.config.head_names, s.model.dropout, self.learn_temperature
            )
        return text_forward(
            self.model, self.config.head_names, s.model.dropout, chunks=s.data.max_chunks > 0
        )

    def evaluate(self, s: Settings, params, mesh) -> dict[str, dict[str, float]]:
        """Held-out fidelity per head: cosine to teacher (full head), pairwise Spearman, NN
        recall@10 of the teacher's neighbours."""
        if not s.data.eval_dir:
            return {}
        texts, teacher, _ = load_eval_arrays(s.data.eval_dir, limit=s.data.eval_texts)
        if teacher.shape[1] != self.teacher_dim:
            raise UserError(
                f"eval data {s.data.eval_dir} has teacher dim {teacher.shape[1]} but the train "
                f"data has {self.teacher_dim}; build both with the same teachers"
            )
        model = self.loaded_model(s, params)
        encoder = TextEncoder(
            model,
            dtype=s.dtype,
            mesh=mesh,
            batch_size=s.data.batch_size,
            attention=attention_settings(s),
        )
        vectors = encoder.encode_heads(
            texts, heads=self.config.head_names, prompt=s.data.document_prompt or None
        )
        scores = {name: fidelity_metrics(v, teacher) for name, v in vectors.items()}
        if s.data.max_chunks:
            scores.update(_chunk_fidelity(s, encoder, self.config.head_names))
        return scores


def student_prompts(s: Settings) -> dict[str, str]:
    """The student's prompt per role, as exported (sentence-transformers `prompts`)."""
    return {"query": s.data.query_prompt, "document": s.data.document_prompt}


def check_pair_settings(s: Settings, metadata: dict) -> bool:
    """Whether the train data is a pair dataset; raises UserError for settings it cannot
    serve (InfoNCE without pairs, more negatives than stored, chunks with pairs)."""
    pairs = pair_width(metadata) is not None
    if s.loss.infonce > 0 and not pairs:
        raise UserError(
            f"config field loss.infonce={s.loss.infonce} needs pair data, but data.train_dir "
            f"{s.data.train_dir!r} holds single texts; fix: build it with `jasper-jax teachers "
            "--pairs SPEC`, or set loss.infonce=0"
        )
    if pairs and s.data.max_chunks:
        raise UserError(
            f"config field data.max_chunks={s.data.max_chunks}: chunk alignment needs a "
            "document dataset, but data.train_dir is a pair dataset; fix: set data.max_chunks=0"
        )
    if pairs:
        used_negatives(metadata, s.data.negatives, s.data.train_dir)
    return pairs


def _chunk_fidelity(s: Settings, encoder, heads: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Held-out fidelity of the chunk vectors of one pass over each document, per head
    ("chunks/<head>"), against each chunk's own teacher vector."""
    documents, spans, teacher = load_eval_chunks(s.data.eval_dir, limit=s.data.eval_texts)
    result = ChunkEncoder(encoder).encode(
        documents,
        spans=spans,
        heads=heads,
        prompt=s.data.document_prompt or None,
        max_length=s.data.max_length,
    )
    kept = teacher[result.source]  # chunks cut by max_length are left out of both sides
    return {f"chunks/{h}": fidelity_metrics(result.chunks[h], kept) for h in heads}
