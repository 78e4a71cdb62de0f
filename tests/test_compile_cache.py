"""The persistent XLA compilation cache: a compiled program is written to the folder and a fresh
process loads it instead of compiling; "off" and an unwritable folder mean no cache, no error."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jasper_jax import cli, compile_cache
from jasper_jax.commands import export as export_command

# Enables the cache at argv[1] (every compile kept), compiles a function once and prints its
# result and the cache hits JAX reported.
SCRIPT = """
import sys
import jax, jax.numpy as jnp
from jasper_jax import compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
assert compile_cache.enable(sys.argv[1], min_compile_secs=0) is not None
value = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0)(jnp.arange(12.0).reshape(3, 4) / 10)
print("RESULT", float(value), len(hits))
"""


def _run(folder: Path) -> tuple[float, int]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    line = next(w for w in done.stdout.splitlines() if w.startswith("RESULT"))
    return float(line.split()[1]), int(line.split()[2])


def test_a_fresh_process_loads_the_compiled_program(tmp_path):
    folder = tmp_path / "xla"
    first, hits = _run(folder)
    entries = sorted(p.name for p in folder.iterdir())
    programs = [name for name in entries if name.endswith("-cache")]
    assert hits == 0 and any(name.startswith("jit__lambda") for name in programs), entries
    again, hits = _run(folder)
    assert hits == len(programs) and again == first  # every program loaded, none compiled
    assert sorted(p.name for p in folder.iterdir()) == entries  # read, not written again


@pytest.fixture
def restore_jax_cache():
    """These tests change this process's JAX config: put it back afterwards."""
    folder = jax.config.jax_compilation_cache_dir
    secs = jax.config.jax_persistent_cache_min_compile_time_secs
    yield
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", secs)
    compile_cache.compilation_cache.reset_cache()


def test_off_writes_nothing(tmp_path, monkeypatch, restore_jax_cache):
    monkeypatch.setenv("JASPER_JAX_CACHE", str(tmp_path))
    for value in ("off", "None", " OFF "):
        assert compile_cache.enable(value) is None
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.enable(None, min_compile_secs=0) is None
    jax.jit(lambda x: x * 7.0 - 1.0)(jnp.ones(5)).block_until_ready()
    assert list(tmp_path.iterdir()) == []


def test_default_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("JASPER_JAX_CACHE", str(tmp_path / "root"))
    assert compile_cache.resolve(None) == tmp_path / "root" / "xla"
    monkeypatch.delenv("JASPER_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve(None) == tmp_path / "xdg" / "jasper-jax" / "xla"
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "mine"))
    assert compile_cache.resolve(None) == tmp_path / "mine"
    assert compile_cache.resolve(str(tmp_path / "arg")) == tmp_path / "arg"


def test_an_unwritable_folder_is_a_warning(tmp_path, caplog, restore_jax_cache):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    read_only = tmp_path / "read_only"
    read_only.mkdir(mode=0o555)
    folders = [blocker / "xla"] + ([read_only] if os.geteuid() != 0 else [])  # root writes all
    for folder in folders:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=compile_cache.__name__):
            assert compile_cache.enable(str(folder)) is None
        assert len(caplog.records) == 1 and "compilation cache off" in caplog.text
    assert float(jax.jit(lambda x: x.sum() + 2.0)(jnp.ones(3))) == 5.0


@pytest.mark.parametrize(
    "words, folder",
    [
        (["export", "--workdir", "w", "--output", "o"], None),
        (["--compile-cache", "off", "export", "--workdir", "w", "--output", "o"], "off"),
        (["export", "--workdir", "w", "--output", "o", "--compile-cache", "/c"], "/c"),
    ],
)
def test_every_command_enables_it_before_running(monkeypatch, words, folder):
    calls = []
    monkeypatch.setattr(compile_cache, "enable", lambda value: calls.append(("enable", value)))
    monkeypatch.setattr(export_command, "main", lambda args: calls.append(("run", args)) or 0)
    assert cli.main(words) == 0
    assert calls[0] == ("enable", folder) and calls[1][0] == "run"
