"""What a text stage needs before it trains: the student's architecture and HF weights, the
teacher dimension of the data (checked against the heads), the input pipeline, the forward."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import ml_collections

from jasper_jax.errors import UserError
from jasper_jax.models.embedder import Embedder, EmbedderConfig, head_name
from jasper_jax.models.loading import load_model


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


@dataclasses.dataclass
class StudentSetup:
    config: EmbedderConfig
    encoder_params: Any
    folder: Path
    teacher_dim: int

    def pipeline(self, c: ml_collections.ConfigDict):
        from jasper_jax.data.pipeline import make_text_pipeline

        return make_text_pipeline(
            c.data.train_dir,
            self.folder,
            batch_size=c.data.batch_size // jax.process_count(),
            max_length=c.data.max_length,
            seed=c.seed,
            prompt=c.data.prompt or None,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            worker_count=c.data.worker_count,
        )

    def forward(self, model: Embedder, c: ml_collections.ConfigDict):
        from jasper_jax.train.step import text_forward

        return text_forward(model, self.config.head_names, c.model.dropout)


def prepare_student(c: ml_collections.ConfigDict) -> StudentSetup:
    """Reads the student's HF folder and the teacher data; checks that the heads fit the data."""
    if not c.data.train_dir:
        raise UserError("config field data.train_dir is empty: point it at a teacher dataset")
    teacher_dim = teacher_dim_of(c.data.train_dir)
    heads = tuple(int(d) for d in c.model.heads)
    if teacher_dim not in heads:
        raise UserError(
            f"config field model.heads {heads} has no head of the teacher dim {teacher_dim} "
            f"of {c.data.train_dir}: the config and the data disagree (wrong teachers or heads)"
        )
    folder = resolve_model_folder(c.model.init_hf)
    loaded = load_model(folder)
    config = EmbedderConfig(
        encoder=loaded.config.encoder,
        pooling=c.model.pooling,
        heads=heads,
        default_head=head_name(teacher_dim),
    )
    return StudentSetup(config, loaded.params["encoder"], folder, teacher_dim)
