"""`jasper-jax encode`: one text per line in, an .npy of unit vectors out (row i = line i).

With `--images` (a stage-4 model): image files and folders in, row i = the i-th image, folders
expanded in sorted order; the order is also written to `OUTPUT.paths.txt`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from jasper_jax.errors import UserError
from jasper_jax.paths import save_npy_atomic

log = logging.getLogger(__name__)


def read_lines(path: str | Path) -> list[str]:
    """Lines of a UTF-8 file without their line endings; names the first bad byte otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise UserError(f"input file {path} does not exist") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path} is not UTF-8 (byte {e.start}, line {line}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path} > fixed.txt`"
        ) from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    return [line.rstrip("\r") for line in lines]


def parse_mesh(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(x) for x in text.split(","))
    except ValueError as e:
        raise UserError(f"--mesh {text!r}: expected three integers like 2,1,4") from e
    if len(shape) != 3:
        raise UserError(f"--mesh {text!r}: expected data,fsdp,tensor, e.g. -1,1,1")
    return shape  # type: ignore[return-value]


def encode_main(args: argparse.Namespace) -> int:
    from jasper_jax import sharding
    from jasper_jax.encode import TextEncoder, resolve_head
    from jasper_jax.workdir import load_any_model

    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.max_length is not None and args.max_length < 2:
        raise UserError(f"--max-length {args.max_length}: must be at least 2 tokens")
    if args.images:
        if args.chunks:
            raise UserError("--chunks applies to texts; drop it with --images")
        return encode_images_main(args)
    if args.chunks:
        from jasper_jax.commands.encode_chunks import encode_chunks_main

        return encode_chunks_main(args)
    texts = read_lines(args.input)
    model = load_any_model(args.model)
    resolve_head(model.config, args.head)  # fail before any compile
    encoder = TextEncoder(
        model,
        dtype=args.dtype,
        mesh=sharding.make_mesh(parse_mesh(args.mesh)),
        batch_size=args.batch_size,
    )
    vectors = encoder.encode(
        texts, head=args.head, prompt=args.prompt, max_length=args.max_length, progress=True
    )
    save_npy_atomic(args.output, vectors)
    log.info(
        "wrote %s: %d x %d float32 (%d texts reached max length and were truncated)",
        args.output,
        *vectors.shape,
        encoder.last_truncated,
    )
    return 0


def encode_images_main(args: argparse.Namespace) -> int:
    """`--images`: every image is decoded before any compute, so a bad file fails the run early."""
    from jasper_jax import sharding
    from jasper_jax.data.images import list_images
    from jasper_jax.encode import resolve_head
    from jasper_jax.encode_images import ImageEncoder, load_image_model

    if args.prompt or args.max_length is not None:
        raise UserError("--prompt and --max-length apply to texts; drop them with --images")
    paths = list_images(args.images)
    model = load_image_model(args.model)
    resolve_head(model.config.text, args.head)  # fail before any compile
    encoder = ImageEncoder(
        model.config,
        model.params,
        dtype=args.dtype,
        mesh=sharding.make_mesh(parse_mesh(args.mesh)),
        batch_size=args.batch_size,
    )
    encoder.check(paths)
    vectors = encoder.encode(paths, head=args.head)
    save_npy_atomic(args.output, vectors)
    listing = Path(f"{args.output}.paths.txt")
    listing.write_text("".join(f"{p}\n" for p in paths), encoding="utf-8")
    log.info("wrote %s: %d x %d float32 (row order in %s)", args.output, *vectors.shape, listing)
    return 0
