"""`export_workdir`: one checkpoint of a training workdir -> a finished, marked export folder.

The folder (`st_folder.py`) gets a model card (`model_card.py`) and the marker
`jasper_export.json`, is built under a temporary name and installed atomically
(`output_folder.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jasper_jax.calibration import CalibrationTexts, write_export_calibration
from jasper_jax.errors import UserError
from jasper_jax.export.model_card import model_card, workdir_evaluation
from jasper_jax.export.onnx_graph import check_onnx_packages, resolve_onnx_heads, write_onnx
from jasper_jax.export.output_folder import (
    MARKER,
    check_output,
    claimed_output,
    install_folder,
    marker_record,
    staging_folder,
)
from jasper_jax.export.st_folder import (
    VISION_DIR,
    resolve_default_head,
    write_json,
    write_text_model,
    write_vision_model,
)
from jasper_jax.models.loading import first_non_finite
from jasper_jax.paths import honour_umask
from jasper_jax.run_folder import RunModel, load_run

log = logging.getLogger(__name__)


def check_finite_params(run: RunModel, workdir: str | Path) -> None:
    """Refuses a checkpoint holding NaN/inf: its export would give NaN for every text."""
    params = dict(run.text.params)
    if run.vision_params is not None:
        params["vision"] = run.vision_params
    bad = first_non_finite(params)
    if bad is not None:
        raise UserError(
            f"checkpoint step {run.meta['step']} of {workdir} holds NaN/inf in parameter {bad} "
            "(training diverged or the checkpoint is corrupt); export an earlier --step "
            "(nothing was written)"
        )


def build_folder(
    source: RunModel, workdir: str | Path, folder: Path, head: str, max_len: int
) -> dict[str, Any]:
    """Writes the whole export into the (empty, temporary) `folder`; returns its summary."""
    summary = write_text_model(source.text, folder, head, max_len, source.meta.get("mrl_dims"))
    if source.vision is not None:
        write_vision_model(
            source.vision, source.vision_params, folder / VISION_DIR, source.image_tokens
        )
    summary["vision"] = source.vision is not None
    write_json(folder / MARKER, marker_record(workdir, source.meta["step"], head))
    honour_umask(folder, directory=True)  # mkdtemp made it 0700
    return summary


def write_card(source: RunModel, workdir: str | Path, folder: Path, summary: dict) -> None:
    """README.md, written last: it names every file the export holds (ONNX, calibration)."""
    card = model_card(source.meta, summary, workdir_evaluation(workdir))
    (folder / "README.md").write_text(card, encoding="utf-8")


def export_workdir(
    workdir: str | Path,
    output: str | Path,
    *,
    step: int | None = None,
    default_head: str | None = None,
    overwrite: bool = False,
    max_seq_length: int | None = None,
    onnx_heads: Sequence[str] | None = None,
    calibration: CalibrationTexts | None = None,
) -> dict[str, Any]:
    """Exports a workdir's checkpoint (latest or `step`) to `output`; returns a summary dict
    (heads, default_head, pooling, tokenizer_files, vision, output, step, onnx).

    `onnx_heads` (None: no ONNX): also write `OUT/onnx/` (`onnx_graph.py`) for these heads,
    [] meaning the default head.
    `calibration`: also write `OUT/calibration.json`, the int8 ranges of every output on these
    texts (`jasper_jax.calibration`).

    Raises:
      UserError: not a workdir, no checkpoint, NaN/inf parameters, unknown head, an existing
        output without `overwrite`, or one `overwrite` may not replace (checked before anything
        is written); another export writing `output`; `onnx_heads` without the onnx extra
        installed, or naming a head the model lacks (checked before anything is written).
      OSError: writing failed (e.g. disk full); the temporary folder is removed and an existing
        output is left as it was.
    """
    output = Path(output).resolve()  # symlinks and `.` resolved before any comparison
    if onnx_heads is not None:
        check_onnx_packages("--onnx")
    check_output(output, overwrite, workdir)
    with claimed_output(output):
        check_output(output, overwrite, workdir)  # again: it may have appeared meanwhile
        source = load_run(workdir, step)
        check_finite_params(source, workdir)
        head = resolve_default_head(source.text, default_head)
        max_len = int(max_seq_length or source.text.max_seq_length)
        if onnx_heads is not None:
            onnx_heads = resolve_onnx_heads(source.text, onnx_heads, head)
        with staging_folder(output) as tmp:
            summary = build_folder(source, workdir, tmp, head, max_len)
            if calibration is not None:
                summary["calibration"] = write_export_calibration(
                    tmp, source.text, calibration, max_len
                )
            if onnx_heads is not None:
                summary["onnx"] = write_onnx(tmp, source.text, onnx_heads, summary)
            write_card(source, workdir, tmp, summary)
            check_output(output, overwrite, workdir)  # made meanwhile by something unlocked
            install_folder(tmp, output)
    log.info("exported %s step %d to %s", workdir, source.meta["step"], output)
    return {**summary, "output": str(output), "step": source.meta["step"]}
