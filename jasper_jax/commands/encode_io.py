"""Inputs and outputs of `jasper-jax encode`: one-text-per-line files in, files written beside
their targets under temporary names and renamed into place together, so a failure (disk full)
leaves existing outputs as they were.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from jasper_jax.errors import UserError
from jasper_jax.locks import process_tag, remove_leftovers
from jasper_jax.models.loading import LoadedModel
from jasper_jax.paths import TMP_PREFIX, honour_umask

log = logging.getLogger(__name__)
Writer = Callable[[BinaryIO], None]


def read_lines(path: str | Path) -> list[str]:
    """Lines of a UTF-8 file without their line endings; names the first bad byte otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise UserError(f"input file {path} does not exist") from e
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(
            f"{path} is not UTF-8 (byte {e.start}, line {line}); convert it, e.g. "
            f"`iconv -f latin1 -t utf-8 {path} > fixed.txt`"
        ) from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line; it does not start a new one
    return [line.rstrip("\r") for line in lines]


def read_texts(path: str | Path) -> list[str]:
    """The texts of a one-text-per-line file (row i of the output is line i + 1).

    A blank line is kept as an empty text, as sentence-transformers encodes it, so rows stay
    aligned with lines (skipping it would shift every later row); a warning names it.

    Raises:
      UserError: the file is missing, not UTF-8, empty or only blank lines.
    """
    lines = read_lines(path)
    blank = [number for number, line in enumerate(lines, start=1) if not line.strip()]
    if len(blank) == len(lines):
        raise UserError(
            f"input file {path} holds no text{' (only blank lines)' if lines else ''}; put one "
            "text per line"
        )
    if blank:
        log.warning(
            "%s: %d blank line(s) (first: line %d) are encoded as empty texts, so that row i "
            "stays line i; remove them if they are not meant as texts",
            path,
            len(blank),
            blank[0],
        )
    return lines


def npy_writer(array: np.ndarray) -> Writer:
    """Writes `array` as .npy."""
    return lambda f: np.save(f, array)


def text_writer(text: str) -> Writer:
    """Writes `text` as UTF-8."""
    return lambda f: f.write(text.encode("utf-8"))


def write_outputs(outputs: dict[str | Path, Writer]) -> None:
    """Writes every output to a temporary file beside it, then renames them all into place.

    A failure while writing (disk full, no permission) removes the temporary files and leaves
    every existing output as it was; the OSError propagates. Files get the umask's mode.
    """
    temps: list[tuple[str, Path]] = []
    for target in outputs:  # what a killed encode left beside its outputs (no lock: tagged only)
        remove_leftovers(Path(target).parent, [TMP_PREFIX + "*"], untagged=False)
    try:
        for target, write in outputs.items():
            target = Path(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                dir=target.parent, prefix=TMP_PREFIX + process_tag(), suffix=".tmp"
            )
            temps.append((tmp, target))
            with os.fdopen(fd, "wb") as f:
                write(f)
            honour_umask(tmp)  # mkstemp made it 0600
        for tmp, target in temps:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in temps:
            Path(tmp).unlink(missing_ok=True)
        raise


def check_output_path(output: str | Path) -> None:
    """Refuses an --output that is a folder, before any compute."""
    if Path(output).is_dir():
        raise UserError(f"--output {output} is a folder; pass the path of the .npy file to write")


def role_prompt(model: LoadedModel, prompt: str | None, role: str | None) -> str | None:
    """The prompt to encode with: `prompt` as given, else the model's prompt for `role`, else
    its default prompt (`default_prompt_name`), else none.

    Raises:
      UserError: both `prompt` and `role` given.
    """
    if prompt is not None and role is not None:
        raise UserError("--prompt and --role both choose the prompt; give one of them")
    if prompt is not None:
        return prompt
    name = role or model.default_prompt_name
    return model.prompts.get(name) or None if name else None
