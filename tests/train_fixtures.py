"""Shared by the engine tests: a tiny BERT student folder and tiny teacher datasets."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from ml_collections import ConfigDict

from jasper_jax.config import load_config, to_settings
from jasper_jax.settings import Settings

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def make_tiny_student(folder: Path, layers: int = 4) -> Path:
    """A random 4-layer, 32-wide BERT saved as an HF folder with MiniLM's tokenizer."""
    import torch
    import transformers

    from jasper_jax.data.teacher_assets import teacher_folder

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    transformers.BertModel(cfg).save_pretrained(folder)
    minilm = teacher_folder("all-MiniLM-L6-v2")
    for name in TOKENIZER_FILES:
        shutil.copy(minilm / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory) -> dict:
    """{"student": folder, "train": teacher dataset (192 texts), "eval": (64 texts)}; 384-d."""
    from jasper_jax.data.corpus import load_corpus
    from jasper_jax.data.teacher_dataset import build_teacher_dataset

    root = tmp_path_factory.mktemp("tiny")
    out = {"student": make_tiny_student(root / "student")}
    for split, n in (("train", 192), ("validation", 64)):
        texts = load_corpus("embedded", split=split)[:n]
        out[split] = root / split
        build_teacher_dataset(texts, ["all-MiniLM-L6-v2"], out[split], progress=False)
    return out


def tiny_fields(setup: dict, stage: int, **overrides) -> dict:
    """Config fields (name -> value) shrinking the embedded default to the tiny student."""
    return {
        "model.init_hf": str(setup["student"]),
        "model.heads": (384,) if stage < 3 else (384, 32, 16),
        "model.trainable_last_layers": 2,
        "data.train_dir": str(setup["train"]),
        "data.eval_dir": str(setup["validation"]),
        "data.batch_size": 8,
        "data.max_length": 16,
        "data.eval_texts": 64,
        "train.steps": 3,
        "train.log_every": 1,
        "train.checkpoint_every": 100,
        "mesh_shape": (1, 1, 1),
        **overrides,
    }


def tiny_overrides(setup: dict, stage: int, **overrides) -> list[str]:
    """The same fields as `jasper-jax train` command-line overrides (`--config.a.b=v`)."""
    return [f"--config.{k}={v}" for k, v in tiny_fields(setup, stage, **overrides).items()]


def tiny_config(setup: dict, stage: int, **overrides) -> ConfigDict:
    """embedded_default stage config shrunk to the tiny student; overrides as field=value."""
    return load_config(
        f"configs/embedded_default.py:{stage}", tiny_fields(setup, stage, **overrides)
    )


def tiny_settings(setup: dict, stage: int, **overrides) -> Settings:
    """`tiny_config` as the typed settings the train loop takes."""
    return to_settings(tiny_config(setup, stage, **overrides))


def read_metrics(workdir: Path) -> list[dict]:
    """The per-step train records of a run's metrics.jsonl (eval records left out)."""
    lines = (Path(workdir) / "tb" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "train/loss" in r]


def sigterm_after_steps(workdir: Path, steps: int, timeout: float = 300.0) -> None:
    """Sends this process SIGTERM (a preemption) once `workdir`'s run has logged `steps` train
    steps, from a daemon thread; gives up after `timeout` seconds."""

    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline:
            path = Path(workdir) / "tb" / "metrics.jsonl"
            if path.exists() and len(read_metrics(workdir)) >= steps:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
