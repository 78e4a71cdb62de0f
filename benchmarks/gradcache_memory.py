"""Gradient cache: peak memory of a batch 8x larger than the plain step's, in the same budget.

Compiled temporary memory (XLA `memory_analysis().temp_size_in_bytes`, deterministic) and wall
time of the stage-3 step (MiniLM-L6 student, 1152-d head, all losses, AdamW), plain at batch B
and with the gradient cache at 8B in chunks of B. Prints a table and appends it to
`benchmarks/results.md`.

    python -m benchmarks.gradcache_memory [--batch 32] [--length 128] [--factor 8]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from benchmarks.common import report
from benchmarks.train_step import build_jax_step, make_batches
from jasper_jax.data.teacher_assets import teacher_folder

MB = 1 << 20


def measure(folder, batch: int, length: int, chunks: int, limit_mb: float):
    """(compiled temp MB, seconds of one step, or None where temp is over `limit_mb`)."""
    step, state = build_jax_step(folder, gradcache_chunks=chunks)
    data = jax.tree.map(jnp.asarray, make_batches(folder, batch, length, count=1)[0])
    compiled = step.lower(state, data).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / MB
    if temp > limit_mb:
        return temp, None
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)
    return temp, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--factor", type=int, default=8)
    parser.add_argument("--run-limit-mb", type=float, default=6000, help="compile only above")
    args = parser.parse_args()
    folder = teacher_folder("all-MiniLM-L6-v2")
    big = args.batch * args.factor
    runs = [
        ("plain", args.batch, 1),
        ("plain", big, 1),
        (f"gradient cache, chunks of {args.batch}", big, args.factor),
    ]
    rows = []
    for name, batch, chunks in runs:
        temp, seconds = measure(folder, batch, args.length, chunks, args.run_limit_mb)
        rows.append([name, batch, temp, "not run (over limit)" if seconds is None else seconds])
        print(rows[-1], flush=True)
    report(
        f"Gradient cache, stage-3 step, MiniLM-L6 student, length {args.length}, fp32",
        ["step", "batch", "compiled temp MB", "s/step"],
        rows,
        f"Target: batch {big} with the cache within the plain batch-{args.batch} budget.",
    )


if __name__ == "__main__":
    main()
