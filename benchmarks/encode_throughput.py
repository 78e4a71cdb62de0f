"""Encode throughput (texts/s): our JAX encoder vs sentence-transformers, same model and batch.

python benchmarks/encode_throughput.py [--model all-MiniLM-L6-v2] [--n 1024] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def texts_for(n: int) -> list[str]:
    from jasper_jax.data.corpus import load_corpus

    return load_corpus("embedded", split="validation")[:n]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from benchmarks.common import report
    from jasper_jax.data.teacher_assets import teacher_folder
    from jasper_jax.encode import TextEncoder
    from jasper_jax.models.loading import load_model

    folder = teacher_folder(args.model)
    texts = texts_for(args.n)
    rows = []
    for dtype in ("float32", "bfloat16"):
        ours = TextEncoder(load_model(folder), batch_size=args.batch, dtype=dtype)
        ours.encode(texts[: args.batch * 4])  # compile the bucket shapes once
        start = time.perf_counter()
        ours.encode(texts)
        rows.append([f"jasper-jax ({dtype})", args.n / (time.perf_counter() - start)])
    st = SentenceTransformer(str(folder), device="cpu")
    st.encode(texts[: args.batch], batch_size=args.batch)
    start = time.perf_counter()
    st.encode(texts, batch_size=args.batch, normalize_embeddings=True)
    ref = args.n / (time.perf_counter() - start)
    rows.append([f"sentence-transformers (torch {torch.__version__}, fp32)", ref])
    rows = [[name, rate, rate / ref] for name, rate in rows]
    report(
        f"Encode throughput, {args.model}, batch {args.batch}, {args.n} corpus texts",
        ["encoder", "texts/s", "ratio vs sentence-transformers"],
        rows,
        note=f"torch threads: {torch.get_num_threads()}",
    )


if __name__ == "__main__":
    main()
