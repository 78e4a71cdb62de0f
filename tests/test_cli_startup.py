"""`jasper-jax --help` is instant: the CLI imports a command's module (and JAX) only when that
command runs. Each check runs in a fresh interpreter, whose `sys.modules` is untouched."""

import json
import subprocess
import sys

from jasper_jax.cli import SUBCOMMANDS, _command_in


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )


def test_help_imports_no_command_and_no_jax():
    done = _fresh_python(
        "import sys\n"
        "from jasper_jax.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('jax', 'torch', 'transformers')]\n"
        "loaded += [m for m in sys.modules if m.startswith('jasper_jax.commands')]\n"
        "print('LOADED', loaded)\n"
    )
    assert "LOADED []" in done.stdout, done.stdout
    for name in SUBCOMMANDS:
        assert name in done.stdout
    assert "--compile-cache" in done.stdout


def test_build_parser_imports_only_the_chosen_command():
    done = _fresh_python(
        "import json, sys\n"
        "from jasper_jax.cli import build_parser\n"
        "args = build_parser('encode').parse_args(\n"
        "    ['encode', '--model', 'm', '--input', 'i', '--output', 'o.npy'])\n"
        "print(json.dumps([args.command, args.model, sorted(\n"
        "    m for m in sys.modules if m.startswith('jasper_jax.commands.'))]))\n"
    )
    command, model, loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert (command, model) == ("encode", "m")
    assert "jasper_jax.commands.encode" in loaded
    assert not {"jasper_jax.commands.train", "jasper_jax.commands.evaluate"} & set(loaded)


def test_the_command_is_found_before_parsing():
    assert _command_in(["encode", "--model", "train"]) == "encode"
    assert _command_in(["--compile-cache", "train", "eval", "--model", "m"]) == "eval"
    assert _command_in(["--help"]) == _command_in([]) == ""
