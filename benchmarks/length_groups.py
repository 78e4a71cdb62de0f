"""Length-grouped batches vs fixed-length batches: the same stage-3 train step, the same texts.

Reads real corpus texts (spread over the train split, as the demo) through `make_text_pipeline`
twice: fixed batches padded to `max_length` (the reference) and `length_groups` groups padded
to multiples of `pad_multiple`. Teacher vectors are random unit rows (speed does not depend on
their values). Each side compiles every batch length it meets before timing, then runs the same
number of steps; prints texts/s, mean padded length and the ratio, with the load average
before and after, and appends the table to `benchmarks/results.md`.

    python -m benchmarks.length_groups [--texts 4096] [--steps 40] [--groups 16]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.common import report
from benchmarks.train_step import TEACHER_DIM, build_jax_step
from jasper_jax.data.corpus import load_corpus
from jasper_jax.data.pipeline import make_text_pipeline
from jasper_jax.data.teacher_assets import teacher_folder
from jasper_jax.data.teacher_dataset import build_teacher_dataset
from jasper_jax.data.teachers import Teacher
from jasper_jax.demo.main import spread_sample


def random_teacher() -> Teacher:
    """A stand-in teacher: a fixed random unit vector per text (seeded by its hash)."""

    def encode(texts):
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
            rows.append(np.random.default_rng(seed).normal(size=TEACHER_DIM))
        return np.stack(rows).astype(np.float32)

    return Teacher("random", "random", TEACHER_DIM, None, "r", "r", encode)


def texts_per_second(folder, data_dir: Path, steps: int, **pipeline) -> tuple[float, float]:
    """(texts/s over `steps` timed steps, mean padded length), every shape compiled first."""
    step, state = build_jax_step(folder)
    batches = make_text_pipeline(data_dir, folder, seed=0, **pipeline)
    keys = ("input_ids", "attention_mask", "teacher")
    run = [{k: b[k] for k in keys} for b in (next(batches) for _ in range(steps))]
    seen = {}
    for b in run:  # compile (and warm) each distinct length once, outside the timing
        seen.setdefault(b["input_ids"].shape, b)
    for b in seen.values():
        state, metrics = step(state, b)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for b in run:
        state, metrics = step(state, b)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    lengths = [b["input_ids"].shape[1] for b in run]
    return steps * pipeline["batch_size"] / seconds, float(np.mean(lengths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--pad-multiple", type=int, default=16)
    args = parser.parse_args()
    load_before = os.getloadavg()
    folder = teacher_folder("all-MiniLM-L6-v2")
    texts = spread_sample(load_corpus("embedded", split="train"), args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        build_teacher_dataset(texts, [random_teacher()], data, progress=False)
        common = dict(batch_size=args.batch, max_length=args.max_length)
        fixed, fixed_len = texts_per_second(folder, data, args.steps, **common)
        grouped, grouped_len = texts_per_second(
            folder,
            data,
            args.steps,
            length_groups=args.groups,
            pad_multiple=args.pad_multiple,
            **common,
        )
    load_after = os.getloadavg()
    report(
        "Length-grouped batches: stage-3 train step (MiniLM-L6, 1152-d head), fp32",
        ["batches", "mean padded length", "texts/s", "ratio"],
        [
            [f"fixed, {args.max_length} tokens", fixed_len, fixed, 1.0],
            [
                f"{args.groups} per group, multiple of {args.pad_multiple}",
                grouped_len,
                grouped,
                grouped / fixed,
            ],
        ],
        f"{args.texts} spread corpus texts, batch {args.batch}, {args.steps} timed steps each "
        f"after compiling every length; load average before {load_before[0]:.2f}, after "
        f"{load_after[0]:.2f}.",
    )


if __name__ == "__main__":
    main()
