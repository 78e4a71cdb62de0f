"""`jasper-jax encode`: one text per line in, an .npy of unit vectors out (row i = line i).

With `--images` (a stage-4 model): image files and folders in, row i = the i-th image, folders
expanded in sorted order; the order is also written to `OUTPUT.paths.txt`.

Outputs are refused when any vector is NaN/inf, and are written beside their targets under
temporary names, then renamed: a failure (disk full) leaves existing outputs as they were.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from jasper_jax import sharding
from jasper_jax.commands.encode_chunks import encode_chunks_main
from jasper_jax.commands.encode_io import (
    check_output_path,
    npy_writer,
    read_texts,
    role_prompt,
    text_writer,
    write_outputs,
)
from jasper_jax.commands.encode_precision import PrecisionPlan, add_precision_args
from jasper_jax.data.images import list_images
from jasper_jax.encode import TextEncoder, check_finite, check_finite_model, resolve_head
from jasper_jax.encode_images import ImageEncoder
from jasper_jax.errors import UserError
from jasper_jax.run_folder import load_any_model, load_image_model

log = logging.getLogger(__name__)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local HF / sentence-transformers folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="UTF-8 text file, one text per line")
    source.add_argument(
        "--images",
        nargs="+",
        help="image files and/or folders of images (a model with a vision tower: stage 4)",
    )
    p.add_argument("--output", required=True, help=".npy file for the [N, dim] float32 vectors")
    p.add_argument(
        "--chunks",
        default=None,
        help="also write chunk vectors from the same pass: MODE:SIZE[:OVERLAP] (sentences:64, "
        "tokens:128:32) or 'given' (spans from a .jsonl input's 'chunks'); --input may be "
        ".jsonl; --max-length then defaults to the model's position limit",
    )
    p.add_argument("--head", default=None, help="output head: 'pooled', 'dense_<dim>' or '<dim>'")
    p.add_argument("--prompt", default=None, help="text prepended to every input (e.g. a query)")
    p.add_argument(
        "--role",
        choices=("query", "document"),
        default=None,
        help="use the model's own prompt for this role (its sentence-transformers `prompts`); "
        "without --prompt or --role, its default prompt (if any) applies, as in "
        "sentence-transformers' encode",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=None, help="tokens; default: the model's")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor mesh shape")
    p.add_argument(
        "--backend",
        choices=("jax", "onnx", "onnx-int8"),
        default="jax",
        help="onnx / onnx-int8: run the export folder's ONNX graph (`export --onnx`) on "
        "onnxruntime, fp32 or dynamically quantized int8; --model is then the export folder",
    )
    add_precision_args(p)


def main(args: argparse.Namespace) -> int:
    """`jasper-jax encode`: texts (or, with --images / --chunks, the other two modes)."""
    check_output_path(args.output)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length {args.max_length}: must be at least 2 tokens")
    plan = PrecisionPlan.from_args(args)  # refusals, calibration read: before any compute
    if args.backend != "jax":
        from jasper_jax.commands.encode_onnx import encode_onnx_main  # onnxruntime: on demand

        return encode_onnx_main(args, plan)
    if args.images:
        if args.chunks:
            raise UserError("--chunks applies to texts; drop it with --images")
        return encode_images_main(args)
    if args.chunks:
        return encode_chunks_main(args, plan)
    texts = read_texts(args.input)
    model = load_any_model(args.model)
    check_finite_model(model.params, args.model)
    head = resolve_head(model.config, args.head)  # fail before any compile
    plan.check_head(head)
    encoder = TextEncoder(
        model,
        dtype=args.dtype,
        mesh=sharding.make_mesh(sharding.parse_mesh_shape(args.mesh, "--mesh"), flag="--mesh"),
        batch_size=args.batch_size,
    )
    prompt = role_prompt(model, args.prompt, args.role)
    vectors = encoder.encode(
        texts, head=args.head, prompt=prompt, max_length=args.max_length, progress=True
    )
    check_finite(vectors, "vectors", line_of=args.input)
    truncated = encoder.last_truncated
    stored = plan.store(vectors, plan.ranges(encoder, head, vectors.shape[1], args.max_length))
    write_outputs({args.output: npy_writer(stored)})
    log.info(
        "wrote %s: %d vectors as %s (%d texts reached max length and were truncated)",
        args.output,
        len(vectors),
        plan.describe(*vectors.shape),
        truncated,
    )
    return 0


def encode_images_main(args: argparse.Namespace) -> int:
    """`--images`: every image is decoded before any compute, so a bad file fails the run early."""
    if args.prompt or args.role or args.max_length is not None:
        raise UserError("--prompt, --role and --max-length apply to texts; drop them with --images")
    paths = list_images(args.images)
    model = load_image_model(args.model)
    check_finite_model(model.params, args.model)
    resolve_head(model.config.text, args.head)  # fail before any compile
    encoder = ImageEncoder(
        model.config,
        model.params,
        dtype=args.dtype,
        mesh=sharding.make_mesh(sharding.parse_mesh_shape(args.mesh, "--mesh"), flag="--mesh"),
        batch_size=args.batch_size,
    )
    encoder.check(paths)
    vectors = encoder.encode(paths, head=args.head)
    check_finite(vectors, "image vectors")
    listing = Path(f"{args.output}.paths.txt")
    write_outputs(
        {
            args.output: npy_writer(vectors),
            listing: text_writer("".join(f"{p}\n" for p in paths)),
        }
    )
    log.info("wrote %s: %d x %d float32 (row order in %s)", args.output, *vectors.shape, listing)
    return 0
