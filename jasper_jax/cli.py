"""`jasper-jax` command line: a thin layer that parses flags and calls library code.

One error path for every sub-command: an expected failure (bad input or config, a missing,
damaged or unreadable file, a full disk, no permission, a refused pickle, no network) is one
line on stderr naming the problem and the fix, exit code 2, no traceback. Anything else is a
bug: its traceback is printed and the last line says so (exit code 1).
"""

from __future__ import annotations

import argparse
import errno
import logging
import pickle
import sys
import traceback
from collections.abc import Callable, Sequence

from jasper_jax.errors import UserError, one_line

Command = Callable[[argparse.Namespace], int]


def _encode_args(p: argparse.ArgumentParser) -> Command:
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
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=None, help="tokens; default: the model's")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor mesh shape")

    def run(args: argparse.Namespace) -> int:
        from jasper_jax.commands.encode import encode_main

        return encode_main(args)

    return run


def _train_args(p: argparse.ArgumentParser) -> Command:
    from jasper_jax.commands.train import add_distributed_args

    p.add_argument("--config", required=True, help="configs/NAME.py[:STAGE] or NAME[:STAGE]")
    p.add_argument("--workdir", required=True, help="checkpoints, TensorBoard logs, run.json")
    add_distributed_args(p)

    def run(args: argparse.Namespace) -> int:
        from jasper_jax.commands.train import train_main

        return train_main(args)

    return run


def _teachers_args(p: argparse.ArgumentParser) -> Command:
    from jasper_jax.commands.teachers import add_teachers_args, teachers_main

    add_teachers_args(p)
    return teachers_main


def _captions_args(p: argparse.ArgumentParser) -> Command:
    from jasper_jax.commands.captions import add_captions_args, captions_main

    add_captions_args(p)
    return captions_main


def _demo_args(p: argparse.ArgumentParser) -> Command:
    from jasper_jax.commands.demo import add_demo_args, demo_main

    add_demo_args(p)
    return demo_main


def _export_args(p: argparse.ArgumentParser) -> Command:
    from jasper_jax.commands.export import add_export_args, export_main

    add_export_args(p)
    return export_main


def _eval_args(p: argparse.ArgumentParser) -> Command:
    from jasper_jax.commands.evaluate import add_eval_args, eval_main

    add_eval_args(p)
    return eval_main


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Command]]] = {
    "captions": ("caption vectors of images from the frozen student (stage 4)", _captions_args),
    "demo": ("the embedded default end to end: teacher vectors, stages 1-4, a table", _demo_args),
    "encode": ("encode texts (or images) into L2-normalised vectors (.npy)", _encode_args),
    "eval": ("score a student vs its teachers: fidelity, retrieval, robustness", _eval_args),
    "export": ("export a workdir as a Hugging Face / sentence-transformers folder", _export_args),
    "teachers": ("precompute teacher vectors into a TFDS dataset", _teachers_args),
    "train": ("train one stage: --config FILE[:STAGE] [--config.a.b=v ...]", _train_args),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    parser = argparse.ArgumentParser(
        prog="jasper-jax", description="Jasper/Stella embedding distillation in JAX/Flax."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    runners = {}
    for name, (help_text, add) in SUBCOMMANDS.items():
        runners[name] = add(sub.add_parser(name, help=help_text, description=help_text))
    return parser, runners


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    parser, runners = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        args.overrides = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return runners[args.command](args)
    except KeyboardInterrupt:
        print(f"jasper-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        message = expected_failure(e)
        if message is None:
            traceback.print_exc()
            print(
                f"jasper-jax {args.command}: unexpected error (a bug in jasper-jax, not in your "
                "input): please report it with the traceback above",
                file=sys.stderr,
            )
            return 1
        print(f"jasper-jax {args.command}: error: {message}", file=sys.stderr)
        return 2


# errno -> what to do about it; the OSError itself names the file.
_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free space (or pick a folder on a bigger disk) and re-run; "
    "finished work is kept and resumed",
    errno.EDQUOT: "the disk quota is exhausted: free space and re-run",
    errno.EROFS: "the filesystem is read-only: choose a writable folder",
    errno.EACCES: "no permission: choose a folder you may write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you own",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EEXIST: "the path exists already: choose another one",
    errno.ENOTDIR: "a path component is a file, not a folder: choose another path",
    errno.EISDIR: "a folder was given where a file is expected: check the path",
    errno.ENAMETOOLONG: "the path is too long: choose a shorter one",
    errno.EIO: "the storage reported an I/O error: check the disk, then re-run",
}


def expected_failure(error: BaseException) -> str | None:
    """The one-line message of an expected failure, or None for a bug (keep the traceback)."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, pickle.UnpicklingError):
        return (
            f"refused to unpickle a file ({error}): it holds objects other than tensors; load "
            "only trusted files, or convert the model to safetensors"
        )
    if isinstance(error, MemoryError):
        return "out of memory: lower --batch-size (or data.batch_size) or the text length"
    if isinstance(error, (ConnectionError, TimeoutError)):
        return f"network failure ({error}): check the connection or use local folders"
    if isinstance(error, OSError) and error.errno in _OS_FIXES:
        where = f" {error.filename}" if error.filename else ""
        return f"{error.strerror or error}{where}; {_OS_FIXES[error.errno]}"
    text = str(error)
    if "No space left on device" in text:  # libraries that wrap ENOSPC in their own errors
        return f"{one_line(text)}; {_OS_FIXES[errno.ENOSPC]}"
    return None


if __name__ == "__main__":
    sys.exit(main())
