"""`jasper-jax eval`: one student against its teachers, written as eval.json, eval.md, quality.png.

Held-out texts come from a teacher dataset (`--data DIR`, its stored target vectors) or from
the bundled corpus's validation split (the target is then computed here from the teachers, as
training builds it: each teacher's unit vectors, concatenated, normalised again).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from jasper_jax.data.corpus import load_corpus
from jasper_jax.data.eval_records import load_eval_arrays
from jasper_jax.errors import UserError
from jasper_jax.evaluation import retrieval
from jasper_jax.evaluation.models import EvalModel, student_model, teacher_model
from jasper_jax.evaluation.report import markdown_report, plot_quality
from jasper_jax.evaluation.robustness import Encoded, robustness_rows
from jasper_jax.evaluation.teacher_cache import resolve_cache_dir
from jasper_jax.paths import write_text_atomic
from jasper_jax.run_folder import is_workdir, read_model_json
from jasper_jax.vectors import unit_rows

log = logging.getLogger(__name__)
DEFAULT_TEACHERS = ("all-mpnet-base-v2", "all-MiniLM-L6-v2")  # the embedded default's order
EMBEDDED_DATA = "embedded"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """Sizes of the evaluation (all counts of texts)."""

    data: str = EMBEDDED_DATA
    texts: int = 1000
    queries: int = 1000
    documents: int | None = None
    speed_texts: int = 256
    batch_size: int = 64
    teacher_cache: str | None = None  # folder, "off", or None: the default (teacher_cache.py)


def heldout_texts(settings: EvalSettings) -> tuple[list[str], np.ndarray | None, str]:
    """(texts, stored target [N, T] or None, description) for the fidelity part."""
    if settings.data == EMBEDDED_DATA:
        texts = load_corpus("embedded", split="validation")[: settings.texts]
        return texts, None, "bundled corpus, validation split"
    texts, target, _ = load_eval_arrays(settings.data, limit=settings.texts)
    return texts, target, f"teacher dataset {settings.data}"


def combined_target(per_teacher: Sequence[np.ndarray]) -> np.ndarray:
    """[N, sum d_k]: unit teacher rows concatenated and normalised again (SPEC 1)."""
    return unit_rows(np.concatenate(per_teacher, axis=1))


def encode_all(
    model: EvalModel, texts: list[str], task: retrieval.RetrievalTask
) -> dict[str, Encoded]:
    """Every output of `model` on held-out texts, prompted queries, and documents (held-out
    texts and documents with the model's document prompt)."""
    held = model.encode(texts, prompt=model.document_prompt)
    queries = model.encode(task.queries, prompt=model.query_prompt)
    docs = model.encode(task.documents, prompt=model.document_prompt)
    return {name: Encoded(held[name], queries[name], docs[name]) for name in model.outputs}


def teacher_specs(model_path: Path, teachers: Sequence[str] | None) -> list[str]:
    """--teachers, else the teachers a workdir's model.json records, else the embedded pair."""
    if teachers:
        return list(teachers)
    if is_workdir(model_path):
        recorded = read_model_json(model_path).get("teachers") or []
        names = [t.get("name") if isinstance(t, dict) else str(t) for t in recorded]
        if names and all(names):
            return names
    return list(DEFAULT_TEACHERS)


def _model_result(model: EvalModel, encoded: dict[str, Encoded], target, task, speed) -> dict:
    return {
        "name": model.name,
        "kind": model.kind,
        "source": model.source,
        "default_output": model.default_output,
        "query_prompt": model.query_prompt,
        "document_prompt": model.document_prompt,
        "parameters": model.parameters,
        "texts_per_second": speed,
        "rows": robustness_rows(encoded, target, task.relevant),
    }


def evaluate(
    model_path: str | Path,
    *,
    teachers: Sequence[str] | None = None,
    settings: EvalSettings = EvalSettings(),
) -> dict:
    """Scores the student at `model_path` and each teacher; returns the JSON-ready result."""
    model_path = Path(model_path)
    student = student_model(model_path, batch_size=settings.batch_size)  # fail fast on bad input
    specs = teacher_specs(model_path, teachers)
    texts, stored_target, source = heldout_texts(settings)
    task = retrieval.wordnet_task(settings.queries, settings.documents)
    speed_texts = texts[: settings.speed_texts]
    cache_dir = resolve_cache_dir(settings.teacher_cache)
    if cache_dir is not None:
        log.info("teacher encodings are cached in %s (--teacher-cache off to disable)", cache_dir)
    models = [teacher_model(s, settings.batch_size, cache_dir) for s in specs]
    encoded = []
    for m in models:
        log.info("encoding with teacher %s", m.name)
        encoded.append(encode_all(m, texts, task))
    target = stored_target
    if target is None:
        target = combined_target(
            [e[m.default_output].heldout for m, e in zip(models, encoded, strict=True)]
        )
    log.info("encoding with the student %s", model_path)
    models.insert(0, student)
    encoded.insert(0, encode_all(student, texts, task))
    results = []
    for m, enc in zip(models, encoded, strict=True):
        speed = m.texts_per_second(speed_texts)
        results.append(_model_result(m, enc, target, task, speed))
    return {
        "task": {"name": task.name, "queries": len(task.queries), "documents": len(task.documents)},
        "heldout": {
            "texts": len(texts),
            "source": source,
            "target_dim": int(target.shape[1]),
            "teachers": [m.name for m in models[1:]],
        },
        "speed_texts": len(speed_texts),
        "batch_size": settings.batch_size,
        "device": f"{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} CPU cores",
        "models": results,
    }


def default_output_dir(model_path: Path) -> Path:
    """WORKDIR/eval for a workdir (where `export` looks for it); FOLDER-eval beside a folder."""
    model_path = Path(model_path)
    if is_workdir(model_path):
        return model_path / "eval"
    return model_path.parent / f"{model_path.name}-eval"


def write_results(result: dict, output: Path) -> dict[str, Path]:
    """eval.json, eval.md and quality.png in `output`; returns their paths."""
    output.mkdir(parents=True, exist_ok=True)
    paths = {k: output / n for k, n in (("json", "eval.json"), ("md", "eval.md"))}
    write_text_atomic(paths["json"], json.dumps(result, indent=2) + "\n")
    write_text_atomic(paths["md"], markdown_report(result) + "\n")
    paths["png"] = output / "quality.png"
    tmp = output / f".quality.tmp-{os.getpid()}.png"
    try:
        plot_quality(result, tmp)
        os.replace(tmp, paths["png"])
    except BaseException:  # e.g. disk full: no half-written plot left behind
        tmp.unlink(missing_ok=True)
        raise
    return paths


def check_settings(settings: EvalSettings) -> None:
    """Refuses counts below what the scores need, naming the flag."""
    for field in ("texts", "queries", "speed_texts", "batch_size"):
        if getattr(settings, field) < 1:
            raise UserError(f"--{field.replace('_', '-')} must be at least 1")
    if settings.texts < 11:
        raise UserError("--texts must be at least 11 (neighbour recall@10 needs 10 neighbours)")
