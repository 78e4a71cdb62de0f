"""Relative-similarity loss: naive O(B^4) form vs the blockwise one, forward + backward.

Reports the compiled temporary memory (`memory_analysis().temp_size_in_bytes`, deterministic)
and the best wall time of a few runs, for each batch size; the naive form is only run where it
fits in `--naive-limit-gb`. Prints a markdown table and appends it to `benchmarks/results.md`.

    python benchmarks/loss_memory.py [--batches 64,128,256,512] [--repeats 2]
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from jasper_jax import losses
from jasper_jax.vectors import l2_normalize

RESULTS = pathlib.Path(__file__).with_name("results.md")
GB = 1e9


def naive_resim(student: jax.Array, teacher: jax.Array, margin: float = 0.015) -> jax.Array:
    """The reference's form: the full [P, P] pair-of-pairs matrix, upper triangle by a mask."""
    s = l2_normalize(student)
    t = jax.lax.stop_gradient(l2_normalize(teacher))
    rows, cols = np.triu_indices(student.shape[0], k=1)
    p_s, p_t = (s @ s.T)[rows, cols], (t @ t.T)[rows, cols]
    d_s = p_s[None, :] - p_s[:, None]
    label = jnp.where(p_t[None, :] - p_t[:, None] < 0, 1.0, -1.0)
    index = jnp.arange(p_s.shape[0])
    upper = index[:, None] < index[None, :]
    num_terms = p_s.shape[0] * (p_s.shape[0] - 1) / 2
    return jnp.sum(jnp.where(upper, jax.nn.relu(label * d_s + margin), 0.0)) / num_terms


def measure(loss, batch: int, limit_gb: float, repeats: int) -> tuple[float, float | None]:
    """(compiled temp GB, best seconds of value_and_grad or None when over the limit)."""
    rng = np.random.default_rng(0)
    student = jnp.asarray(rng.normal(size=(batch, 64)), jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(batch, 96)), jnp.float32)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(student, teacher).compile()
    temp_gb = compiled.memory_analysis().temp_size_in_bytes / GB
    if temp_gb > limit_gb:
        return temp_gb, None
    jax.block_until_ready(compiled(student, teacher))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(student, teacher))
        times.append(time.perf_counter() - start)
    return temp_gb, min(times)


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = jax.devices()[0].device_kind
    return f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {device}"


def table(batches: list[int], limit_gb: float, repeats: int) -> str:
    lines = [
        "| B | pairs P | terms P(P-1)/2 | naive temp | naive s | ours temp | ours s | "
        "naive/ours time | naive/ours memory |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    for batch in batches:
        pairs = batch * (batch - 1) // 2
        naive_gb, naive_s = measure(naive_resim, batch, limit_gb, repeats)
        ours_gb, ours_s = measure(losses.relative_similarity_loss, batch, float("inf"), repeats)
        if naive_s is None:
            naive_time, time_ratio = f"n/a (needs {naive_gb:.1f} GB)", "n/a"
        else:
            naive_time, time_ratio = f"{naive_s:.3f}", f"{naive_s / ours_s:.2f}x"
        lines.append(
            f"| {batch} | {pairs} | {pairs * (pairs - 1) // 2:.2e} | {naive_gb:.3f} GB | "
            f"{naive_time} | {ours_gb * 1e3:.1f} MB | {ours_s:.3f} | {time_ratio} | "
            f"{naive_gb / ours_gb:.0f}x |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="64,128,256,512")
    parser.add_argument("--naive-limit-gb", type=float, default=8.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-append", action="store_true", help="print only")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    header = (
        f"## Relative-similarity loss, forward + backward ({datetime.date.today()})\n\n"
        f"{machine()}. Temp = compiled `memory_analysis().temp_size_in_bytes`; time = best of "
        f"{args.repeats} runs after a warm-up; naive runs only below {args.naive_limit_gb} GB.\n"
    )
    print(header)
    result = table(batches, args.naive_limit_gb, args.repeats)
    if not args.no_append:
        with RESULTS.open("a") as out:
            out.write(f"\n{header}\n{result}\n")
        print(f"\nappended to {RESULTS}")


if __name__ == "__main__":
    main()
