"""The demo's long-document step: chunk alignment on documents of consecutive corpus texts.

1. teacher data in chunk mode: train documents (consecutive train-split texts, 64-250 student
   tokens, cut into sentence chunks of <= 32 tokens) and the held-out retrieval task's documents
   (runs of held-out WordNet definitions, same chunking), each document and each chunk encoded
   by both teachers (`workdir/data/long_{train,validation}`);
2. `workdir/stage3_long`: stage 3 continued from `workdir/stage3` in chunk mode
   (`configs/embedded_default.py:long`);
3. tables: held-out long-document retrieval (example -> document holding its definition),
   document vector vs best chunk, for the teacher target (chunks encoded on their own) and for
   the student before and after chunk alignment (chunks from one pass over the document); and
   held-out fidelity to the teacher of document and chunk vectors, before and after.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer

from jasper_jax import sharding
from jasper_jax.config import load_settings
from jasper_jax.data.chunking import documents_from_texts, plain_tokenizer
from jasper_jax.data.corpus import load_corpus
from jasper_jax.data.eval_records import sorted_records
from jasper_jax.data.teacher_assets import resolve_model_folder
from jasper_jax.data.teacher_dataset import build_teacher_dataset
from jasper_jax.errors import UserError
from jasper_jax.evaluation.long_documents import (
    format_rows,
    long_document_task,
    student_rows,
    teacher_rows,
)
from jasper_jax.evaluation.models import teacher_model
from jasper_jax.evaluation.runner import combined_target
from jasper_jax.evaluation.teacher_cache import default_cache_dir
from jasper_jax.run_folder import load_any_model, load_params
from jasper_jax.settings import Settings
from jasper_jax.train.loop import train_and_evaluate
from jasper_jax.train.task import make_task
from jasper_jax.vectors import unit_rows

log = logging.getLogger("jasper_jax.demo")
CONFIG = "configs/embedded_default.py:long"
QUICK = {
    "data.train_documents": 48,
    "data.eval_texts": 16,
    "data.batch_size": 8,
    "data.max_length": 128,
    "data.document_tokens": (32, 120),
    "data.chunking": "sentences:24",
    "train.steps": 4,
    "train.log_every": 2,
    "train.checkpoint_every": 2,
}


def long_settings(workdir: Path, quick: bool, **overrides: Any) -> Settings:
    fields = {
        **(QUICK if quick else {}),
        "init_from": workdir / "stage3",
        "data.train_dir": workdir / "data" / "long_train",
        "data.eval_dir": workdir / "data" / "long_validation",
        **overrides,
    }
    return load_settings(CONFIG, fields)


def train_documents(s: Settings) -> list[str]:
    """The long train documents: consecutive train-split texts, `data.document_tokens` student
    tokens each (seeded by `s.seed`)."""
    backend = plain_tokenizer(student_tokenizer(s))
    count = lambda text: len(backend.encode(text, add_special_tokens=False).ids)
    low, high = s.data.document_tokens
    texts = load_corpus(s.data.corpus, split="train")
    # Enough texts for the documents wanted: ~1.5 tokens of budget per corpus token on average.
    wanted = int(s.data.train_documents * (low + high) / 2 / 12)
    documents = documents_from_texts(texts[:wanted], count, low, high, seed=s.seed)
    return documents[: s.data.train_documents]


def build_long_data(s: Settings, task) -> None:
    """Chunk-mode teacher datasets: train documents (cut by `data.chunking`) and the retrieval
    task's documents (cut by the task's spans)."""
    folder = resolve_model_folder(s.model.init_hf)
    # Resumable blocks of one teacher batch (64) of documents: a long document and its chunks
    # cost as much as ~50 short texts.
    common = dict(max_length=s.data.max_length, chunk_tokenizer=folder, chunk_size=64)
    documents = train_documents(s)
    log.info("teacher vectors for %d long train documents and their chunks", len(documents))
    build_teacher_dataset(
        documents, list(s.teachers), s.data.train_dir, chunking=s.data.chunking, **common
    )
    log.info("teacher vectors for %d held-out long documents", len(task.documents))
    build_teacher_dataset(
        task.documents, list(s.teachers), s.data.eval_dir, chunk_spans=task.spans, **common
    )


def student_tokenizer(s: Settings):
    """The student's HF tokenizer (document lengths and chunk sizes are counted in its tokens)."""
    return AutoTokenizer.from_pretrained(str(resolve_model_folder(s.model.init_hf)))


def retrieval_rows(s: Settings, task, workdir: Path) -> dict[str, dict]:
    """Teacher target, stage-3 student, chunk-aligned student: document vector vs best chunk."""
    records = sorted_records(s.data.eval_dir)
    documents = unit_rows(np.stack([r["teacher"] for r in records]))
    chunks = unit_rows(np.concatenate([r["chunk_teacher"] for r in records]))
    teachers = [teacher_model(t, cache_dir=default_cache_dir()) for t in s.teachers]

    def encode_queries(queries):
        return combined_target([t.encode(queries)[t.default_output] for t in teachers])

    rows = {"teacher target": teacher_rows(encode_queries, documents, chunks, task)}
    for label, folder in (
        ("student, stage 3", "stage3"),
        ("student, chunk-aligned", "stage3_long"),
    ):
        rows[label] = student_rows(load_any_model(workdir / folder), task)
    return rows


def fidelity_before(s: Settings, workdir: Path) -> dict[str, dict[str, float]]:
    """The stage-3 student's held-out document and chunk fidelity (what chunk alignment starts
    from), measured exactly as the chunk-aligned stage's own evaluation."""
    return heldout_fidelity(s, workdir / "stage3")


def heldout_fidelity(s: Settings, run: Path) -> dict[str, dict[str, float]]:
    """Held-out document and chunk fidelity (`c`'s eval data) of the run's latest checkpoint."""
    params, _ = load_params(run)
    return make_task(s).evaluate(s, params, sharding.make_mesh(tuple(s.mesh_shape)))


def format_fidelity(before: dict, after: dict, head: str) -> str:
    """Markdown: held-out cosine / Spearman to the teacher, documents and chunks, before/after."""
    lines = [
        f"| student ({head}) | document cosine | document Spearman | chunk cosine "
        "| chunk Spearman |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, scores in (("stage 3", before), ("chunk-aligned", after)):
        doc, chunk = scores[head], scores[f"chunks/{head}"]
        lines.append(
            f"| {label} | {doc['cosine']:.4f} | {doc['spearman']:.4f} | {chunk['cosine']:.4f} | "
            f"{chunk['spearman']:.4f} |"
        )
    return "\n".join(lines)


def run_long_documents(workdir: Path, quick: bool) -> dict:
    """Builds the data, trains `workdir/stage3_long`, evaluates; returns the result with a
    markdown "table" and "seconds"."""
    workdir = Path(workdir)
    s = long_settings(workdir, quick)
    low, high = s.data.document_tokens
    task = long_document_task(
        student_tokenizer(s),
        min_tokens=low,
        max_tokens=high,
        max_documents=s.data.eval_texts,
        max_queries=100 if quick else 400,
        chunking=s.data.chunking,
        seed=s.seed,
    )
    start = time.perf_counter()
    build_long_data(s, task)
    data_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = train_and_evaluate(s, workdir / "stage3_long")
    train_seconds = time.perf_counter() - start
    if result["status"] != "finished":
        raise UserError(f"long-document stage stopped ({result['status']}); re-run to resume")
    rows = retrieval_rows(s, task, workdir)
    before = fidelity_before(s, workdir)
    fidelity = format_fidelity(before, result["eval"], f"dense_{max(s.model.heads)}")
    header = (
        f"Long documents: {len(task.queries)} held-out queries, {len(task.documents)} documents "
        f"of {low}-{high} tokens, chunks {s.data.chunking}"
    )
    return {
        **result,
        "retrieval": rows,
        "eval_before": before,
        "seconds": {"data": data_seconds, "train_and_eval": train_seconds},
        "table": header + "\n\n" + format_rows(rows) + "\n\n" + fidelity,
    }
