"""`jasper-jax demo`: the embedded default end to end, then a table of what each stage bought.

1. teacher vectors (all-mpnet-base-v2 + all-MiniLM-L6-v2 -> 1152-d) for a train slice and the
   held-out split of the bundled corpus;
2. stages 1-3, each starting from the previous stage's last checkpoint;
3. the long-document step (chunk alignment on documents of consecutive texts; see
   `jasper_jax.train.long_documents_demo`) and stage 4 (vision);
4. a table: per stage, held-out cosine to the teacher and Spearman correlation of pairwise
   similarities, for the full head and each reduced head.

Re-running the same command resumes: finished datasets and stages are kept.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from jasper_jax.errors import UserError

log = logging.getLogger("jasper_jax.demo")
CONFIG = "configs/embedded_default.py"
QUICK = {
    "data.train_texts": 256,
    "data.eval_texts": 128,
    "data.batch_size": 16,
    "data.max_length": 32,
    "train.steps": 6,
    "train.log_every": 3,
    "train.checkpoint_every": 3,
}


def add_demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="runs/demo", help="where data, checkpoints, results go")
    p.add_argument("--quick", action="store_true", help="a tiny budget for a smoke run (~2 min)")
    p.add_argument("--skip-vision", action="store_true", help="leave out stage 4 (images)")
    p.add_argument(
        "--skip-long", action="store_true", help="leave out the long-document (chunk) step"
    )


def _config(stage: int, overrides: dict[str, Any]):
    from jasper_jax.config import load_config

    return load_config(f"{CONFIG}:{stage}", [f"--config.{k}={v}" for k, v in overrides.items()])


def build_teacher_data(workdir: Path, c) -> tuple[Path, Path]:
    """Teacher datasets for the train slice and the held-out split (kept if already built)."""
    from jasper_jax.data.corpus import load_corpus
    from jasper_jax.data.teacher_dataset import build_teacher_dataset

    out = {}
    for split, limit in (("train", c.data.train_texts), ("validation", c.data.eval_texts)):
        texts = load_corpus(c.data.corpus, split=split)[:limit]
        log.info("teacher vectors for %d %s texts with %s", len(texts), split, list(c.teachers))
        out[split] = workdir / "data" / split
        build_teacher_dataset(texts, list(c.teachers), out[split])
    return out["train"], out["validation"]


def initial_scores(c, eval_dir: Path) -> dict[str, dict[str, float]]:
    """The untrained student's own pooled vectors vs the teachers: the starting point."""
    from jasper_jax.data.pipeline import load_eval_arrays
    from jasper_jax.encode import TextEncoder
    from jasper_jax.fidelity import fidelity_metrics
    from jasper_jax.train.setup import resolve_model_folder
    from jasper_jax.workdir import load_any_model

    texts, teacher, _ = load_eval_arrays(eval_dir, limit=c.data.eval_texts)
    model = load_any_model(resolve_model_folder(c.model.init_hf))
    vectors = TextEncoder(model).encode(texts, head="pooled", max_length=c.data.max_length)
    return {"pooled": fidelity_metrics(vectors, teacher)}


def run_text_stages(workdir: Path, overrides: dict[str, Any]) -> list[dict]:
    from jasper_jax.train.loop import train_and_evaluate

    rows, previous = [], ""
    for stage in (1, 2, 3):
        stage_dir = workdir / f"stage{stage}"
        c = _config(stage, {**overrides, "init_from": previous})
        start = time.perf_counter()
        result = train_and_evaluate(c, stage_dir)
        if result["status"] != "finished":
            raise UserError(f"stage {stage} stopped ({result['status']}); re-run to resume")
        rows.append({"stage": stage, "seconds": time.perf_counter() - start, **result})
        previous = str(stage_dir)
    return rows


def format_table(initial: dict, rows: list[dict]) -> str:
    """Markdown: one line per (stage, head) with cosine (full head) and Spearman."""
    lines = [
        "| stage | head | held-out cosine to teacher | held-out Spearman (pairwise sims) | "
        "teacher-NN recall@10 |",
        "|---|---|---|---|---|",
    ]
    all_rows = [{"stage": "start (MiniLM, no head)", "eval": initial}, *rows]
    for row in all_rows:
        for head, m in row["eval"].items():
            cos = f"{m['cosine']:.4f}" if "cosine" in m else "n/a (dim differs)"
            lines.append(
                f"| {row['stage']} | {head} | {cos} | {m['spearman']:.4f} | "
                f"{m['nn_recall_at_10']:.3f} |"
            )
    return "\n".join(lines)


def demo_main(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir)
    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    base = _config(1, overrides)
    start = time.perf_counter()
    train_dir, eval_dir = build_teacher_data(workdir, base)
    overrides.update({"data.train_dir": str(train_dir), "data.eval_dir": str(eval_dir)})
    teacher_seconds = time.perf_counter() - start
    initial = initial_scores(base, eval_dir)
    rows = run_text_stages(workdir, overrides)
    long_documents = None
    if not args.skip_long:
        from jasper_jax.train.long_documents_demo import run_long_documents

        long_documents = run_long_documents(workdir, quick=args.quick)
    vision = None
    if not args.skip_vision:
        vision = _run_vision(workdir, overrides)
    table = format_table(initial, rows)
    summary = {
        "teacher_seconds": teacher_seconds,
        "total_seconds": time.perf_counter() - start,
        "initial": initial,
        "stages": [{k: v for k, v in r.items() if k != "state"} for r in rows],
        "vision": vision,
        "long_documents": long_documents,
    }
    (workdir / "demo_results.json").write_text(json.dumps(summary, indent=2, default=str))
    extra = [part["table"] for part in (long_documents, vision) if part and "table" in part]
    (workdir / "demo_results.md").write_text("\n\n".join([table, *extra]) + "\n")
    print("\n" + table)
    if long_documents:
        print("\n" + long_documents["table"])
    if vision:
        print("\n" + vision.get("table", json.dumps(vision, indent=2, default=str)))
    print(f"\nteacher vectors {teacher_seconds:.0f} s; total {summary['total_seconds']:.0f} s; ")
    print(
        f"results in {workdir}/demo_results.md; export: jasper-jax export --workdir "
        f"{workdir}/stage3 --output {workdir}/export"
    )
    return 0


def _run_vision(workdir: Path, overrides: dict[str, Any]) -> dict | None:
    try:
        from jasper_jax.train.vision_demo import run_stage4
    except ImportError:
        log.info("stage 4 (vision) is not available in this build; skipped")
        return None
    return run_stage4(workdir, workdir / "stage3", quick="train.steps" in overrides)
