"""Resumable, atomic builds of TFDS datasets, shared by the teacher and the caption datasets.

Layout of a build's output folder::

    OUTPUT/_parts/plan.json        what is being built (the build's identity and layout)
    OUTPUT/_parts/rows-A-B.npy     finished blocks of vectors, rows [A, B), each written atomically
    OUTPUT/dataset/                the finished TFDS array_record dataset
    OUTPUT/dataset/checksums.json  size and SHA-256 of every file, checked on open

A re-run keeps finished blocks (a block file exists only when complete: :func:`atomic_file`).
The dataset is prepared in a temporary folder of OUTPUT and renamed into place
(:func:`build_and_install`), so a reader sees the old dataset or the new one, never a mix.
Temporary names carry the writer's ``process_tag``: the next run, under the output's lock,
removes what a killed one left (``PARTS_LEFTOVERS``, ``OUTPUT_LEFTOVERS``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any, BinaryIO

import tensorflow_datasets as tfds

from jasper_jax.errors import UserError, one_line
from jasper_jax.locks import process_tag
from jasper_jax.paths import honour_umask, read_json

DATASET_DIR = "dataset"
PARTS_DIR = "_parts"
PLAN = "plan.json"
CHECKSUMS = "checksums.json"
_TFDS_JSON = ("dataset_info.json", "features.json", "metadata.json")
_BLOCK = 1 << 20  # hashing reads 1 MiB at a time: datasets of 50 GB need no more memory
# Temporaries of a killed run: ours carry a process tag (kept while that process lives); the
# untagged ones are an older version's (tempfile names), removed under the lock.
PARTS_LEFTOVERS = ("tmp*.npy", "tmp*.npz", ".*.tmp", ".plan.json.*", ".slice-*.done.*")
OUTPUT_LEFTOVERS = (".build-*", ".retired-*")
log = logging.getLogger(__name__)
_VERIFIED: dict[str, tuple] = {}  # dataset folder -> file stats when it was last verified


# --- writing: atomic files, parts, identity ------------------------------------------------


@contextlib.contextmanager
def atomic_file(path: pathlib.Path) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as f:`` ``path`` appears only complete, with the umask's mode.

    The temporary name carries this process's tag, so a later run (under the lock) removes it
    if this process is killed; any failure (a full disk) removes it at once.
    """
    tmp = path.with_name(f".{path.name}.{process_tag()}{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # plain open: the mode follows the umask
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomically(path: pathlib.Path, payload: bytes) -> None:
    """``payload`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as f:
        f.write(payload)


def block_path(parts: pathlib.Path, start: int, stop: int) -> pathlib.Path:
    """The file of the finished block of rows [start, stop) in ``parts``."""
    return parts / f"rows-{start:010d}-{stop:010d}.npy"


def write_plan(parts: pathlib.Path, plan: dict) -> None:
    """Creates ``parts`` and writes ``plan.json`` (atomically) into it."""
    parts.mkdir(parents=True, exist_ok=True)
    write_atomically(parts / PLAN, json.dumps(plan, indent=2).encode())


def read_plan(plan_file: pathlib.Path) -> Any:
    """The JSON value of an unfinished build's ``plan.json``; None when it is damaged."""
    try:
        return json.loads(plan_file.read_text(encoding="utf-8"))
    except ValueError:
        return None


def finished_identity(output: pathlib.Path) -> dict | None:
    """The identity of the finished dataset in ``output``; None if there is none."""
    info = output / DATASET_DIR / "metadata.json"
    if not info.is_file():
        return None
    try:
        return json.loads(info.read_text(encoding="utf-8")).get("identity", {})
    except (ValueError, AttributeError):  # damaged: replaced only with --overwrite
        return {"unreadable": str(info)}


def refuse_foreign_dataset(folder: pathlib.Path) -> None:
    """A ``dataset`` folder that jasper-jax did not write is never replaced, not even with
    --overwrite: the refusal names it."""
    if not is_ours(folder):
        raise UserError(
            f"{folder} exists and is not a dataset jasper-jax wrote; fix: move it away or "
            "choose another --output folder"
        )


def is_ours(folder: pathlib.Path) -> bool:
    """Whether a dataset folder may be replaced: missing, empty, or written by jasper-jax."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    if (folder / "metadata.json").is_file() or (folder / CHECKSUMS).is_file():
        return True
    try:
        info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
        return str(info.get("moduleName", "")).startswith("jasper_jax.")
    except (OSError, ValueError, AttributeError):
        return not any(folder.iterdir())


# --- installing: prepare in a temporary folder, checksum, rename into place ----------------


def build_and_install(
    builder_class: type, output: pathlib.Path, target: pathlib.Path, **fields: Any
) -> None:
    """Prepares the TFDS ``builder_class(**fields)`` as array_record in a temporary folder of
    ``output`` and installs the result at ``target`` (see :func:`install`)."""
    with build_folder(output) as tmp:
        builder = builder_class(
            **fields, data_dir=os.path.join(tmp, "tfds"), file_format="array_record"
        )
        builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"))
        install(pathlib.Path(builder.data_dir), target)


@contextlib.contextmanager
def build_folder(output: pathlib.Path) -> Iterator[str]:
    """A temporary folder in ``output`` named with this process's tag (see OUTPUT_LEFTOVERS),
    removed on the way out whatever happens (a full disk)."""
    with tempfile.TemporaryDirectory(dir=output, prefix=f".build-{process_tag()}") as tmp:
        yield tmp


def install(built: pathlib.Path, target: pathlib.Path) -> None:
    """Move a finished build to ``target`` with checksums and the umask's modes; an old dataset
    there is replaced, never mixed."""
    record_checksums(built)
    honour_umask(built, directory=True)  # tempfile made its parents 0700
    for path in built.iterdir():
        honour_umask(path, directory=path.is_dir())
    retired = None
    if target.exists():
        retired = target.with_name(f".retired-{process_tag()}{target.name}")
        os.replace(target, retired)
    os.replace(built, target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def record_checksums(folder: pathlib.Path) -> None:
    """Writes ``checksums.json``: size and SHA-256 of every file of a finished dataset folder."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != CHECKSUMS:
            files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    payload = {"algorithm": "sha256", "files": files}
    write_atomically(folder / CHECKSUMS, (json.dumps(payload, indent=2) + "\n").encode())


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# --- reading: a verified, finished dataset --------------------------------------------------


def dataset_folder(path: pathlib.Path) -> pathlib.Path:
    """The TFDS folder of a build output folder (its ``dataset/``), or ``path`` itself."""
    return path / DATASET_DIR if (path / DATASET_DIR / "dataset_info.json").is_file() else path


def verify_dataset_files(folder: pathlib.Path, fix: str) -> None:
    """Checks every file of a dataset folder against its ``checksums.json`` (size, SHA-256),
    so a damaged file stops the run now rather than at the step that reads it. A folder
    verified before in this process, whose files did not change since, is not read again.

    Raises:
      UserError: a file is missing, truncated or damaged (message names it and ``fix``).
    """
    sums = folder / CHECKSUMS
    if not sums.is_file():
        if str(folder.resolve()) in _VERIFIED:
            return  # warned already
        _VERIFIED[str(folder.resolve())] = ()
        log.warning(
            "dataset %s has no %s (built by an older jasper-jax): its files are not verified "
            "(a rebuild with --overwrite adds it)",
            folder,
            CHECKSUMS,
        )
        return
    files = _recorded_files(sums, fix)
    signature = _signature(folder, files, fix)
    if _VERIFIED.get(str(folder.resolve())) == signature:
        return
    started, size = time.monotonic(), 0
    for name, entry in files.items():
        path = folder / name
        if path.stat().st_size != entry["size"]:
            raise UserError(
                f"dataset file {path} is {path.stat().st_size} bytes, {entry['size']} when built "
                f"(truncated or damaged); fix: {fix}"
            )
        if _sha256(path) != entry["sha256"]:
            raise UserError(
                f"dataset file {path} is damaged (its SHA-256 differs from the one recorded in "
                f"{CHECKSUMS} at build time); fix: {fix}"
            )
        size += entry["size"]
    _VERIFIED[str(folder.resolve())] = signature
    log.info(
        "verified %d files (%.1f MB) of %s in %.1f s",
        len(files),
        size / 1e6,
        folder,
        time.monotonic() - started,
    )


def _recorded_files(sums: pathlib.Path, fix: str) -> dict[str, dict]:
    """The ``files`` of a checksums.json, checked for shape (names are plain file names)."""
    files = read_json_object(sums, fix).get("files")
    ok = isinstance(files, dict) and all(
        pathlib.PurePath(name).name == name
        and isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
        for name, entry in files.items()
    )
    if not ok:
        raise UserError(f"{sums} does not list files with size and sha256; fix: {fix}")
    return files


def _signature(folder: pathlib.Path, files: dict, fix: str) -> tuple:
    """(name, size, mtime, inode) of each listed file; a missing one is refused here."""
    out = []
    for name in files:
        try:
            stat = (folder / name).stat()
        except FileNotFoundError:
            raise UserError(f"dataset file {folder / name} is missing; fix: {fix}") from None
        out.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return tuple(out)


def read_json_object(path: pathlib.Path, fix: str) -> dict:
    """A JSON object file of a dataset; a missing, truncated or invalid one is a UserError."""
    value = read_json(path, f"fix: {fix}")
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a {type(value).__name__}, not a JSON object; fix: {fix}")
    return value


def open_tfds_folder(folder: pathlib.Path, fix: str) -> tuple[Any, Any, dict]:
    """(builder, ``train`` data source, metadata) of a finished dataset folder, its files
    verified first (:func:`verify_dataset_files`).

    Raises:
      UserError: a damaged, missing or unreadable file, named with ``fix``.
    """
    verify_dataset_files(folder, fix)
    for name in _TFDS_JSON:  # datasets without checksums: a clear error still
        read_json_object(folder / name, fix)
    try:
        builder = tfds.builder_from_directory(str(folder))
        shards = builder.info.splits["train"].filepaths
        source = builder.as_data_source(split="train")
    except Exception as err:  # tfds raises many types for a broken folder
        raise UserError(
            f"cannot read the dataset in {folder} ({type(err).__name__}: {one_line(str(err))}); "
            f"fix: {fix}"
        ) from err
    for shard in shards:  # the reader opens them lazily: at the first row of each
        if not os.path.isfile(shard):
            raise UserError(f"dataset file {shard} is missing; fix: {fix}")
    return builder, source, dict(builder.info.metadata)
