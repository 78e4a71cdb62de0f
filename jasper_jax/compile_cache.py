"""A persistent XLA compilation cache, so that a second run of a command does not compile again.

JAX writes each compiled program that took at least `MIN_COMPILE_SECS` to compile into a folder
and a later process with the same program, shapes, flags, JAX version and devices loads it
instead of compiling (CPU, GPU and TPU). Every `jasper-jax` command enables it
(`--compile-cache DIR|off`).

Folder: the argument, else `$JASPER_JAX_COMPILE_CACHE`, else `$JASPER_JAX_CACHE/xla`, else
`$XDG_CACHE_HOME/jasper-jax/xla` (default `~/.cache/jasper-jax/xla`). "off" (or "none")
disables it. A folder that cannot be created or written is one warning, then no cache: the
cache never fails a run.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache

from jasper_jax.paths import is_remote, user_cache_root

log = logging.getLogger(__name__)
ENV = "JASPER_JAX_COMPILE_CACHE"
OFF = ("off", "none")
# Below this, compiling is about as fast as reading the entry back. The text encoder's programs
# take seconds on CPU; the small helpers (normalise, slicing) stay out of the folder.
MIN_COMPILE_SECS = 0.5
# Past this the least recently used entries (JAX's own `*-cache` files only) are removed.
MAX_BYTES = 4 << 30


def default_folder() -> Path:
    """Where the cache goes when no folder is given (see the module docstring)."""
    return user_cache_root() / "xla"


def resolve(folder: str | None) -> Path | None:
    """The folder to use, or None for "off" (or a URL: the cache is local to each host)."""
    value = folder if folder is not None else os.environ.get(ENV)
    if value is None or not value.strip():
        return default_folder()
    if value.strip().lower() in OFF:
        return None
    if is_remote(value):
        log.warning("compilation cache off: %s is not a local folder", value)
        return None
    return Path(value).expanduser()


def _writable(folder: Path) -> bool:
    """Creates the folder and writes (then removes) a probe file in it; False with one warning
    when that fails (read-only disk, no permission, a file in the way)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        log.warning("compilation cache off: cannot write %s (%s)", folder, e.strerror or e)
        return False
    return True


def enable(folder: str | None = None, *, min_compile_secs: float = MIN_COMPILE_SECS) -> Path | None:
    """Turns the persistent compilation cache on at `folder` (see the module docstring for the
    default) and returns the folder; None when it is off or the folder is not writable.

    Call before the first compile; a second call switches this process to the new folder.
    """
    path = resolve(folder)
    if path is not None and not _writable(path):
        path = None
    jax.config.update("jax_compilation_cache_dir", None if path is None else str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    compilation_cache.reset_cache()  # JAX opens the folder once; forget an earlier one
    return path
