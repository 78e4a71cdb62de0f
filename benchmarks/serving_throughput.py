"""Serving throughput (texts/s) of one export folder: sentence-transformers (torch fp32, the
reference), our JAX encoder, and the folder's ONNX graphs fp32 and int8 on onnxruntime. Same
texts, batch size, head and thread count for all four; the ratio is against
sentence-transformers in the same run.

python -m benchmarks.serving_throughput --model EXPORT [--n 2048] [--batch 32] [--threads N]

EXPORT is a `jasper-jax export --onnx` folder. Each encoder gets one warm-up pass over the first
batches, then `--repeats` timed passes; the best pass counts (the least disturbed by others).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def texts_for(n: int) -> list[str]:
    from jasper_jax.data.corpus import load_corpus

    return load_corpus("embedded", split="validation")[:n]


def best_rate(encode, texts: list[str], warm: list[str], repeats: int) -> float:
    """Texts/s of the fastest of `repeats` timed `encode(texts)` calls, after `encode(warm)`."""
    encode(warm)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        encode(texts)
        best = min(best, time.perf_counter() - start)
    return len(texts) / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="an export folder made with --onnx")
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from benchmarks.common import report
    from jasper_jax.encode import TextEncoder
    from jasper_jax.models.loading import load_model
    from jasper_jax.onnx_encoder import OnnxEncoder

    torch.set_num_threads(args.threads)
    texts, warm = texts_for(args.n), texts_for(args.batch * 4)
    onnx = {
        name: OnnxEncoder(
            args.model, int8=name == "int8", threads=args.threads, batch_size=args.batch
        )
        for name in ("fp32", "int8")
    }
    head = onnx["fp32"].head
    prompt = onnx["fp32"].prompts.get("document") or None
    st = SentenceTransformer(args.model, device="cpu", local_files_only=True)
    model = load_model(args.model)
    jx = TextEncoder(model, batch_size=args.batch)
    encoders = {
        f"sentence-transformers (torch {torch.__version__}, fp32)": lambda t: st.encode(
            t, batch_size=args.batch, normalize_embeddings=True, prompt=prompt
        ),
        "jasper-jax encode (JAX, fp32)": lambda t: jx.encode(t, head=head, prompt=prompt),
        "ONNX fp32 (onnxruntime)": lambda t: onnx["fp32"].encode(t, prompt=prompt),
        "ONNX int8 (onnxruntime, dynamic)": lambda t: onnx["int8"].encode(t, prompt=prompt),
    }
    sample = texts[:256]
    reference_vectors = encoders[next(iter(encoders))](sample)
    rates, cosines = {}, {}
    for name, encode in encoders.items():
        cosines[name] = float(np.sum(encode(sample) * reference_vectors, axis=1).min())
        rates[name] = best_rate(encode, texts, warm, args.repeats)
        print(f"{name}: {rates[name]:.1f} texts/s", flush=True)
    ref = rates[next(iter(rates))]
    rows = [[name, rate, rate / ref, cosines[name]] for name, rate in rates.items()]
    report(
        f"Serving throughput, {args.model} ({head}), batch {args.batch}, {args.n} corpus texts",
        ["encoder", "texts/s", "ratio vs sentence-transformers", "min cos vs ST (256 texts)"],
        rows,
        note=f"threads: {args.threads} (torch and onnxruntime intra-op); best of "
        f"{args.repeats} passes after a warm-up; document prompt {prompt!r}",
    )


if __name__ == "__main__":
    main()
