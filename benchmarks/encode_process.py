"""Encode speed as a user sees it: `jasper-jax encode` vs sentence-transformers, whole process.

Three figures, one run each, same texts, same model folder, same CPU:
- whole process: `jasper-jax encode` (a fresh process: import, load, compile, encode, write
  .npy), first with an empty cache root (cold: every program compiles, the tokenizer is built
  through transformers) and then again (warm: both come from the cache), against a fresh Python
  process that imports sentence-transformers, loads the same folder, encodes with
  `normalize_embeddings=True` and writes the .npy;
- steady state: texts/s of both encoders inside one process after a warm-up pass;
- the share of the machine's matmul speed our steady state reaches: useful FLOPs per text
  (matmuls on the real, unpadded tokens; embeddings and elementwise work not counted) x texts/s,
  over the fp32 FLOP/s XLA reaches on a 2048 x 2048 matmul in this process.

`--dtype bfloat16` runs both encoders in bfloat16 and adds their cosine to sentence-transformers'
float32 vectors (the matmul reference stays fp32).

    python -m benchmarks.encode_process [--model all-MiniLM-L6-v2] [--n 3000] [--batch 64]
        [--dtype float32]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import report  # noqa: E402

REFERENCE = """
import sys, numpy as np, torch
from sentence_transformers import SentenceTransformer
folder, inp, out, batch, dtype = sys.argv[1:6]
texts = open(inp, encoding="utf-8").read().split("\\n")[:-1]
model = SentenceTransformer(folder, device="cpu", model_kwargs={"dtype": getattr(torch, dtype)})
np.save(out, model.encode(texts, batch_size=int(batch), normalize_embeddings=True))
"""


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def matmul_flops_per_second(size: int = 2048, repeats: int = 10) -> float:
    """Best fp32 FLOP/s of one jitted size x size matmul (XLA, this process's threads)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    f = jax.jit(jnp.dot)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def useful_flops(encoder_config, token_counts: list[int]) -> float:
    """Forward matmul FLOPs of the encoder on texts of these lengths, no padding (the MFU
    count of `jasper_jax.train.flops`, one text at a time)."""
    from jasper_jax.train.flops import encoder_ops

    return float(sum(op.flops for n in token_counts for op in encoder_ops(encoder_config, 1, n)))


def steady(
    folder: Path, texts: list[str], batch: int, dtype: str
) -> tuple[float, float, list[int]]:
    """(ours texts/s, sentence-transformers texts/s, token counts) after a warm-up pass each,
    both computing in `dtype`."""
    import torch
    from sentence_transformers import SentenceTransformer

    from jasper_jax.encode import TextEncoder
    from jasper_jax.models.loading import load_model

    ours = TextEncoder(load_model(folder), batch_size=batch, dtype=dtype)
    ours.encode(texts)
    start = time.perf_counter()
    ours.encode(texts)
    ours_rate = len(texts) / (time.perf_counter() - start)
    counts = [len(x) for x in ours.text_tokenizer.tokenize(texts, ours.token_limit()).ids]
    st = SentenceTransformer(
        str(folder), device="cpu", model_kwargs={"dtype": getattr(torch, dtype)}
    )
    st.encode(texts, batch_size=batch)
    start = time.perf_counter()
    st.encode(texts, batch_size=batch, normalize_embeddings=True)
    return ours_rate, len(texts) / (time.perf_counter() - start), counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--split", default="train", help="embedded corpus split of the texts")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype of both encoders (fidelity is measured against float32 either way)",
    )
    args = parser.parse_args()

    from jasper_jax.data.corpus import load_corpus
    from jasper_jax.data.teacher_assets import teacher_folder
    from jasper_jax.models.loading import load_model

    folder = teacher_folder(args.model)
    texts = load_corpus("embedded", split=args.split)[: args.n]
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp, "texts.txt")
        inp.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
        # An empty cache root for our runs: the first compiles every program and builds the
        # tokenizer through transformers (cold); the second finds both in the cache (warm).
        env = {**os.environ, "JASPER_JAX_CACHE": str(Path(tmp, "cache"))}
        ours = ["jasper-jax", "encode", "--model", str(folder), "--input", str(inp)]
        ours += ["--output", str(Path(tmp, "ours.npy")), "--batch-size", str(args.batch)]
        ours += ["--dtype", args.dtype]
        cold = timed(ours, env)
        warm = timed(ours, env)
        ref_cmd = [sys.executable, "-c", REFERENCE, str(folder), str(inp), str(Path(tmp, "st"))]
        ref = timed([*ref_cmd, str(args.batch), args.dtype])
        fidelity = ""
        if args.dtype != "float32":
            exact = [*ref_cmd[:-1], str(Path(tmp, "exact")), str(args.batch), "float32"]
            timed(exact)
            want = np.load(Path(tmp, "exact.npy"))
            cos = {
                name: np.sum(np.load(Path(tmp, f"{name}.npy")) * want, axis=1)
                for name in ("ours", "st")
            }
            fidelity = "; cosine to sentence-transformers float32, mean / min: " + ", ".join(
                f"{name} {c.mean():.6f} / {c.min():.6f}" for name, c in cos.items()
            )
    ours_rate, st_rate, counts = steady(folder, texts, args.batch, args.dtype)
    peak = matmul_flops_per_second()
    per_text = useful_flops(load_model(folder).config.encoder, counts) / len(texts)
    share = ours_rate * per_text / peak
    rows = [
        ["whole process, cold caches (s)", cold, ref, ref / cold],
        ["whole process, warm caches (s)", warm, ref, ref / warm],
        ["steady state (texts/s)", ours_rate, st_rate, ours_rate / st_rate],
    ]
    report(
        f"Encode, {args.model}, {args.n} embedded-corpus texts ({args.split}), batch "
        f"{args.batch}, {args.dtype}",
        ["measure", "jasper-jax", "sentence-transformers", "ratio (jasper-jax faster by)"],
        rows,
        note=(
            f"mean {sum(counts) / len(counts):.1f} tokens per text; useful matmul FLOPs per "
            f"text {per_text / 1e6:.1f} M; XLA fp32 matmul 2048^2: {peak / 1e9:.0f} GFLOP/s; "
            f"steady state reaches {share:.0%} of it{fidelity}"
        ),
    )


if __name__ == "__main__":
    main()
