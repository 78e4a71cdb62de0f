"""Long-context memory: forward + backward of a tiny-width student at 8k tokens, plain (dense
attention, no remat) against per-layer remat + blockwise attention, in the same run.

Each variant runs in a fresh subprocess that reports XLA's compiled temporary memory
(`memory_analysis().temp_size_in_bytes`) and the measured peak resident memory of the step
itself (Linux VmHWM reset through /proc/self/clear_refs just before the call, minus the RSS at
that point: parameters, inputs and the compiled program are excluded), the loss and the
gradients, which the parent compares with the plain variant's. The student is Qwen2-shaped
(GQA, RoPE, RMSNorm, SwiGLU; bidirectional), mean pooling, one projection head, the cosine
distillation loss against a fixed random target; a BERT row at its 512-token limit follows.
Prints a table and appends it to `benchmarks/results.md`.

    python -m benchmarks.long_context_memory [--length 8192] [--batch 1] [--block 512]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 1 << 20
ACCEPT = 0.5  # remat + blockwise peak must be at most this fraction of plain


def build(arch: str, length: int, remat: str, attention: str, block: int):
    """(jitted value_and_grad, params, inputs) of the tiny student at `length` tokens."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jasper_jax.losses import cosine_loss
    from jasper_jax.models.attention import AttentionSettings
    from jasper_jax.models.bert import BertConfig
    from jasper_jax.models.embedder import Embedder, EmbedderConfig
    from jasper_jax.models.qwen2 import Qwen2Config

    if arch == "qwen2":
        encoder = Qwen2Config(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=length,
        )
    else:
        encoder = BertConfig(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=length,
        )
    config = EmbedderConfig(encoder=encoder, pooling="mean", heads=(96,))
    settings = AttentionSettings(attention, block)
    model = Embedder(config, remat=remat, attention=settings)
    return model, config, nn, jax, jnp, cosine_loss


def child(args: argparse.Namespace) -> None:
    """One variant, fresh process: prints a JSON line, writes gradients to args.out."""
    from benchmarks.common import memory_mb

    model, config, nn, jax, jnp, cosine_loss = build(
        args.arch, args.length, args.remat, args.attention, args.block
    )
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 1000, (args.batch, args.length)), jnp.int32)
    mask = np.ones((args.batch, args.length), np.int32)
    mask[-1, args.length - args.length // 8 :] = 0  # some padding in the last row
    mask = jnp.asarray(mask)
    teacher = jnp.asarray(rng.normal(size=(args.batch, 96)), jnp.float32)
    small = jnp.zeros((1, 8), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), small, jnp.ones_like(small)))["params"]

    def loss(p, ids, mask, teacher):
        student = model.apply({"params": p}, ids, mask, heads=("dense_96",))["dense_96"]
        return cosine_loss(student, teacher)

    step = jax.jit(jax.value_and_grad(loss))
    compiled = step.lower(params, ids, mask, teacher).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / MB
    jax.block_until_ready((params, ids, mask, teacher))
    before = memory_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    start = time.perf_counter()
    value, grads = jax.block_until_ready(compiled(params, ids, mask, teacher))
    seconds = time.perf_counter() - start
    peak = memory_mb("VmHWM") - before
    flat = {"/".join(map(str, k)): np.asarray(v) for k, v in _flatten(grads).items()}
    np.savez(args.out, **flat)
    print(json.dumps({"temp_mb": temp, "peak_mb": peak, "loss": float(value), "s": seconds}))


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, (*prefix, k)))
        return out
    return {prefix: tree}


def run_variant(arch, length, batch, remat, attention, block) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "grads.npz")
        cmd = [sys.executable, "-m", "benchmarks.long_context_memory", "--child", "--arch", arch]
        cmd += ["--length", str(length), "--batch", str(batch), "--remat", remat]
        cmd += ["--attention", attention, "--block", str(block), "--out", out]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"variant {remat}/{attention} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        with np.load(out) as z:
            grads = {k: z[k] for k in z.files}
    return result, grads


def compare(arch, length, batch, block, variants) -> list[list[object]]:
    rows, reference = [], None
    for remat, attention in variants:
        result, grads = run_variant(arch, length, batch, remat, attention, block)
        if reference is None:
            reference = (result, grads)
        base, base_grads = reference
        diff = max(float(np.abs(grads[k] - base_grads[k]).max()) for k in base_grads)
        rows.append(
            [
                f"{arch} L={length} B={batch}",
                f"remat={remat}, attention={attention}",
                f"{result['temp_mb']:.0f}",
                f"{result['peak_mb']:.0f}",
                f"{result['peak_mb'] / base['peak_mb']:.3f}",
                f"{result['loss']:.7f}",
                f"{abs(result['loss'] - base['loss']):.1e}",
                f"{diff:.1e}",
                round(result["s"], 2),
            ]
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--skip-bert", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arch", default="qwen2", help=argparse.SUPPRESS)
    parser.add_argument("--remat", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--attention", default="dense", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from benchmarks.common import report

    variants = [("none", "dense"), ("full", "dense"), ("none", "blockwise"), ("full", "blockwise")]
    rows = compare("qwen2", args.length, args.batch, args.block, variants)
    plain, ours = float(rows[0][3]), float(rows[-1][3])
    if not args.skip_bert:
        bert = [("none", "dense"), ("full", "blockwise")]
        rows += compare("bert", 512, 8, 128, bert)
    verdict = "PASS" if ours <= ACCEPT * plain else "FAIL"
    report(
        f"Long-context memory, forward + backward, tiny student (hidden 64, 2 layers, 4 heads / "
        f"2 kv heads), fp32, blockwise block {args.block} (BERT rows: 128)",
        [
            "model",
            "variant",
            "compiled temp MB",
            "peak RSS MB",
            "peak / plain",
            "loss",
            "|loss - plain|",
            "max |grad - plain|",
            "s/step",
        ],
        rows,
        f"Acceptance: remat+blockwise peak <= {ACCEPT} x plain at L={args.length}: "
        f"{ours:.0f} MB vs {plain:.0f} MB ({ours / plain:.3f}x) -> {verdict}. Peak RSS = VmHWM of "
        "the step alone in a fresh process (params, inputs and compiled code excluded). At this "
        "width the [heads, L, L] attention tensors are nearly all the memory, so blockwise "
        "attention does the work and remat alone saves nothing (one layer's backward still "
        "holds them); remat pays off at real widths, where per-layer activations dominate.",
    )


if __name__ == "__main__":
    main()
