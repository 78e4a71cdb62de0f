"""`jasper-jax encode --backend onnx|onnx-int8`: texts through an export's ONNX graph.

Same inputs, prompts (`--prompt`, `--role`, the folder's default prompt), `--max-length`,
truncation, output and `--precision` as the JAX path (int8/uint8 ranges from the folder's
calibration.json); the model must be an export folder made with `jasper-jax export --onnx`.
"""

from __future__ import annotations

import argparse
import logging

from jasper_jax.commands.encode_io import npy_writer, read_texts, write_outputs
from jasper_jax.commands.encode_precision import PrecisionPlan
from jasper_jax.encode import check_finite
from jasper_jax.errors import UserError
from jasper_jax.onnx_encoder import OnnxEncoder

log = logging.getLogger(__name__)
BACKENDS = ("jax", "onnx", "onnx-int8")


def choose_prompt(encoder: OnnxEncoder, prompt: str | None, role: str | None) -> str | None:
    """As `encode_io.role_prompt`: `prompt`, else the folder's prompt for `role`, else its
    default prompt, else none."""
    if prompt is not None and role is not None:
        raise UserError("--prompt and --role both choose the prompt; give one of them")
    if prompt is not None:
        return prompt
    name = role or encoder.default_prompt_name
    return encoder.prompts.get(name) or None if name else None


def encode_onnx_main(args: argparse.Namespace, plan: PrecisionPlan) -> int:
    """Encodes `--input` with the ONNX graph of `--head` (fp32, or int8 for onnx-int8) and
    stores the vectors in `plan`'s precision (int8/uint8 with the folder's calibration.json)."""
    if args.images or args.chunks:
        raise UserError(f"--backend {args.backend} encodes texts; drop --images / --chunks")
    texts = read_texts(args.input)
    encoder = OnnxEncoder(
        args.model, head=args.head, int8=args.backend == "onnx-int8", batch_size=args.batch_size
    )
    plan.check_head(encoder.head)
    prompt = choose_prompt(encoder, args.prompt, args.role)
    vectors = encoder.encode(texts, prompt=prompt, max_length=args.max_length, progress=True)
    check_finite(vectors, "vectors", line_of=args.input)
    ranges = plan.ranges(None, encoder.head, vectors.shape[1], args.max_length)  # saved only
    write_outputs({args.output: npy_writer(plan.store(vectors, ranges))})
    log.info(
        "wrote %s: %d vectors as %s with %s (%d texts reached max length and were truncated)",
        args.output,
        len(vectors),
        plan.describe(*vectors.shape),
        encoder.path.name,
        encoder.last_truncated,
    )
    return 0
