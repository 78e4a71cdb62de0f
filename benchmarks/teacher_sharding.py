"""Teacher weights per device on a mesh: the training layout vs the teacher (inference) layout.

A Qwen3-Embedding-0.6B-shaped teacher (28 layers, 1024 wide, 151,669-token vocabulary; zeros,
not its weights: only the layout is measured) placed on 8 simulated devices with
`TextEncoder(..., sharded_weights=True)` as `jasper-jax teachers --mesh-shape` does. Bytes per
device are read from the placed arrays' shards; the reference is the replicated size (every
device holding the whole model, as before --mesh-shape existed).

    python -m benchmarks.teacher_sharding [--layers 28] [--dtype float32]
"""

from __future__ import annotations

import argparse
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from benchmarks.common import report  # noqa: E402

MESHES = [(1, 8, 1), (2, 2, 2), (2, 1, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()

    import dataclasses
    import pathlib

    import flax.linen as nn
    import jax
    import numpy as np

    from jasper_jax import sharding
    from jasper_jax.encode import TextEncoder
    from jasper_jax.models.embedder import EmbedderConfig, abstract_params
    from jasper_jax.models.loading import LoadedModel
    from jasper_jax.models.qwen2 import Qwen3Config

    encoder = Qwen3Config(
        vocab_size=151669,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim_override=128,
        max_position_embeddings=32768,
    )
    config = EmbedderConfig(encoder=encoder, pooling="last")
    shapes = nn.meta.unbox(abstract_params(config))
    params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    size = 2 if args.dtype == "bfloat16" else 4
    whole = sum(x.size for x in jax.tree.leaves(params)) * size
    model = LoadedModel(config, params, pathlib.Path("."), 512, {}, None)
    tokenizer = dataclasses.make_dataclass("NoTokenizer", [])()  # layout only: nothing encoded
    rows = []
    for shape in MESHES:
        mesh = sharding.make_mesh(shape)
        line = [str(shape)]
        for sharded in (False, True):
            placed = TextEncoder(
                model, mesh=mesh, dtype=args.dtype, sharded_weights=sharded, tokenizer=tokenizer
            )
            per_device = sharding.bytes_per_device(placed.params)
            if not sharded and args.dtype != "float32":  # the training layout keeps float32
                per_device = {d: b * size // 4 for d, b in per_device.items()}
            line += [max(per_device.values()) / 2**20, whole / max(per_device.values())]
            del placed
        rows.append(line)
        print(line, flush=True)
    report(
        f"Teacher weights per device, Qwen3-0.6B shape ({args.layers} layers), {args.dtype}, "
        "8 simulated devices",
        [
            "mesh (data,fsdp,tensor)",
            "training layout MiB/device",
            "replicated / per device",
            "teacher layout MiB/device",
            "replicated / per device",
        ],
        rows,
        note=f"replicated size {whole / 2**20:.0f} MiB; largest device's bytes, read from the "
        "placed arrays' shards; the teacher layout shards `embed` over fsdp and data and puts any "
        "axis a weight's rule leaves unused on another of its dimensions (sharding.spread); "
        "bytes, not time: the load does not change them",
    )


if __name__ == "__main__":
    main()
