"""`jasper-jax` command line: a thin layer that parses flags and calls library code.

One error path for every sub-command: an expected failure (bad input or config, a missing,
damaged or unreadable file, a full disk, no permission, a refused pickle, no network) is one
line on stderr naming the problem and the fix, exit code 2, no traceback. Anything else is a
bug: its traceback is printed and the last line says so (exit code 1).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import pickle
import sys
import traceback
from collections.abc import Sequence

from jasper_jax.errors import UserError, one_line

# name -> (help, the module that has `add_args(parser)` and `main(args) -> int`). A module is
# imported only when its command runs (or its flags are needed): `--help` does not load JAX.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "captions": (
        "caption vectors of images from the frozen student (stage 4)",
        "jasper_jax.commands.captions",
    ),
    "demo": (
        "the embedded default end to end: teacher vectors, stages 1-4, a table",
        "jasper_jax.commands.demo",
    ),
    "encode": (
        "encode texts (or images) into L2-normalised vectors (.npy)",
        "jasper_jax.commands.encode",
    ),
    "eval": (
        "score a student vs its teachers: fidelity, retrieval, robustness",
        "jasper_jax.commands.evaluate",
    ),
    "export": (
        "export a workdir as a Hugging Face / sentence-transformers folder",
        "jasper_jax.commands.export",
    ),
    "teachers": (
        "precompute teacher vectors into a TFDS dataset",
        "jasper_jax.commands.teachers",
    ),
    "train": (
        "train one stage: --config FILE[:STAGE] [--config.a.b=v ...]",
        "jasper_jax.commands.train",
    ),
}
COMPILE_CACHE_MODULE = "jasper_jax.compile_cache"  # imports JAX: loaded once a command runs


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every sub-command, with the flags (so the module) of `command` only; of
    every command when `command` is None, of none when it is "" (`jasper-jax --help`)."""
    parser = argparse.ArgumentParser(
        prog="jasper-jax", description="Jasper/Stella embedding distillation in JAX/Flax."
    )
    _add_compile_cache_flag(parser, default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, module) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_compile_cache_flag(p, default=argparse.SUPPRESS)  # keeps a value given before
        if command is None or command == name:
            importlib.import_module(module).add_args(p)
    return parser


def _add_compile_cache_flag(parser: argparse.ArgumentParser, default: object) -> None:
    """`--compile-cache DIR|off`, before or after the sub-command's name."""
    parser.add_argument(
        "--compile-cache",
        metavar="DIR|off",
        default=default,
        help="persistent XLA compilation cache, so a second run does not compile again "
        "(default: $JASPER_JAX_COMPILE_CACHE, else $JASPER_JAX_CACHE/xla, else "
        "~/.cache/jasper-jax/xla; off: none)",
    )


def _command_in(argv: Sequence[str]) -> str:
    """The sub-command named in `argv` (its first word that is one, past the top-level flags'
    values), or "" when there is none (`jasper-jax --help`: parsing reports it)."""
    words = iter(argv)
    for word in words:
        if word == "--compile-cache":
            next(words, None)
        elif word in SUBCOMMANDS:
            return word
    return ""


def _configure_logging() -> None:
    """INFO lines (progress, losses, ETA) on stderr with a timestamp.

    Not `logging.basicConfig`: a library imported earlier (orbax logs through the root logger at
    import) may have given the root a plain stderr handler, which makes basicConfig a no-op and
    leaves the root at WARNING (the commands' modules, imported after this, find our handler).
    Plain handlers get our format; other handlers (a test's log capture) are left alone.
    """
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler())
    for handler in root.handlers:
        if type(handler) is logging.StreamHandler:
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    _configure_logging()
    for noisy in ("absl", "orbax", "jax._src", "tensorflow_datasets", "etils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_in(argv))
    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        args.overrides = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        importlib.import_module(COMPILE_CACHE_MODULE).enable(args.compile_cache)
        return importlib.import_module(SUBCOMMANDS[args.command][1]).main(args)
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
