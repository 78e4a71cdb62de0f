"""A disk cache of teacher encodings, so that evaluating many students (a sweep, the demo's
stages, `benchmarks/robustness_options.py`) encodes the fixed teachers once.

An entry is one `.npy` file [N, dim] float32 named by the SHA-256 of what determines it: the
teacher's identity (name, model and tokenizer fingerprints, prompt, max length), the prompt
prepended for this call, and the texts themselves. A changed teacher folder or text set is a
miss, never a stale hit. Entries are written through a temp file and a rename; an unreadable
or mismatched entry is logged, recomputed and replaced.

Location: `--teacher-cache DIR`, else `$JASPER_JAX_CACHE/teacher-encodings`, else
`$XDG_CACHE_HOME/jasper-jax/teacher-encodings` (default `~/.cache/...`); "off" disables it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jasper_jax.paths import save_npy_atomic, user_cache_root

log = logging.getLogger(__name__)
OFF = "off"


def default_cache_dir() -> Path:
    """Where teacher encodings go when no folder is given (see the module docstring)."""
    return user_cache_root() / "teacher-encodings"


def resolve_cache_dir(option: str | None) -> Path | None:
    """--teacher-cache value -> folder, or None for "off"."""
    if option is None:
        return default_cache_dir()
    return None if option.strip().lower() == OFF else Path(option).expanduser()


def entry_key(identity: dict, prompt: str | None, texts: Sequence[str]) -> str:
    """SHA-256 hex of the teacher identity, the call's prompt and every text (length-prefixed,
    so that ["ab", "c"] and ["a", "bc"] differ)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"teacher": identity, "prompt": prompt}, sort_keys=True).encode())
    for text in texts:
        raw = text.encode("utf-8")
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
    return digest.hexdigest()


def _load_valid(path: Path, rows: int) -> np.ndarray | None:
    """The entry if it is a finite float32 [rows, dim] array; None (with a warning) otherwise."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        log.warning("teacher cache entry %s is unreadable (%s); recomputing it", path, err)
        return None
    if array.ndim != 2 or array.shape[0] != rows or array.dtype != np.float32:
        log.warning(
            "teacher cache entry %s holds %s %s, expected %d rows of float32; recomputing it",
            path,
            array.shape,
            array.dtype,
            rows,
        )
        return None
    if not np.isfinite(array).all():
        log.warning("teacher cache entry %s holds NaN/inf; recomputing it", path)
        return None
    return array


def cached_encode(
    folder: Path | None,
    identity: dict,
    prompt: str | None,
    texts: Sequence[str],
    compute: Callable[[list[str]], np.ndarray],
) -> np.ndarray:
    """`compute(texts)` -> [len(texts), dim] float32, read from / written to `folder`.

    folder None: no cache (compute every time). A cache folder that cannot be written is
    reported once per call and the result is still returned.
    """
    texts = list(texts)
    if folder is None:
        return np.asarray(compute(texts), np.float32)
    path = Path(folder) / f"{entry_key(identity, prompt, texts)}.npy"
    if path.is_file():
        hit = _load_valid(path, len(texts))
        if hit is not None:
            name = identity.get("name")
            log.info("teacher %s: %d texts from the cache %s", name, len(texts), path)
            return hit
    array = np.asarray(compute(texts), np.float32)
    if array.ndim == 2 and array.shape[0] == len(texts) and np.isfinite(array).all():
        try:
            save_npy_atomic(path, array)
        except OSError as err:
            log.warning("teacher cache %s is not writable (%s); nothing is cached", folder, err)
    return array
