"""`jasper-jax eval`: score a student and its teachers; eval.json, eval.md and quality.png."""

from __future__ import annotations

import argparse
from pathlib import Path

from jasper_jax.evaluation.report import summary_table
from jasper_jax.evaluation.runner import (
    EvalSettings,
    check_settings,
    default_output_dir,
    evaluate,
    write_results,
)


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags of `jasper-jax eval`."""
    p.add_argument("--model", required=True, help="exported folder or training workdir")
    p.add_argument(
        "--data",
        default="embedded",
        help="held-out texts: 'embedded' (bundled validation split; the target is computed "
        "from the teachers) or a teacher dataset folder (its stored target vectors)",
    )
    p.add_argument("--output", default=None, help="default: WORKDIR/eval or FOLDER-eval")
    p.add_argument(
        "--teachers",
        default=None,
        help="comma-separated teacher names or folders, in target order (default: the "
        "workdir's, else all-mpnet-base-v2,all-MiniLM-L6-v2)",
    )
    p.add_argument("--texts", type=int, default=1000, help="held-out texts for fidelity")
    p.add_argument("--queries", type=int, default=1000, help="retrieval queries")
    p.add_argument("--docs", type=int, default=None, help="retrieval documents (default: all)")
    p.add_argument("--speed-texts", type=int, default=256, help="texts timed for texts/s")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--teacher-cache",
        default=None,
        help="folder that keeps teacher encodings between evaluations, or 'off' (default: "
        "$JASPER_JAX_CACHE/teacher-encodings, else ~/.cache/jasper-jax/teacher-encodings)",
    )


def main(args: argparse.Namespace) -> int:
    """Scores the model and its teachers, writes eval.json / eval.md / quality.png, prints a
    summary table."""
    settings = EvalSettings(
        data=args.data,
        texts=args.texts,
        queries=args.queries,
        documents=args.docs,
        speed_texts=args.speed_texts,
        batch_size=args.batch_size,
        teacher_cache=args.teacher_cache,
    )
    check_settings(settings)
    teachers = [t for t in (args.teachers or "").split(",") if t] or None
    result = evaluate(args.model, teachers=teachers, settings=settings)
    output = Path(args.output) if args.output else default_output_dir(Path(args.model))
    paths = write_results(result, output)
    print(summary_table(result))
    print(f"wrote {paths['md']}, {paths['json']}, {paths['png']}")
    return 0
