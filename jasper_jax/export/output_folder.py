"""Where an export may write, and how it replaces a folder without ever leaving half of one.

The folder is built beside `OUT` under a temporary name and renamed into place, so `OUT` is
either the old folder or the complete new one, never half-written. `--overwrite` replaces only
a previous export (a folder holding `jasper_export.json`, the marker), never the source
workdir, the current folder, home or a parent of those. One export at a time writes an `OUT`
(a lock beside it); temporary folders carry the writer's process tag, so the next export
removes those of a killed one.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jasper_jax import __version__
from jasper_jax.errors import UserError
from jasper_jax.locks import FolderLock, process_tag, remove_leftovers, tag_alive

log = logging.getLogger(__name__)
MARKER = "jasper_export.json"  # what `--overwrite` may replace: a folder an export wrote
MARKER_FORMAT = 1


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies below it (both resolved)."""
    return path == folder or folder in path.parents


def _unsafe_reason(output: Path, workdir: Path | None) -> str | None:
    """Why replacing the (resolved) `output` would delete what export did not write, if so."""
    if output.parent == output:
        return "is a filesystem root"
    if _inside(Path.home().resolve(), output):
        return "is your home folder or one of its parents"
    if _inside(Path.cwd().resolve(), output):
        return "is the current folder or one of its parents"
    if workdir is None:
        return None
    if output == workdir:
        return "is the source --workdir"
    if _inside(workdir, output):
        return f"holds the source --workdir {workdir}"
    return None


def check_output(output: Path, overwrite: bool, workdir: str | Path | None = None) -> None:
    """Refuses an `output` (resolved) that exists, unless `overwrite` and it is a previous export
    that is none of: the source workdir or a parent of it, the current folder or a parent of it,
    home or a parent of it, a filesystem root.

    Raises:
      UserError: naming the reason and the fix; nothing has been touched.
    """
    if not output.exists():
        return
    reason = _unsafe_reason(output, None if workdir is None else Path(workdir).resolve())
    if reason:
        raise UserError(
            f"--output {output} {reason}; export writes a new folder (--overwrite replaces only a "
            "previous export): choose a new --output (nothing was touched)"
        )
    if not output.is_dir():
        raise UserError(f"--output {output} is a file, not a folder; choose another path")
    if not overwrite:
        raise UserError(
            f"output folder {output} already exists; pass --overwrite to replace it, or choose "
            "another --output (nothing was written)"
        )
    if not (output / MARKER).is_file():
        raise UserError(
            f"{output} exists and is not a jasper-jax export (no {MARKER}); choose a new "
            "--output or remove it yourself"
        )


def marker_record(workdir: str | Path, step: int, default_head: str) -> dict[str, Any]:
    """The marker's content: what this folder was exported from; `--overwrite` requires it."""
    return {
        "format": MARKER_FORMAT,
        "jasper_jax_version": __version__,
        "workdir": str(Path(workdir).resolve()),
        "step": int(step),
        "default_head": default_head,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _temp_prefix(output: Path, kind: str) -> str:
    """`.NAME.tmp-PID@HOST~` / `.NAME.old-PID@HOST~`: a later export can tell a dead writer's."""
    return f".{output.name}.{kind}-{process_tag()}"


def leftover_patterns(output: Path) -> list[str]:
    """Globs of the temporary folders an export of `output` makes (any process, old or new)."""
    name = glob.escape(output.name)
    return [f".{name}.tmp-*", f".{name}.old-*"]


def restore_interrupted(output: Path) -> None:
    """A killed export may have moved the previous export aside (`.NAME.old-*/NAME`) without
    putting the new one in place: moves it back, before the leftovers are removed."""
    if output.exists():
        return
    prefix = f".{output.name}.old-"
    for old in sorted(output.parent.glob(leftover_patterns(output)[1]), reverse=True):
        kept = old / output.name
        if kept.is_dir() and not tag_alive(old.name[len(prefix) :]):
            kept.rename(output)
            log.warning("restored %s, moved aside by an interrupted export", output)
            return


@contextlib.contextmanager
def claimed_output(output: Path) -> Iterator[None]:
    """Holds the lock beside `output` (one export at a time) after putting back what a killed
    export moved aside and removing the temporary folders of dead writers."""
    lock = FolderLock(
        output.parent, "export", name=f".{output.name}.lock", what="output folder", flag="--output"
    )
    with lock:
        restore_interrupted(output)
        remove_leftovers(output.parent, leftover_patterns(output))
        yield


@contextlib.contextmanager
def staging_folder(output: Path) -> Iterator[Path]:
    """An empty temporary folder beside `output`, removed if the block fails."""
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=_temp_prefix(output, "tmp")))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def install_folder(built: Path, output: Path) -> None:
    """Moves a finished folder into place; an old `output` is removed only after the move, and
    put back if the move fails."""
    old = None
    if output.exists():
        old = Path(tempfile.mkdtemp(dir=output.parent, prefix=_temp_prefix(output, "old")))
        try:
            output.rename(old / output.name)
        except BaseException:
            old.rmdir()
            raise
    try:
        built.rename(output)
    except BaseException:
        if old is not None:
            (old / output.name).rename(output)
            old.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
