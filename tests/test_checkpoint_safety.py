"""Nothing lost, nothing silently wrong in a training workdir: checkpoint fingerprints, the
fallback past a damaged checkpoint, one writer per workdir, leftovers, config ranges, and one
error line (exit 2) from the CLI for every expected failure."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import pickle
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jasper_jax import cli, fingerprint, locks
from jasper_jax.commands import export as export_command
from jasper_jax.errors import UserError
from jasper_jax.run_folder import CHECKPOINT_DIR, RUN_FILE, load_params
from jasper_jax.train.loop import train_and_evaluate
from tests.train_fixtures import tiny_config, tiny_overrides, tiny_settings, tiny_setup  # noqa: F401

# ---- fingerprints ----------------------------------------------------------------------------


def _numpy_fingerprint(x: np.ndarray) -> int:
    """The formula in plain NumPy (uint64 arithmetic, masked to 32 bits)."""
    bits = np.ascontiguousarray(x).reshape(-1).view(np.uint32).astype(np.uint64)
    m = np.uint64(0xFFFFFFFF)
    h = bits ^ ((np.arange(bits.size, dtype=np.uint64) * np.uint64(0x9E3779B9)) & m)
    h = ((h ^ (h >> np.uint64(16))) * np.uint64(0x85EBCA6B)) & m
    h = ((h ^ (h >> np.uint64(13))) * np.uint64(0xC2B2AE35)) & m
    h = h ^ (h >> np.uint64(16))
    return int(h.sum() & m)


def test_fingerprint_matches_numpy_formula_and_sees_one_flipped_bit():
    x = np.random.default_rng(0).standard_normal((37, 11)).astype(np.float32)
    assert int(fingerprint.array_fingerprint(jnp.asarray(x))) == _numpy_fingerprint(x)
    flipped = x.copy()
    flipped.view(np.uint32)[5, 3] ^= 1  # the lowest mantissa bit of one element
    assert _numpy_fingerprint(flipped) != _numpy_fingerprint(x)
    assert int(fingerprint.array_fingerprint(jnp.asarray(flipped))) != _numpy_fingerprint(x)
    swapped = x.copy()
    swapped[[0, 1]] = swapped[[1, 0]]  # same values, other places
    assert int(fingerprint.array_fingerprint(jnp.asarray(swapped))) != _numpy_fingerprint(x)


def test_fingerprint_is_the_same_sharded_and_for_narrow_types():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 24)), jnp.float32)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("a", "b")))
    assert int(fingerprint.array_fingerprint(sharded)) == _numpy_fingerprint(np.asarray(x))
    tree = {"w": x.astype(jnp.bfloat16), "n": jnp.int32(3), "key": jax.random.key(0)}
    names = fingerprint.tree_fingerprints(tree)
    assert set(names) == {"w", "n", "key"}
    assert names["w"] != fingerprint.tree_fingerprints({"w": x.astype(jnp.float16)})["w"]


# ---- a damaged checkpoint ----------------------------------------------------------------------


def _flat(params) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _damage_largest_file(step_dir: Path, seed: int = 0) -> Path:
    """4 KB of random bytes over the middle of the biggest file of a checkpoint (the probe)."""
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    start = max(0, len(data) // 2 - 2048)
    noise = np.random.default_rng(seed).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    data[start : start + 4096] = noise[: len(data) - start]
    target.write_bytes(bytes(data))
    return target


def _steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / CHECKPOINT_DIR).iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def reference_run(tiny_setup, tmp_path_factory):  # noqa: F811
    """6 uninterrupted steps, checkpoints at 2, 4, 6 (all kept)."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    fields = {"train.steps": 6, "train.checkpoint_every": 2, "train.keep_checkpoints": 5}
    assert (
        train_and_evaluate(tiny_settings(tiny_setup, 3, **fields), workdir)["status"] == "finished"
    )
    return workdir, fields


def test_damaged_checkpoint_is_set_aside_and_the_previous_one_resumes(
    tiny_setup,  # noqa: F811
    reference_run,
    tmp_path,
    caplog,
):
    reference, fields = reference_run
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for step in (4, 6):  # the newest two: the run must go back to step 2
        _damage_largest_file(workdir / CHECKPOINT_DIR / str(step), seed=step)
    with caplog.at_level("WARNING"):
        result = train_and_evaluate(tiny_settings(tiny_setup, 3, **fields), workdir)
    assert result["status"] == "finished" and result["step"] == 6
    assert "damaged" in caplog.text and "/4 " in caplog.text and "/6 " in caplog.text
    aside = sorted(p.name for p in (workdir / CHECKPOINT_DIR).iterdir() if "damaged-" in p.name)
    assert [name.split("-")[1] for name in aside] == ["4", "6"], aside
    assert _steps(workdir) == [2, 4, 6]  # saved again by the resumed run
    # Resumed from step 2, the run is bit-identical to the uninterrupted one.
    got, want = _flat(load_params(workdir)[0]), _flat(load_params(reference)[0])
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_readers_fall_back_past_a_damaged_latest_checkpoint(reference_run, tmp_path, caplog):
    workdir = tmp_path / "copy"
    shutil.copytree(reference_run[0], workdir)
    _damage_largest_file(workdir / CHECKPOINT_DIR / "6")
    with caplog.at_level("WARNING"):
        params, step = load_params(workdir)
    assert step == 4 and "damaged" in caplog.text
    np.testing.assert_array_equal(
        _flat(params)["heads/dense_384/kernel"],
        _flat(load_params(reference_run[0], 4)[0])["heads/dense_384/kernel"],
    )
    with pytest.raises(UserError, match="no good checkpoint"):
        load_params(workdir, step=6)  # asked for exactly the damaged one


def test_every_checkpoint_damaged_is_one_error_line(tiny_setup, reference_run, tmp_path, capsys):  # noqa: F811
    workdir = tmp_path / "copy"
    shutil.copytree(reference_run[0], workdir)
    for step in _steps(workdir):
        _damage_largest_file(workdir / CHECKPOINT_DIR / str(step), seed=step)
    argv = ["train", "--config", "configs/embedded_default.py:3", "--workdir", str(workdir)]
    code = cli.main(argv + tiny_overrides(tiny_setup, 3, **reference_run[1]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("jasper-jax train: error: no good checkpoint"), err[-1]


# ---- one writer per workdir, leftovers -----------------------------------------------------------


def _hold_lock(folder: str, ready, release) -> None:
    with locks.FolderLock(folder, "train"):
        ready.set()
        release.wait(60)


def test_second_writer_is_refused_with_one_line(tiny_setup, tmp_path, capsys):  # noqa: F811
    workdir = tmp_path / "run"
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(workdir), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        argv = ["train", "--config", "configs/embedded_default.py:1", "--workdir", str(workdir)]
        code = cli.main(argv + tiny_overrides(tiny_setup, 1, **{"train.steps": 1}))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert f"pid {holder.pid}" in err[0] and "in use by `jasper-jax train`" in err[0]
        assert not (workdir / CHECKPOINT_DIR).exists()  # nothing written by the refused run
    finally:
        release.set()
        holder.join(30)
    assert not (workdir / locks.LOCK_FILE).exists()  # the holder cleaned up after itself


def test_stale_lock_and_leftovers_of_a_killed_run_are_cleared(tiny_setup, tmp_path):  # noqa: F811
    workdir = tmp_path / "run"
    fields = {"train.steps": 2, "train.checkpoint_every": 1}
    train_and_evaluate(tiny_settings(tiny_setup, 1, **fields), workdir)
    # What a SIGKILL during a save leaves: orbax's tmp folder, our temp file, a lock file whose
    # process is gone (no flock held any more).
    ckpts = workdir / CHECKPOINT_DIR
    shutil.copytree(ckpts / "2", ckpts / "3.orbax-checkpoint-tmp-1234")
    (workdir / ".jasper-tmp-abc.tmp").write_text("{half")
    dead = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    dead.start()
    dead.join()
    (workdir / locks.LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "command": "train"}))
    result = train_and_evaluate(
        tiny_settings(tiny_setup, 1, **{**fields, "train.steps": 3}), workdir
    )
    assert result["status"] == "finished" and result["step"] == 3
    names = sorted(p.name for p in workdir.iterdir())
    assert not [n for n in names if n.startswith((".jasper-tmp", locks.LOCK_FILE))], names
    assert not [p.name for p in ckpts.iterdir() if "tmp" in p.name]


def test_remove_leftovers_keeps_what_a_live_process_owns(tmp_path):
    live = tmp_path / f".out.tmp-{locks.process_tag()}x1"
    dead = tmp_path / ".out.tmp-999999999@nohost~x2"  # another host: kept, cannot tell
    gone = tmp_path / f".out.tmp-{2**22 + 12345}@{locks.host_name()}~x3"  # no such pid here
    plain = tmp_path / ".out.tmp-abc"
    for p in (live, dead, gone, plain):
        p.mkdir()
    removed = locks.remove_leftovers(tmp_path, [".out.tmp-*"])
    assert sorted(removed) == sorted([gone.name, plain.name])
    assert live.exists() and dead.exists()


# ---- one error line per expected failure ---------------------------------------------------------


@pytest.mark.parametrize(
    "override, field",
    [
        ("optim.lr=inf", "optim.lr"),
        ("optim.lr=nan", "optim.lr"),
        ("optim.b1=5.0", "optim.b1"),
        ("optim.b2=1.0", "optim.b2"),
        ("data.eval_texts=-1", "data.eval_texts"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints"),
        ("mesh_shape=(0,1,1)", "mesh_shape"),
    ],
)
def test_out_of_range_config_values_are_one_line(tmp_path, capsys, override, field):
    argv = ["train", "--config", "configs/embedded_default.py:2", "--workdir", str(tmp_path / "w")]
    assert cli.main(argv + [f"--config.{override}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"jasper-jax train: error: config field {field}")
    assert not (tmp_path / "w").exists()


def test_damaged_run_record_is_one_line(tiny_setup, reference_run, tmp_path, capsys):  # noqa: F811
    workdir = tmp_path / "copy"
    shutil.copytree(reference_run[0], workdir)
    (workdir / RUN_FILE).write_text('{"name": "embedded_def')
    argv = ["train", "--config", "configs/embedded_default.py:3", "--workdir", str(workdir)]
    code = cli.main(argv + tiny_overrides(tiny_setup, 3, **reference_run[1]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and RUN_FILE in err[0] and "not valid JSON" in err[0]
    assert _steps(workdir) == [2, 4, 6]  # nothing removed


def _export_failing_with(monkeypatch, error: BaseException) -> None:
    """`jasper-jax export` runs a command that raises `error`."""

    def run(args):
        raise error

    monkeypatch.setattr(export_command, "main", run)


@pytest.mark.parametrize(
    "error, words",
    [
        (OSError(errno.ENOSPC, "No space left on device", "/x/out.npy"), "disk is full"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/w"), "read-only"),
        (PermissionError(errno.EACCES, "Permission denied", "/root/w"), "no permission"),
        (FileExistsError(errno.EEXIST, "File exists", "/w"), "exists"),
        (pickle.UnpicklingError("Weights only load failed"), "refused to unpickle"),
        (RuntimeError("safetensors: No space left on device (os error 28)"), "disk is full"),
    ],
)
def test_expected_failures_are_one_line_exit_2(monkeypatch, capsys, error, words):
    _export_failing_with(monkeypatch, error)
    code = cli.main(["export", "--workdir", "w", "--output", "o"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err


def test_a_bug_keeps_its_traceback_and_says_so(monkeypatch, capsys):
    _export_failing_with(monkeypatch, KeyError("oops"))
    assert cli.main(["export", "--workdir", "w", "--output", "o"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "a bug in jasper-jax" in err


def test_workdir_naming_a_file_or_on_a_read_only_filesystem_is_one_line(
    tmp_path, capsys, monkeypatch
):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    argv = ["train", "--config", "configs/embedded_default.py:2", "--workdir"]
    assert cli.main(argv + [str(a_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a folder" in err[0]
    assert a_file.read_text() == "mine"

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert cli.main(argv + [str(tmp_path / "ro" / "w")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "read-only" in err[0] and "ro/w" in err[0], err


def test_damaged_teacher_dataset_is_refused_before_step_1(tiny_setup, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "train"
    shutil.copytree(tiny_setup["train"], data)
    shards = sorted((data / "dataset").glob("*.array_record*"))
    assert shards, sorted(p.name for p in (data / "dataset").iterdir())
    raw = bytearray(shards[0].read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)  # 64 zero bytes mid-file
    shards[0].write_bytes(bytes(raw))
    workdir = tmp_path / "run"
    argv = ["train", "--config", "configs/embedded_default.py:2", "--workdir", str(workdir)]
    code = cli.main(argv + tiny_overrides(tiny_setup, 2, **{"data.train_dir": data}))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and shards[0].name in err[0], err
    assert not (workdir / CHECKPOINT_DIR).exists()  # refused before step 1
