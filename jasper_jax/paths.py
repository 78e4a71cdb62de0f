"""Workdir paths that may be local folders or cloud URLs (`gs://bucket/run`).

On a TPU pod every host must see the same workdir, so checkpoints and logs go to a bucket;
`etils.epath` gives `pathlib`-like paths for both (gs:// needs the `gcs` extra: gcsfs).
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from jasper_jax.errors import UserError

PathLike = str | os.PathLike
# Temporary files of the atomic writes below start with this; a later run of the same command
# (holding the folder's lock) removes those an interrupted one left (`locks.remove_leftovers`).
TMP_PREFIX = ".jasper-tmp-"
TAG_PATTERN = re.compile(r"(\d+)@([^~/]+)~")


def host_name() -> str:
    return socket.gethostname().split(".")[0]


def process_tag() -> str:
    """`PID@HOST~` of this process, for temporary names (`.out.tmp-PID@HOST~xxxx`): a later
    run tells a dead writer's leftovers from a live one's (`locks.remove_leftovers`)."""
    return f"{os.getpid()}@{host_name()}~"


def user_cache_root() -> Path:
    """Root of the per-user caches (compiled programs, held-out teacher encodings):
    `$JASPER_JAX_CACHE`, else `$XDG_CACHE_HOME/jasper-jax` (default `~/.cache/jasper-jax`)."""
    if os.environ.get("JASPER_JAX_CACHE"):
        return Path(os.environ["JASPER_JAX_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jasper-jax"


def is_remote(path: PathLike) -> bool:
    return "://" in str(path)


def as_path(path: PathLike) -> epath.Path:
    """An `epath.Path`: absolute for local folders, the URL itself for cloud storage."""
    return epath.Path(path) if is_remote(path) else epath.Path(Path(path).absolute())


def canonical(path: PathLike) -> str:
    """A stable name of a location: resolved local path, or the URL as given."""
    return str(path) if is_remote(path) else str(Path(path).resolve())


def current_umask() -> int:
    """The process umask, read without changing it (Linux /proc), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: PathLike, directory: bool = False) -> None:
    """Gives a file (0666) or folder (0777) made by `tempfile` (0600 / 0700) the mode a plain
    `open` / `mkdir` would have had under the umask; local paths only."""
    if not is_remote(path):
        os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def write_json_atomic(path: PathLike, payload: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of it (a cloud object write is
    atomic already; a local one goes through a temp file and a rename)."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


def write_text_atomic(path: PathLike, text: str) -> None:
    """UTF-8 text written so that readers see the old file or the new one (see above)."""
    if is_remote(path):
        epath.Path(path).write_text(text)
        return
    fd, tmp = tempfile.mkstemp(
        dir=Path(path).parent, prefix=TMP_PREFIX + process_tag(), suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_npy_atomic(path: str | Path, array: Any) -> None:
    """An .npy written beside the target, then renamed: an existing file is never left
    half-written (local paths)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=path.parent, prefix=TMP_PREFIX + process_tag(), suffix=".npy.tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


DEFAULT_JSON_FIX = "restore it, or re-download / re-export the model"


def read_json(path: PathLike, fix: str = DEFAULT_JSON_FIX) -> Any:
    """A JSON file (local or gs://) that the user's model folder or workdir holds; a missing,
    non-UTF-8 or truncated file is a UserError naming the file, where it breaks and `fix`."""
    path = as_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise UserError(f"{path} is missing: {fix}") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}): {fix}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{path} is not valid JSON (line {e.lineno} col {e.colno}: {e.msg}): {fix}"
        ) from e
