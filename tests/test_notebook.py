"""launch/colab.ipynb: a valid notebook whose cells run end to end on CPU with a tiny budget.

A fast test executes the code cells with `sh` recording the commands instead of running them
and parses every `jasper-jax` command with the real CLI parser. The execution test is marked
`slow`: it skips the install (the package is installed already), runs `jasper-jax demo --quick
--skip-vision --skip-long` in a temporary workdir, then the export + encode cells. The demo
dominates: ~110 s of CPU, 150-200 s of wall time on a busy 2-core machine.
"""

from __future__ import annotations

import ast
import configparser
import json
import os
import re
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest

from jasper_jax.cli import build_parser

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


def record_commands(nb, parameters: dict) -> list[list[str]]:
    """Runs the notebook's code cells in one namespace with `parameters` set after the
    parameters cell (as papermill does) and `sh` recording its argv instead of running it.

    The recorder plays the part of each command's output the next cells read: `git clone`
    makes the folder, `demo` writes demo_results.md, `encode` writes 4 vectors.
    """
    calls: list[list[str]] = []

    def sh(*args):
        args = [str(a) for a in args]
        calls.append(args)
        if args[1:3] == ["clone", "--depth"]:
            Path(args[-1]).mkdir()
        if args[1:3] == ["-m", "jasper_jax.cli"]:
            parsed, rest = build_parser().parse_known_args(args[3:])
            assert rest == [], args
            if parsed.command == "demo":
                Path(parsed.workdir).mkdir(parents=True)
                Path(parsed.workdir, "demo_results.md").write_text("| stage |\n")
            if parsed.command == "encode":
                np.save(parsed.output, np.zeros((4, 8), np.float32))

    namespace: dict = {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        exec(compile(cell.source, f"cell {index}", "exec"), namespace)
        if index == parameters_index(nb):
            namespace.update(parameters)
        namespace["sh"] = sh  # after the helpers cell defines the real one
    return calls


def cli_commands(calls: list[list[str]]) -> dict[str, object]:
    """The notebook's `jasper-jax` commands by sub-command, parsed by the real CLI parser."""
    out = {}
    for args in calls:
        if args[1:3] == ["-m", "jasper_jax.cli"]:
            assert args[0] == sys.executable  # the kernel's own Python
            parsed = build_parser().parse_args(args[3:])
            assert parsed.command not in out, "one call per sub-command"
            out[parsed.command] = parsed
    return out


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg")
    return cfg


@pytest.mark.parametrize(
    "quick, skip_vision, skip_long", [(True, False, True), (False, True, False)]
)
def test_cells_call_the_real_cli_with_the_parameters(
    tmp_path, monkeypatch, quick, skip_vision, skip_long
):
    monkeypatch.chdir(tmp_path)  # the install cell changes folder; restored afterwards
    repo = tmp_path / "repo"
    parameters = {
        "REPO_URL": "https://example.org/jj.git",
        "REF": "v1",
        "REPO_DIR": str(repo),
        "INSTALL": True,
        "QUICK": quick,
        "SKIP_VISION": skip_vision,
        "SKIP_LONG": skip_long,
        "WORKDIR": "runs/nb",
    }
    calls = record_commands(load(), parameters)
    assert Path.cwd() == repo  # the demo reads configs/ from the clone

    clone, torch, package = calls[:3]
    assert clone == ["git", "clone", "--depth", "1", "--branch", "v1", parameters["REPO_URL"],
                     str(repo)]  # fmt: skip
    # The CPU torch of the `teachers` pin first, then the package with extras it declares.
    extras = setup_cfg()["options.extras_require"]
    torch_pin = next(r for r in extras["teachers"].split() if r.startswith("torch"))
    assert torch[1:4] == ["-m", "pip", "install"] and torch_pin in torch
    assert torch[torch.index("--index-url") + 1].endswith("/cpu")
    editable = package[package.index("-e") + 1]
    assert package[1:4] == ["-m", "pip", "install"] and editable.startswith(f"{repo}[")
    assert set(re.fullmatch(r".*\[([\w,]+)\]", editable)[1].split(",")) == {"teachers"}
    assert "teachers" in extras  # an extra setup.cfg declares

    cli = cli_commands(calls)
    assert set(cli) == {"demo", "export", "encode"}
    demo, export, encode = cli["demo"], cli["export"], cli["encode"]
    assert demo.workdir == "runs/nb"
    assert (demo.quick, demo.skip_vision, demo.skip_long) == (quick, skip_vision, skip_long)
    assert Path(export.workdir).parent == Path(demo.workdir)  # a stage of the demo's run
    assert encode.model == export.output  # the exported folder is what gets encoded
    assert len(Path(encode.input).read_text().splitlines()) == 4
    # The devices cell runs JAX in its own process: the notebook never holds the TPU.
    [devices] = [c for c in calls if c[1] == "-c"]
    assert devices[0] == sys.executable and "jax.devices()" in devices[2]


def test_without_install_nothing_is_installed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parameters = {"INSTALL": False, "REPO_DIR": str(tmp_path), "WORKDIR": "w", "RUN_EXPORT": False}
    calls = record_commands(load(), parameters)
    assert not [c for c in calls if "pip" in c or "git" in c]
    assert set(cli_commands(calls)) == {"demo"}  # no export, no encode


@pytest.mark.slow
def test_notebook_runs_on_cpu_with_a_tiny_budget(tmp_path):
    from nbclient import NotebookClient

    nb = load()
    workdir = tmp_path / "demo"
    # Injected after the parameters cell, as papermill does.
    overrides = {
        "INSTALL": False,
        "REPO_DIR": str(ROOT),
        "WORKDIR": str(workdir),
        "QUICK": True,
        "SKIP_VISION": True,
        "SKIP_LONG": True,
        "RUN_EXPORT": True,
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
    assert (workdir / "export" / "config.json").is_file()
    assert re.search(r"\(4, \d+\)", text)  # four texts encoded by the exported model
