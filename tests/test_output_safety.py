"""Nothing lost, nothing silently wrong: `export`, `encode` and `eval` on bad input, through the
CLI entry. Refusals are one line with exit code 2 and leave every file as it was; a full disk
leaves no temporary file and no damaged output; outputs honour the umask.

The workdir is built without training: random params of a 1-layer, 32-wide BERT (MiniLM's
tokenizer) saved as an orbax checkpoint beside a model.json, so each test takes seconds.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from jasper_jax.cli import main
from jasper_jax.locks import process_tag

DEAD_PID = 2**22 + 7  # above Linux's largest pid_max: never a running process
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d ")


# ---- a tiny workdir --------------------------------------------------------------------------


def _config():
    from jasper_jax.models.bert import BertConfig
    from jasper_jax.models.embedder import EmbedderConfig

    bert = BertConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        add_pooling_layer=False,
    )
    return EmbedderConfig(encoder=bert, pooling="mean", heads=(16,), default_head="dense_16")


def _random_params(config) -> dict:
    import flax.linen as nn
    import jax

    from jasper_jax.models.embedder import abstract_params

    rng = np.random.default_rng(0)
    abstract = nn.meta.unbox(abstract_params(config))
    return jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(np.float32), abstract)


def make_workdir(path: Path, params: dict, config) -> Path:
    """model.json + checkpoint step 1 holding `params`, as `jasper-jax train` leaves them."""
    import orbax.checkpoint as ocp

    from jasper_jax.data.teacher_assets import teacher_folder
    from jasper_jax.run_folder import embedder_config_to_dict

    path.mkdir(parents=True)
    meta = {
        "embedder": embedder_config_to_dict(config),
        "tokenizer_folder": str(teacher_folder("all-MiniLM-L6-v2")),
        "max_seq_length": 16,
        "prompt": "",
        "teachers": [],
        "stage": 3,
        "config": "output_safety",
    }
    (path / "model.json").write_text(json.dumps(meta), encoding="utf-8")
    manager = ocp.CheckpointManager(
        path / "checkpoints",
        item_names=("state",),
        options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
    )
    try:
        manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))
        manager.wait_until_finished()
    finally:
        manager.close()
    return path


@pytest.fixture(scope="module")
def config():
    return _config()


@pytest.fixture(scope="module")
def params(config) -> dict:
    return _random_params(config)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, params, config) -> Path:
    return make_workdir(tmp_path_factory.mktemp("safety") / "run", params, config)


@pytest.fixture
def texts(tmp_path) -> Path:
    path = tmp_path / "texts.txt"
    path.write_text("a first text\nthe second one\nand a third\n", encoding="utf-8")
    return path


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _digest(folder: Path) -> dict[str, bytes]:
    """Every entry below `folder` (files with their bytes, folders as None)."""
    return {
        p.relative_to(folder).as_posix(): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def _refused(argv: list[str], capsys) -> str:
    """Runs the CLI; asserts exit code 2 and one error line without traceback; returns it."""
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not _LOG_LINE.match(line)]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"jasper-jax {argv[0]}: error: "), err
    return lines[0]


def _disk_full(argv: list[str], capsys) -> None:
    """A run whose writes hit ENOSPC: the OSError reaches the CLI, which reports it in one line
    (exit 2) or, before that mapping exists, lets it propagate."""
    try:
        code = main(argv)
    except OSError as e:
        assert e.errno == errno.ENOSPC
        return
    assert code == 2
    assert "Traceback" not in capsys.readouterr().err


def _export(workdir: Path, output, *flags: str) -> list[str]:
    return ["export", "--workdir", str(workdir), "--output", str(output), *flags]


# ---- export --overwrite replaces only what jasper-jax wrote ---------------------------------


def test_overwrite_refuses_the_current_folder_and_its_parents(
    workdir, tmp_path, monkeypatch, capsys
):
    project = tmp_path / "project"
    shutil.copytree(workdir, project / "w")
    (project / "notes.txt").write_text("mine")
    before = _digest(tmp_path)
    monkeypatch.chdir(project)
    for output in (".", "..", str(project)):
        line = _refused(_export(Path("w"), output, "--overwrite"), capsys)
        assert "current folder" in line and "new --output" in line
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    assert "home folder" in _refused(_export(Path("w"), home, "--overwrite"), capsys)
    home.rmdir()
    assert _digest(tmp_path) == before


def test_overwrite_refuses_the_source_workdir_and_its_parent(workdir, tmp_path, capsys):
    runs = tmp_path / "runs"
    source = runs / "w"
    shutil.copytree(workdir, source)
    before = _digest(tmp_path)
    assert "source --workdir" in _refused(_export(source, source, "--overwrite"), capsys)
    link = tmp_path / "link"
    link.symlink_to(source)  # a symlink is resolved before comparing
    assert "source --workdir" in _refused(_export(source, link, "--overwrite"), capsys)
    link.unlink()
    assert "holds the source" in _refused(_export(source, runs, "--overwrite"), capsys)
    assert _digest(tmp_path) == before


def test_overwrite_refuses_a_folder_that_is_not_an_export(workdir, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "data.txt").write_text("precious")
    line = _refused(_export(workdir, other, "--overwrite"), capsys)
    assert "is not a jasper-jax export (no jasper_export.json)" in line
    assert "remove it yourself" in line
    assert sorted(os.listdir(tmp_path)) == ["other"]
    assert _digest(other) == {"data.txt": b"precious"}


def test_reexport_over_a_previous_export_with_umask_modes(workdir, tmp_path, capsys, umask022):
    out = tmp_path / "out"
    assert main(_export(workdir, out)) == 0
    marker = json.loads((out / "jasper_export.json").read_text())
    assert marker["step"] == 1 and marker["workdir"] == str(workdir.resolve())
    assert marker["format"] == 1
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
    _refused(_export(workdir, out), capsys)  # exists, no --overwrite
    (out / "stale.txt").write_text("from the last export")
    assert main(_export(workdir, out, "--overwrite")) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp folder, no lock file


# ---- leftovers of killed exports, and the lock ----------------------------------------------


def test_leftovers_of_dead_exports_are_removed_live_ones_kept(workdir, tmp_path):
    host = process_tag().split("@", 1)[1]
    dead, live = f"{DEAD_PID}@{host}", process_tag()
    names = [".out.tmp-k3j2x", f".out.tmp-{dead}ab12", f".out.old-{dead}cd34", f".out.tmp-{live}z"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    assert main(_export(workdir, tmp_path / "out")) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(["out", f".out.tmp-{live}z"])


def test_a_previous_export_moved_aside_by_a_killed_export_is_restored(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_export(workdir, out)) == 0
    kept = _digest(out)
    aside = tmp_path / f".out.old-{DEAD_PID}@{process_tag().split('@', 1)[1]}q1"
    aside.mkdir()
    out.rename(aside / "out")  # killed between moving the old export away and the new one in
    assert "--overwrite" in _refused(_export(workdir, out), capsys)
    assert _digest(out) == kept and sorted(os.listdir(tmp_path)) == ["out"]


def test_a_second_export_to_the_same_output_is_refused(workdir, tmp_path, capsys):
    import fcntl

    out = tmp_path / "out"
    fd = os.open(tmp_path / ".out.lock", os.O_RDWR | os.O_CREAT)
    try:  # another export holds the lock (flock on its own open file)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps({"command": "export", "pid": 1, "host": "elsewhere"}).encode())
        line = _refused(_export(workdir, out), capsys)
    finally:
        os.close(fd)
    assert "in use by `jasper-jax export`" in line and "--output" in line
    assert not out.exists()


# ---- damaged or hostile input ----------------------------------------------------------------


def test_truncated_model_json_is_one_line(workdir, tmp_path, texts, capsys):
    broken = tmp_path / "w"
    shutil.copytree(workdir, broken)
    text = (broken / "model.json").read_text()
    (broken / "model.json").write_text(text[: len(text) // 2])
    out = tmp_path / "v.npy"
    line = _refused(
        ["encode", "--model", str(broken), "--input", str(texts), "--output", str(out)], capsys
    )
    assert "model.json is not valid JSON (line 1 col" in line and "re-run" in line
    line = _refused(_export(broken, tmp_path / "out"), capsys)
    assert "model.json is not valid JSON" in line
    assert sorted(os.listdir(tmp_path)) == ["texts.txt", "w"]


def test_invalid_config_json_of_a_model_folder_is_one_line(tmp_path, texts, capsys):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert", "hidden_size": ')
    argv = [
        "encode",
        "--model",
        str(folder),
        "--input",
        str(texts),
        "--output",
        str(tmp_path / "v"),
    ]
    assert "config.json is not valid JSON (line 1 col" in _refused(argv, capsys)


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_encode_empty_input_is_one_line(workdir, tmp_path, capsys, content):
    empty = tmp_path / "empty.txt"
    empty.write_text(content, encoding="utf-8")
    out = tmp_path / "v.npy"
    line = _refused(
        ["encode", "--model", str(workdir), "--input", str(empty), "--output", str(out)], capsys
    )
    assert "holds no text" in line and str(empty) in line
    assert not out.exists()


class _Payload:
    """Unpickling this runs a shell command: what a hostile pytorch_model.bin would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path, texts, capsys):
    import torch

    folder = tmp_path / "hostile"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "config.json").write_text(json.dumps(_config().encoder.to_hf_dict()))
    torch.save(
        {"embeddings.word_embeddings.weight": _Payload(marker)}, folder / "pytorch_model.bin"
    )
    out = tmp_path / "v.npy"
    argv = ["encode", "--model", str(folder), "--input", str(texts), "--output", str(out)]
    line = _refused(argv, capsys)
    assert "pytorch_model.bin holds a pickle that is not plain tensors" in line
    assert "safetensors" in line
    assert not marker.exists() and not out.exists()


# ---- non-finite values -------------------------------------------------------------------------


def test_nan_parameters_are_refused_by_export_encode_and_eval(
    params, config, tmp_path, texts, capsys
):
    import jax

    poisoned = jax.tree.map(np.copy, params)
    poisoned["encoder"]["encoder"]["layer_0"]["output"]["dense"]["kernel"][3, 5] = np.nan
    run = make_workdir(tmp_path / "nan_run", poisoned, config)
    before = _digest(tmp_path)
    line = _refused(_export(run, tmp_path / "out"), capsys)
    assert "checkpoint step 1" in line and "encoder/encoder/layer_0/output/dense/kernel" in line
    out = tmp_path / "v.npy"
    line = _refused(
        ["encode", "--model", str(run), "--input", str(texts), "--output", str(out)], capsys
    )
    assert "NaN/inf" in line and "layer_0" in line
    line = _refused(["eval", "--model", str(run), "--output", str(tmp_path / "ev")], capsys)
    assert "NaN/inf" in line
    assert _digest(tmp_path) == before


def test_non_finite_vectors_are_refused_by_encode(workdir, tmp_path, texts, capsys, monkeypatch):
    def nan_rows(self, texts, **kwargs):
        vectors = np.ones((len(texts), 16), np.float32) / 4
        vectors[1:] = np.inf
        return vectors

    monkeypatch.setattr("jasper_jax.encode.TextEncoder.encode", nan_rows)
    out = tmp_path / "v.npy"
    np.save(out, np.arange(3.0))
    argv = ["encode", "--model", str(workdir), "--input", str(texts), "--output", str(out)]
    line = _refused([*argv, "--mesh", "1,1,1"], capsys)
    assert "2 of 3 vectors are not finite" in line and "row 1, line 2" in line
    assert "--dtype float32" in line
    np.testing.assert_array_equal(np.load(out), np.arange(3.0))
    assert sorted(os.listdir(tmp_path)) == ["texts.txt", "v.npy"]


def test_eval_refuses_to_score_non_finite_vectors():
    from jasper_jax.errors import UserError
    from jasper_jax.evaluation.models import EvalModel

    def encode(texts, prompt, outputs):
        rows = np.ones((len(texts), 4), np.float32) / 2
        rows[2, 1] = np.nan
        return {"pooled": rows}

    model = EvalModel("student", "student", ["pooled"], encode, {"total": 1}, source="/m")
    with pytest.raises(UserError, match=r"non-finite vectors .* 1 of 3 texts \(first: 2\)"):
        model.encode(["a", "b", "c"])


# ---- disk full ---------------------------------------------------------------------------------


def test_disk_full_during_export_keeps_the_previous_export(workdir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(_export(workdir, out)) == 0
    before = _digest(tmp_path)

    def full(tensors, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"half a tensor")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("jasper_jax.export.st_folder._save_safetensors", full)
    _disk_full(_export(workdir, out, "--overwrite"), capsys)
    assert _digest(tmp_path) == before  # no temp folder, no lock file, the export unchanged


def test_disk_full_during_encode_keeps_the_existing_output(
    workdir, tmp_path, texts, capsys, monkeypatch
):
    def unit_rows(self, texts, **kwargs):
        return np.full((len(texts), 16), 0.25, np.float32)

    def full(file, array, *args, **kwargs):
        file.write(b"\x93NUMPY half")
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "v.npy"
    np.save(out, np.arange(3.0))
    monkeypatch.setattr("jasper_jax.encode.TextEncoder.encode", unit_rows)
    monkeypatch.setattr(np, "save", full)
    argv = ["encode", "--model", str(workdir), "--input", str(texts), "--output", str(out)]
    _disk_full([*argv, "--mesh", "1,1,1"], capsys)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.load(out), np.arange(3.0))
    assert sorted(os.listdir(tmp_path)) == ["texts.txt", "v.npy"]


# ---- umask ---------------------------------------------------------------------------------------


def test_encode_output_honours_the_umask(workdir, tmp_path, texts, umask022):
    out = tmp_path / "vectors" / "v.npy"
    argv = ["encode", "--model", str(workdir), "--input", str(texts), "--output", str(out)]
    assert main([*argv, "--mesh", "1,1,1", "--batch-size", "4"]) == 0
    vectors = np.load(out)
    assert vectors.shape == (3, 16) and np.isfinite(vectors).all()
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o755
    assert sorted(os.listdir(out.parent)) == ["v.npy"]


def test_encode_removes_what_a_killed_encode_left_and_keeps_a_live_ones(workdir, tmp_path, texts):
    from jasper_jax.paths import TMP_PREFIX, host_name, process_tag

    out = tmp_path / "v.npy"
    dead = tmp_path / f"{TMP_PREFIX}{2**22 + 4321}@{host_name()}~abc.tmp"  # no such pid
    live = tmp_path / f"{TMP_PREFIX}{process_tag()}def.tmp"  # this process: alive
    untagged = tmp_path / f"{TMP_PREFIX}old.tmp"  # owner unknown without a lock: kept
    for path in (dead, live, untagged):
        path.write_bytes(b"half")
    argv = ["encode", "--model", str(workdir), "--input", str(texts), "--output", str(out)]
    assert main([*argv, "--mesh", "1,1,1"]) == 0
    assert not dead.exists() and live.exists() and untagged.exists()
    assert np.load(out).shape == (3, 16)
