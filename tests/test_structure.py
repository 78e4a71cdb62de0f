"""The shape of the code: an import graph without circles that only runs downwards, small files
and small functions. Read from the source (ast), so nothing is imported.

Layers, highest first (a module may import its own layer or lower, never higher):
  cli -> commands -> demo, config -> train / evaluation / export / onnx_encoder -> data / encode*
  / run_folder / calibration -> models, tokenizer -> settings, losses, sharding, paths, errors,
  locks, fidelity, fingerprint, vectors, precision, compile_cache.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jasper_jax"
LAYERS = {
    "jasper_jax.cli": 7,
    "jasper_jax.commands": 6,
    "jasper_jax.demo": 5,
    "jasper_jax.config": 5,
    "jasper_jax.train": 4,
    "jasper_jax.evaluation": 4,
    "jasper_jax.export": 4,
    "jasper_jax.onnx_encoder": 4,
    "jasper_jax.data": 3,
    "jasper_jax.encode": 3,
    "jasper_jax.encode_chunks": 3,
    "jasper_jax.encode_images": 3,
    "jasper_jax.run_folder": 3,
    "jasper_jax.calibration": 3,
    "jasper_jax.models": 2,
    "jasper_jax.tokenizer": 2,
    "jasper_jax.settings": 1,
    "jasper_jax.losses": 1,
    "jasper_jax.chunk_loss": 1,
    "jasper_jax.sharding": 1,
    "jasper_jax.paths": 1,
    "jasper_jax.errors": 1,
    "jasper_jax.locks": 1,
    "jasper_jax.fidelity": 1,
    "jasper_jax.fingerprint": 1,
    "jasper_jax.vectors": 1,
    "jasper_jax.precision": 1,
    "jasper_jax.compile_cache": 1,
    "jasper_jax": 0,  # the package's __init__ (version only)
}
# Packages of one layer that must not know each other: training is not evaluation.
APART = {
    ("jasper_jax.train", "jasper_jax.evaluation"),
    ("jasper_jax.evaluation", "jasper_jax.train"),
}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _home(module: str) -> str:
    """The LAYERS key a module belongs to (its longest matching prefix)."""
    best = ""
    for key in LAYERS:
        if (module == key or module.startswith(key + ".")) and len(key) > len(best):
            best = key
    return best


def _targets(module: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        if node.level:
            base = module.split(".")
            if path.name != "__init__.py":
                base = base[:-1]
            base = base[: len(base) - node.level + 1]
            parent = ".".join(base + ([node.module] if node.module else []))
        else:
            parent = node.module or ""
        names = [
            f"{parent}.{a.name}" if f"{parent}.{a.name}" in modules else parent for a in node.names
        ]
    out = []
    for name in names:
        while name and name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (at any depth of its body)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_targets(name, path, node, modules))
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    assert [m for m in _modules() if not _home(m)] == []


def test_import_graph_has_no_circles():
    assert _cycles(import_graph()) == []


def test_imports_only_run_downwards():
    upward = []
    for module, targets in import_graph().items():
        for target in targets:
            a, b = _home(module), _home(target)
            if LAYERS[b] > LAYERS[a] or (a, b) in APART:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_checker_sees_a_circle_and_an_upward_import():
    """The checks above can fail: a made-up graph with both faults is caught."""
    graph = {
        "jasper_jax.models.a": {"jasper_jax.train.b"},
        "jasper_jax.train.b": {"jasper_jax.models.a"},
    }
    assert _cycles(graph) == [["jasper_jax.models.a", "jasper_jax.train.b"]]
    assert LAYERS[_home("jasper_jax.train.b")] > LAYERS[_home("jasper_jax.models.a")]


@pytest.mark.parametrize(
    "path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE))
)
def test_files_and_functions_are_small(path: Path):
    source = path.read_text()
    assert source.count("\n") <= MAX_FILE_LINES, f"{path.name}: over {MAX_FILE_LINES} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []
