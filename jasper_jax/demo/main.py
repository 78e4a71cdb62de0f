"""The main demo (`jasper-jax demo`): the embedded default end to end, then a table of what
each stage bought.

1. teacher vectors (all-mpnet-base-v2 + all-MiniLM-L6-v2 -> 1152-d) for a train slice and the
   held-out split of the bundled corpus;
2. stages 1-3, each starting from the previous stage's last checkpoint;
3. the long-document step (chunk alignment on documents of consecutive texts; see
   `jasper_jax.demo.long_documents`) and stage 4 (vision);
4. a table and a picture (`demo_results.{md,png}`): for each teacher, the target, the initial
   student, the start of each stage that fits new heads in closed form, and the end of each
   stage, every head: held-out cosine to the target, Spearman of pairwise similarities, and
   held-out WordNet retrieval (nDCG@10, R@1), all from one teacher pass over the held-out set.

Re-running the same command resumes: finished datasets and stages are kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from jasper_jax.config import load_settings
from jasper_jax.data.corpus import load_corpus
from jasper_jax.data.eval_records import sorted_records
from jasper_jax.data.pair_dataset import build_pair_dataset
from jasper_jax.data.pairs import read_pairs
from jasper_jax.data.teacher_assets import resolve_model_folder
from jasper_jax.data.teacher_dataset import build_teacher_dataset, open_teacher_dataset
from jasper_jax.demo.long_documents import run_long_documents
from jasper_jax.demo.vision import run_stage4
from jasper_jax.encode import TextEncoder
from jasper_jax.errors import UserError
from jasper_jax.evaluation.heldout import HeldOut, encode_heldout, heldout_texts
from jasper_jax.evaluation.learning_table import Row, markdown_table, plot_learning
from jasper_jax.evaluation.retrieval import RetrievalTask, wordnet_task
from jasper_jax.models.embedder import POOLED
from jasper_jax.paths import write_json_atomic, write_text_atomic
from jasper_jax.run_folder import load_any_model
from jasper_jax.settings import Settings
from jasper_jax.train.loop import train_and_evaluate

log = logging.getLogger("jasper_jax.demo")
CONFIG = "configs/embedded_default.py"
PAIRS_NEGATIVES = 1  # hard negatives per WordNet pair (a neighbouring synset's definition)
QUICK = {
    "data.train_texts": 256,
    "data.train_pairs": 128,
    "data.eval_texts": 128,
    "data.batch_size": 16,
    "data.max_length": 32,
    "train.steps": 6,
    "train.log_every": 3,
    "train.checkpoint_every": 3,
}


# `--large`: 3x the train texts and 4x the steps of the default, for a student that learns more
# than a few minutes allow; 50 minutes on a loaded 2-core CPU before length-grouped batches
# halved the step time (README, "The larger run").
LARGE = {
    "data.train_texts": 36000,
    "data.train_pairs": 12000,
    "train.checkpoint_every": 200,
}
LARGE_STEPS = {1: 0, 2: 400, 3: 900}
# The held-out retrieval task scored at every stage (queries, documents): the eval's default
# task, so the demo's figures compare with `jasper-jax eval`.
RETRIEVAL = {"full": (1000, None), "quick": (64, 256)}


# The recipe each text stage runs (embedded_default's get_config argument): stage 3 trains on
# pairs with distillation + InfoNCE, which beat distillation alone (README).
RECIPES = {1: "1", 2: "2", 3: "pairs"}


def stage_settings(stage: int | str, overrides: dict[str, Any]) -> Settings:
    """The embedded default's stage (or named recipe) with the demo's overrides (field name ->
    value)."""
    return load_settings(f"{CONFIG}:{stage}", overrides)


def retrieval_task(quick: bool) -> RetrievalTask:
    queries, documents = RETRIEVAL["quick" if quick else "full"]
    return wordnet_task(queries, documents)


def spread_sample(texts: list[str], n: int) -> list[str]:
    """`n` texts evenly spaced over `texts` (all of them when n >= len): the bundled corpus is
    ordered by part of speech and synset, so its first n texts are all nouns of one branch of
    WordNet (the first 12,000: organisms and objects), a slice unlike the held-out set that a
    student trained on it drifts towards."""
    if n >= len(texts):
        return list(texts)
    return [texts[i] for i in np.linspace(0, len(texts) - 1, n).round().astype(int)]


def build_teacher_data(workdir: Path, s: Settings, task: RetrievalTask) -> dict[str, Path]:
    """Teacher datasets (kept if already built): "train", `data.train_texts` train texts spread
    over the train split; "pairs", `data.train_pairs` WordNet train pairs (usage example,
    definition, one neighbouring definition) spread the same way; "validation", the held-out
    set: `data.eval_texts` texts spread over the held-out split, then every text of `task`."""
    out = {"pairs": workdir / "data" / "pairs"}
    pairs = read_pairs(s.data.corpus, split="train", negatives=PAIRS_NEGATIVES)
    log.info("teacher vectors for %d train pairs with %s", s.data.train_pairs, list(s.teachers))
    build_pair_dataset(pairs.spread(s.data.train_pairs), list(s.teachers), out["pairs"])
    validation = spread_sample(load_corpus(s.data.corpus, split="validation"), s.data.eval_texts)
    texts = {
        "train": spread_sample(load_corpus(s.data.corpus, split="train"), s.data.train_texts),
        "validation": heldout_texts(validation, task),
    }
    for split, rows in texts.items():
        log.info("teacher vectors for %d %s texts with %s", len(rows), split, list(s.teachers))
        out[split] = workdir / "data" / split
        build_teacher_dataset(rows, list(s.teachers), out[split])
    return out


def load_heldout(eval_dir: Path, s: Settings, task: RetrievalTask) -> HeldOut:
    """The held-out set (fidelity rows first, then the retrieval texts) with its teachers."""
    records = sorted_records(eval_dir)
    texts = [r["text"].decode("utf-8") for r in records]
    stored = np.stack([r["teacher"] for r in records]).astype(np.float32)
    teachers = [(t["name"], int(t["dim"])) for t in open_teacher_dataset(eval_dir)[1]["teachers"]]
    return HeldOut.build(texts, stored, teachers, s.data.eval_texts, task)


def student_evaluator(heldout: HeldOut, s: Settings):
    """`(model, mesh) -> {output: scores}`: every head (and, for a model without heads, the
    pooled vector) on every held-out text, encoded once."""

    def evaluate(model, mesh=None) -> dict[str, dict[str, float]]:
        encoder = TextEncoder(model, mesh=mesh, batch_size=s.data.batch_size, dtype=s.dtype)
        heads = model.config.head_names or (POOLED,)
        vectors = encode_heldout(encoder, heldout, heads, s.data.max_length)
        return {name: heldout.score(v) for name, v in vectors.items()}

    return evaluate


def initial_scores(s: Settings, evaluate) -> dict[str, dict[str, float]]:
    """The untrained student's own pooled vectors: the starting point."""
    return evaluate(load_any_model(resolve_model_folder(s.model.init_hf)))


def run_text_stages(
    workdir: Path, overrides: dict[str, Any], evaluate, steps=None, pairs: Path | None = None
) -> list[dict]:
    """Stages 1-3 (`RECIPES`; stage 3 on the `pairs` teacher dataset), each from the previous
    one's checkpoint; held-out scores at the start of each stage (closed-form heads included)
    and at its end, kept in `stageN/heldout.json` so that a resumed demo still has the start
    of a finished stage."""
    rows, previous = [], ""
    for stage in (1, 2, 3):
        stage_dir = workdir / f"stage{stage}"
        extra = {"train.steps": steps[stage]} if steps else {}
        if RECIPES[stage] == "pairs":
            extra["data.train_dir"] = str(pairs)
        s = stage_settings(RECIPES[stage], {**overrides, **extra, "init_from": previous})
        start = time.perf_counter()
        result = train_and_evaluate(s, stage_dir, evaluator=evaluate)
        if result["status"] != "finished":
            raise UserError(f"stage {stage} stopped ({result['status']}); re-run to resume")
        saved = stage_dir / "heldout.json"
        kept = json.loads(saved.read_text()) if saved.is_file() else {}
        start_scores = result.get("start_scores", kept.get("start_scores"))
        write_json_atomic(saved, {"start_scores": start_scores, "scores": result["scores"]})
        rows.append(
            {
                "stage": stage,
                "seconds": time.perf_counter() - start,
                **result,
                "start_scores": start_scores,
            }
        )
        previous = str(stage_dir)
    return rows


def learning_rows(heldout, initial: dict, stages: list[dict]) -> list[Row]:
    """Teachers and target, the initial student, then each stage's start (when it fitted new
    heads in closed form) and end, every head."""
    rows = [
        Row(name, "embedding", s, reference=True) for name, s in heldout.teacher_scores().items()
    ]
    rows += [Row("start (init, no head)", out, s) for out, s in initial.items()]
    for r in stages:
        label = f"stage {r['stage']}"
        fresh = set(r["scores"]) - {row.output for row in rows if not row.reference}
        if r["step"] == 0:
            label += " (closed-form heads, 0 steps)"
        elif r.get("start_scores") and fresh:
            for out in sorted(fresh, key=_head_order):
                rows.append(Row(f"{label} start (closed form)", out, r["start_scores"][out]))
        for out, s in sorted(r["scores"].items(), key=lambda kv: _head_order(kv[0])):
            rows.append(Row(label, out, s))
    return rows


def _head_order(name: str) -> int:
    return -int(name.removeprefix("dense_")) if name.startswith("dense_") else 0


def run_demo(workdir: Path, quick: bool, large: bool, long: bool, vision: bool) -> int:
    """The whole demo in `workdir` (locked for its duration by the caller); prints the tables."""
    overrides: dict[str, Any] = dict(QUICK) if quick else {}
    if large:
        overrides.update(LARGE)
    base = stage_settings(1, overrides)
    task = retrieval_task(quick)
    start = time.perf_counter()
    data = build_teacher_data(workdir, base, task)
    eval_dir = data["validation"]
    overrides.update({"data.train_dir": str(data["train"]), "data.eval_dir": str(eval_dir)})
    teacher_seconds = time.perf_counter() - start
    heldout = load_heldout(eval_dir, base, task)
    evaluate = student_evaluator(heldout, base)
    initial = initial_scores(base, evaluate)
    rows = run_text_stages(
        workdir, overrides, evaluate, LARGE_STEPS if large else None, data["pairs"]
    )
    text_seconds = time.perf_counter() - start - teacher_seconds
    learning = learning_rows(heldout, initial, rows)
    plot = plot_learning(learning, workdir / "demo_results.png", "held-out scores over the stages")
    long_documents = run_long_documents(workdir, quick=quick) if long else None
    stage4 = run_stage4(workdir, workdir / "stage3", quick=quick) if vision else None
    summary = {
        "teacher_seconds": teacher_seconds,
        "text_stage_seconds": text_seconds,
        "total_seconds": time.perf_counter() - start,
        "table": [dataclasses.asdict(r) for r in learning],
        "stages": [{k: v for k, v in r.items() if k != "state"} for r in rows],
        "vision": stage4,
        "long_documents": long_documents,
    }
    _report(workdir, summary, markdown_table(learning), plot)
    return 0


def _report(workdir: Path, summary: dict, table: str, plot: Path) -> None:
    """Writes demo_results.{json,md} and prints the tables and where things are."""
    write_json_atomic(workdir / "demo_results.json", json.loads(json.dumps(summary, default=str)))
    parts = [summary[k] for k in ("long_documents", "vision") if summary[k]]
    extra = [part["table"] for part in parts if "table" in part]
    write_text_atomic(workdir / "demo_results.md", "\n\n".join([table, *extra]) + "\n")
    print("\n" + table)
    for part in parts:
        print("\n" + part.get("table", json.dumps(part, indent=2, default=str)))
    print(
        f"\nteacher vectors {summary['teacher_seconds']:.0f} s; stages 1-3 "
        f"{summary['text_stage_seconds']:.0f} s; total {summary['total_seconds']:.0f} s"
    )
    print(
        f"results in {workdir}/demo_results.md, picture {plot}; export: jasper-jax export "
        f"--workdir {workdir}/stage3 --output {workdir}/export"
    )
