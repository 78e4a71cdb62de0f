"""``jasper-jax captions``: images + captions -> a caption dataset with the student's vectors.

The stage-4 counterpart of ``jasper-jax teachers``: the "teacher" is the frozen stage-3 student,
whose vectors of each caption (every head) become the targets of the vision tower. Examples::

    jasper-jax captions --student runs/demo/stage3 --shapes 6000 --output data/images/train
    jasper-jax captions --student runs/demo/stage3 --manifest captions.jsonl --output data/cap

A manifest is JSONL: {"image": "relative/or/absolute/path.jpg", "caption": "...", "tag": "..."}
per line (tag optional; evaluation reports recall per tag).
"""

from __future__ import annotations

import argparse

from jasper_jax.data.caption_dataset import (
    build_caption_dataset,
    manifest_examples,
    shapes_examples,
)
from jasper_jax.data.shapes import SPLITS
from jasper_jax.errors import UserError


def add_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``captions`` sub-command's flags to ``parser``."""
    parser.add_argument(
        "--student", required=True, help="frozen text student: a stage-3 training workdir"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="JSONL file of {image, caption[, tag]} lines")
    source.add_argument("--shapes", type=int, help="generate N synthetic shapes images instead")
    parser.add_argument("--split", choices=sorted(SPLITS), default="train", help="shapes split")
    parser.add_argument("--seed", type=int, default=0, help="shapes seed")
    parser.add_argument("--image-size", type=int, default=64, help="shapes image side (pixels)")
    parser.add_argument("--output", required=True, help="output folder of the caption dataset")
    parser.add_argument("--batch-size", type=int, default=64, help="caption encode batch size")
    parser.add_argument("--overwrite", action="store_true", help="replace a different dataset")


def main(args: argparse.Namespace) -> int:
    """Run the sub-command; returns the exit code (``UserError`` propagates to the CLI)."""
    if args.shapes is not None and args.shapes < 1:
        raise UserError(f"--shapes {args.shapes}: must be a positive number of images")
    if args.image_size < 8:
        raise UserError(f"--image-size {args.image_size}: must be at least 8 pixels")
    if args.manifest:
        examples = manifest_examples(args.manifest)
    else:
        examples = shapes_examples(args.split, args.shapes, args.seed, args.image_size)
    folder = build_caption_dataset(
        examples, args.student, args.output, batch_size=args.batch_size, overwrite=args.overwrite
    )
    print(f"caption dataset ready: {folder} ({len(examples)} images)")
    return 0
