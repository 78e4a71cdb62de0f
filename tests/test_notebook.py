"""launch/colab.ipynb: a valid notebook whose cells run end to end on CPU with a tiny budget.

The execution test is marked `slow`: it skips the install (the package is installed already),
runs `jasper-jax demo --quick --skip-vision` in a temporary workdir, and the export + encode cells
when `jasper-jax export` exists in this build. The demo dominates: ~110 s of CPU, 150-200 s of
wall time on a busy 2-core machine; the notebook adds ~3 s.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "launch" / "colab.ipynb"
PARAMETERS = {
    "REPO_URL",
    "REF",
    "REPO_DIR",
    "INSTALL",
    "QUICK",
    "SKIP_VISION",
    "SKIP_LONG",
    "WORKDIR",
}


def load() -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def parameters_index(nb) -> int:
    [index] = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    return index


def test_notebook_is_valid_and_documented():
    nb = load()
    params = nb.cells[parameters_index(nb)]
    assigned = {t.id for n in ast.parse(params.source).body for t in n.targets}
    assert assigned >= PARAMETERS
    for cell in nb.cells:
        if cell.cell_type == "code":
            compile(cell.source, "<cell>", "exec")
            assert not cell.get("outputs"), "commit the notebook without outputs"
    kinds = [c.cell_type for c in nb.cells]
    # Every code cell follows a short markdown explanation (or another code cell of its step).
    assert kinds[0] == "markdown" and kinds.count("markdown") >= 6
    sources = "\n".join(c.source for c in nb.cells)
    for needed in (
        '"demo"',
        "--quick",
        "--skip-vision",
        "--skip-long",
        '"export"',
        "jax.devices()",
    ):
        assert needed in sources


def export_available() -> bool:
    r = subprocess.run(
        [sys.executable, "-m", "jasper_jax.cli", "export", "--help"],
        capture_output=True,
        timeout=120,
    )
    return r.returncode == 0


@pytest.mark.slow
def test_notebook_runs_on_cpu_with_a_tiny_budget(tmp_path):
    from nbclient import NotebookClient

    nb = load()
    workdir = tmp_path / "demo"
    run_export = export_available()
    # Injected after the parameters cell, as papermill does.
    overrides = {
        "INSTALL": False,
        "REPO_DIR": str(ROOT),
        "WORKDIR": str(workdir),
        "QUICK": True,
        "SKIP_VISION": True,
        "SKIP_LONG": True,
        "RUN_EXPORT": run_export,
    }
    source = "\n".join(f"{k} = {v!r}" for k, v in overrides.items())
    nb.cells.insert(parameters_index(nb) + 1, nbformat.v4.new_code_cell(source))
    # One CPU device: fast, and what a CPU Colab runtime has.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute(env=env)

    text = "\n".join(
        out.get("text", "") + json.dumps(out.get("data", {}))
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
    )
    assert "cpu [CpuDevice(id=0)]" in text
    results = json.loads((workdir / "demo_results.json").read_text())
    assert [s["stage"] for s in results["stages"]] == [1, 2, 3]
    assert "held-out cosine to teacher" in text  # the results table was displayed
    if run_export:
        assert any((workdir / "export").iterdir())
        assert "(4, " in text  # four texts encoded by the exported model
    else:
        assert "jasper-jax export" not in text or "export skipped" in text
