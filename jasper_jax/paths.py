"""Workdir paths that may be local folders or cloud URLs (`gs://bucket/run`).

On a TPU pod every host must see the same workdir, so checkpoints and logs go to a bucket;
`etils.epath` gives `pathlib`-like paths for both (gs:// needs the `gcs` extra: gcsfs).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    return "://" in str(path)


def as_path(path: PathLike) -> epath.Path:
    """An `epath.Path`: absolute for local folders, the URL itself for cloud storage."""
    return epath.Path(path) if is_remote(path) else epath.Path(Path(path).absolute())


def canonical(path: PathLike) -> str:
    """A stable name of a location: resolved local path, or the URL as given."""
    return str(path) if is_remote(path) else str(Path(path).resolve())


def write_json_atomic(path: PathLike, payload: dict[str, Any]) -> None:
    """Readers see the old file or the new one, never half of it (a cloud object write is
    atomic already; a local one goes through a temp file and a rename)."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True))


def write_text_atomic(path: PathLike, text: str) -> None:
    """UTF-8 text written so that readers see the old file or the new one (see above)."""
    if is_remote(path):
        epath.Path(path).write_text(text)
        return
    fd, tmp = tempfile.mkstemp(dir=Path(path).parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def save_npy_atomic(path: str | Path, array: Any) -> None:
    """An .npy written beside the target, then renamed: an existing file is never left
    half-written (local paths)."""
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
