"""Throughput of the grain text pipeline (batches/s), against tokenizing alone as reference.

    python -m benchmarks.pipeline_throughput [--data-dir DIR] [--batches 100] [--workers 0]
        [--batch-size 64] [--max-length 48]

Without ``--data-dir`` a teacher dataset of embedded-corpus texts with random 1152-d vectors
(the embedded mpnet + MiniLM width) is built in a temp folder: the pipeline's cost does not
depend on the vector values. The reference is the same HF tokenizer call on the same batches
without grain (read, shuffle, batch, renormalise), so the ratio shows the pipeline's overhead;
the stage-3 train step on the same shapes shows what the pipeline has to keep up with.
Prints a table and appends it to ``benchmarks/results.md``. Run from the repository root.
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np
import transformers

from benchmarks.common import report
from benchmarks.train_step import jax_steps_per_second, make_batches
from jasper_jax.data.corpus import load_corpus
from jasper_jax.data.pipeline import make_text_pipeline
from jasper_jax.data.teacher_assets import teacher_folder
from jasper_jax.data.teacher_dataset import build_teacher_dataset
from jasper_jax.data.teachers import Teacher


def build_random_teacher_dataset(output: pathlib.Path, rows: int = 8192, dim: int = 1152):
    """Teacher dataset of the first ``rows`` embedded texts with random unit vectors [dim]."""
    rng = np.random.default_rng(0)
    teacher = Teacher(
        "random", "random", dim, None, "random", "random",
        lambda texts: rng.normal(size=(len(texts), dim)).astype(np.float32),
    )  # fmt: skip
    texts = load_corpus("embedded")[:rows]
    build_teacher_dataset(texts, [teacher], output, progress=False)
    return output


def measure_pipeline(
    data_dir: str | pathlib.Path,
    tokenizer_dir: str | pathlib.Path,
    *,
    batch_size: int = 64,
    max_length: int = 128,
    num_batches: int = 100,
    worker_count: int = 0,
) -> dict:
    """Batches/s and texts/s of ``make_text_pipeline`` and of tokenizing alone (reference).

    Returns a dict with ``pipeline_batches_per_s``, ``tokenizer_batches_per_s``, ``ratio``
    (pipeline / tokenizer), ``texts_per_s`` and the settings. The first batch (start-up,
    worker launch) is excluded from the timing.
    """
    iterator = make_text_pipeline(
        data_dir, tokenizer_dir, batch_size=batch_size, max_length=max_length, seed=0,
        worker_count=worker_count,
    )  # fmt: skip
    first = next(iterator)
    start = time.perf_counter()
    batches = [first] + [next(iterator) for _ in range(num_batches)]
    pipeline_seconds = time.perf_counter() - start
    texts = load_corpus("embedded")[: batch_size * num_batches]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    start = time.perf_counter()
    for i in range(num_batches):
        tokenizer(
            texts[i * batch_size : (i + 1) * batch_size], padding="max_length",
            truncation=True, max_length=max_length, return_tensors="np",
        )  # fmt: skip
    tokenizer_seconds = time.perf_counter() - start
    pipeline_rate = num_batches / pipeline_seconds
    tokenizer_rate = num_batches / tokenizer_seconds
    return {
        "batch_size": batch_size,
        "max_length": max_length,
        "worker_count": worker_count,
        "num_batches": num_batches,
        "teacher_dim": int(batches[-1]["teacher"].shape[1]),
        "pipeline_batches_per_s": pipeline_rate,
        "tokenizer_batches_per_s": tokenizer_rate,
        "ratio": pipeline_rate / tokenizer_rate,
        "texts_per_s": pipeline_rate * batch_size,
        "truncated_fraction": iterator.truncated_texts / max(iterator.texts_seen, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=pathlib.Path, default=None)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64, help="the demo's batch")
    parser.add_argument("--max-length", type=int, default=48, help="the demo's max length")
    parser.add_argument("--train-steps", type=int, default=5, help="timed train steps")
    args = parser.parse_args()
    tokenizer_dir = teacher_folder("all-MiniLM-L6-v2")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or build_random_teacher_dataset(pathlib.Path(tmp) / "ds")
        r = measure_pipeline(
            data_dir,
            tokenizer_dir,
            batch_size=args.batch_size,
            max_length=args.max_length,
            num_batches=args.batches,
            worker_count=args.workers,
        )
    # What the pipeline must keep up with: the stage-3 train step on the same batch shape.
    step_batches = make_batches(tokenizer_dir, args.batch_size, args.max_length, count=2)
    step_rate = jax_steps_per_second(tokenizer_dir, step_batches, args.train_steps)
    rows = [
        ["grain pipeline (read, shuffle, batch, tokenize)", r["pipeline_batches_per_s"],
         r["texts_per_s"], r["ratio"]],
        ["HF tokenizer alone (reference)", r["tokenizer_batches_per_s"],
         r["tokenizer_batches_per_s"] * r["batch_size"], 1.0],
        ["train step consumption (stage 3, MiniLM student, same shapes)", step_rate,
         step_rate * r["batch_size"], step_rate / r["tokenizer_batches_per_s"]],
    ]  # fmt: skip
    title = (
        f"Pipeline throughput, MiniLM tokenizer, batch {r['batch_size']}, max length "
        f"{r['max_length']}, teacher dim {r['teacher_dim']}, {args.workers} grain workers"
    )
    headers = ["what", "batches/s", "texts/s", "ratio vs tokenizer alone"]
    note = (
        f"{r['num_batches']} batches; texts truncated: {r['truncated_fraction']:.1%}; the "
        f"pipeline delivers {r['pipeline_batches_per_s'] / step_rate:.0f}x what the step consumes"
    )
    report(title, headers, rows, note)


if __name__ == "__main__":
    main()
