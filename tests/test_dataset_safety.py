"""Teacher and caption datasets: nothing lost, nothing silently wrong.

Damaged files are refused when a dataset is opened (checksums.json), one process per slice,
leftovers of killed runs are removed, a full disk keeps finished chunks, modes follow the umask,
and bad inputs give one line on stderr.
"""

import errno
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jasper_jax.cli import main
from jasper_jax.data import caption_dataset, dataset_build
from jasper_jax.data.caption_dataset import CaptionedImage, open_caption_dataset
from jasper_jax.data.teacher_dataset import build_teacher_dataset, open_teacher_dataset
from jasper_jax.errors import UserError
from jasper_jax.locks import process_tag
from tests.test_teacher_dataset import fake_teacher

TEXTS = [f"sentence number {i}" for i in range(20)]
RECORD = "teacher_dataset-train.array_record-00000-of-00001"
SMALL = dict(chunk_size=4, progress=False)


def build(out, shard_index=0, num_shards=1, **kwargs):
    return build_teacher_dataset(
        TEXTS,
        [fake_teacher()],
        out,
        shard_index=shard_index,
        num_shards=num_shards,
        **SMALL,
        **kwargs,
    )


def rows(out) -> dict:
    source, _ = open_teacher_dataset(out)
    return {int(r["index"]): np.asarray(r["teacher"]) for r in source}


def checksums(out) -> dict:
    return json.loads((out / "dataset" / "checksums.json").read_text())["files"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "ds"
    build(out)
    return out


def _no_reads(monkeypatch):
    """Opening may not reach TFDS at all: the refusal comes before any row is read."""

    def refuse(*args, **kwargs):
        raise AssertionError("the dataset was read")

    monkeypatch.setattr(dataset_build.tfds, "builder_from_directory", refuse)


def _damage(folder, how):
    record = folder / "dataset" / RECORD
    if how == "garbled":
        with open(record, "r+b") as f:
            f.seek(record.stat().st_size // 2)
            f.write(os.urandom(64))
    elif how == "truncated":
        os.truncate(record, record.stat().st_size // 2)
    elif how == "missing":
        record.unlink()
    else:
        metadata = folder / "dataset" / "metadata.json"
        metadata.write_text(metadata.read_text()[:40])


@pytest.mark.parametrize(
    "how, file, words",
    [
        ("garbled", RECORD, "damaged"),
        ("truncated", RECORD, "truncated"),
        ("missing", RECORD, "missing"),
        ("metadata", "metadata.json", "truncated or damaged"),
    ],
)
def test_a_damaged_file_is_refused_on_open(reference, tmp_path, monkeypatch, how, file, words):
    folder = tmp_path / "ds"
    shutil.copytree(reference, folder)
    _damage(folder, how)
    _no_reads(monkeypatch)
    with pytest.raises(UserError, match=words) as refused:
        open_teacher_dataset(folder)
    assert str(folder / "dataset" / file) in str(refused.value)
    assert "--overwrite" in str(refused.value) and "\n" not in str(refused.value)


def test_an_untouched_dataset_opens_and_a_rerun_verifies_it(reference, tmp_path):
    assert sorted(rows(reference)) == list(range(len(TEXTS)))
    folder = tmp_path / "ds"
    shutil.copytree(reference, folder)
    _damage(folder, "garbled")
    with pytest.raises(UserError, match="damaged"):  # "nothing to do" is not said of it
        build(folder)
    build(folder, overwrite=True)  # the fix the message names
    assert checksums(folder) == checksums(reference)


def test_a_dataset_without_checksums_opens_with_a_warning(reference, tmp_path, caplog):
    folder = tmp_path / "old"
    shutil.copytree(reference, folder)
    (folder / "dataset" / "checksums.json").unlink()
    with caplog.at_level(logging.WARNING):
        source, _ = open_teacher_dataset(folder)
    assert len(source) == len(TEXTS)
    assert "no checksums.json" in caplog.text
    # Without checksums, broken JSON files and missing data files are still named.
    (folder / "dataset" / "dataset_info.json").write_text('{"fileFormat": "arr')
    with pytest.raises(UserError, match="dataset_info.json is not valid JSON"):
        open_teacher_dataset(folder)
    shutil.copytree(reference, tmp_path / "old2")
    (tmp_path / "old2" / "dataset" / "checksums.json").unlink()
    (tmp_path / "old2" / "dataset" / RECORD).unlink()
    with pytest.raises(UserError, match=f"{RECORD} is missing"):
        open_teacher_dataset(tmp_path / "old2")


def test_a_broken_plan_of_an_unfinished_build_is_named(tmp_path):
    out = tmp_path / "ds"
    build(out, num_shards=2)
    plan = out / "_parts" / "plan.json"
    plan.write_text(plan.read_text()[:30])
    with pytest.raises(UserError, match="plan.json is not valid JSON"):
        open_teacher_dataset(out)
    with pytest.raises(UserError, match="plan.json is unreadable.*--overwrite"):
        build(out, shard_index=1, num_shards=2)


def _hold_lock(folder, name):
    """Another process holding `name` in `folder` until its stdin closes."""
    code = textwrap.dedent(
        f"""
        import sys
        from jasper_jax.locks import FolderLock
        with FolderLock({str(folder)!r}, "teachers", name={name!r}, what="output folder"):
            print("held", flush=True)
            sys.stdin.read()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def _release(proc):
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0


def test_a_slice_has_one_process_and_other_slices_proceed(tmp_path):
    out = tmp_path / "ds"
    holder = _hold_lock(out, ".slice-00000-of-00002.lock")
    try:
        with pytest.raises(UserError, match=f"in use by .*pid {holder.pid}"):
            build(out, shard_index=0, num_shards=2)
        assert build(out, shard_index=1, num_shards=2).pending_slices == [0]
    finally:
        _release(holder)
    combiner = _hold_lock(out, ".combine.lock")
    try:  # all slices done, another process combines: this one leaves it to that one
        done = build(out, shard_index=0, num_shards=2)
        assert done.dataset_dir is None and done.pending_slices == []
    finally:
        _release(combiner)
    assert build(out, shard_index=0, num_shards=2).dataset_dir == out / "dataset"
    assert len(rows(out)) == len(TEXTS)


def _dead_tag() -> str:
    code = "import os; print(os.getpid())"
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return f"{proc.stdout.strip()}@{socket.gethostname().split('.')[0]}~"


def test_leftovers_of_a_killed_run_are_removed(reference, tmp_path):
    out, dead = tmp_path / "ds", _dead_tag()
    build(out, num_shards=2)
    parts = out / "_parts"
    part_leftovers = [
        "tmpab12cd.npy",  # NamedTemporaryFile of an older version
        "tmpxy.npz",
        ".plan.json.k3j4",
        ".slice-00001-of-00002.done.a1b2",
        f".rows-0000000012-0000000016.npy.{dead}0a0b.tmp",
    ]
    for name in part_leftovers:
        (parts / name).write_bytes(b"half")
    for name in (".build-q1w2", f".build-{dead}e3r4", ".retired-4242-dataset"):
        (out / name / "tfds").mkdir(parents=True)
        (out / name / "tfds" / "x").write_bytes(b"old")
    alive = out / f".build-{process_tag()}live"  # a live process's work is kept
    alive.mkdir()
    kept = sorted(p.name for p in parts.iterdir() if p.name not in part_leftovers)
    build(out, num_shards=2)  # slice 0 again: done already, cleans _parts
    assert sorted(p.name for p in parts.iterdir()) == kept
    build(out, shard_index=1, num_shards=2)
    assert sorted(p.name for p in out.iterdir()) == [alive.name, "dataset"]
    assert checksums(out) == checksums(reference)


def _full_disk_after(monkeypatch, saves):
    """np.save writes a little, then fails as a full disk does, from the `saves`+1-th call."""
    real, calls = np.save, []

    def save(file, array, *args, **kwargs):
        calls.append(1)
        if len(calls) > saves:
            file.write(b"\x93NUMPY partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", save)
    return real


def test_a_full_disk_keeps_finished_chunks_and_leaves_no_temp(reference, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    _full_disk_after(monkeypatch, saves=2)
    with pytest.raises(OSError, match="No space left"):
        build(out)
    monkeypatch.undo()
    assert sorted(p.name for p in (out / "_parts").iterdir()) == [
        "plan.json",
        "rows-0000000000-0000000004.npy",
        "rows-0000000004-0000000008.npy",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["_parts"]
    calls = []
    build_teacher_dataset(TEXTS, [fake_teacher(calls=calls)], out, **SMALL)
    assert calls == TEXTS[8:]  # resumed
    assert checksums(out) == checksums(reference)


def test_a_full_disk_while_combining_keeps_the_chunks(reference, tmp_path, monkeypatch):
    out = tmp_path / "ds"

    def full(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dataset_build, "record_checksums", full)
    with pytest.raises(OSError, match="No space left"):
        build(out)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["_parts"]  # no .build-* left
    calls = []
    build_teacher_dataset(TEXTS, [fake_teacher(calls=calls)], out, **SMALL)
    assert calls == [] and checksums(out) == checksums(reference)


def _modes(root, file: int, folder: int) -> dict:
    """{path: (its mode, the mode expected of it)} of everything under root."""
    return {
        str(p.relative_to(root)): (stat.S_IMODE(p.stat().st_mode), folder if p.is_dir() else file)
        for p in [root, *root.rglob("*")]
    }


@pytest.mark.parametrize("umask, file, folder", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_outputs_follow_the_umask(tmp_path, umask, file, folder):
    out = tmp_path / "ds"
    previous = os.umask(umask)
    try:
        build(out, num_shards=2)
        unfinished = _modes(out, file, folder)  # chunks of a build others resume
        build(out, shard_index=1, num_shards=2)
        finished = _modes(out, file, folder)
    finally:
        os.umask(previous)
    assert len(unfinished) > 5 and len(finished) == 7
    for name, (mode, expected) in {**unfinished, **finished}.items():
        assert oct(mode) == oct(expected), name


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_teacher_inputs_give_one_line(tmp_path, capsys):
    from jasper_jax.data.teacher_assets import MINILM, teacher_folder

    corpus = tmp_path / "c.txt"
    corpus.write_text("hello\nworld\n")
    (tmp_path / "empty.txt").write_text("\n \n")
    broken = tmp_path / "broken-teacher"
    broken.mkdir()
    for name in ("config.json", "modules.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(teacher_folder(MINILM) / name, broken / name)
    (broken / "pytorch_model.bin").write_bytes(os.urandom(4096))
    cases = [
        (["--corpus", str(tmp_path / "nope.txt"), "--teacher", MINILM], "nope.txt"),
        (["--corpus", str(tmp_path / "empty.txt"), "--teacher", MINILM], "empty.txt"),
        (["--corpus", str(corpus), "--teacher", str(tmp_path / "gone")], "gone"),
        (
            ["--corpus", str(corpus), "--teacher", MINILM, "--documents", "2:5"]
            + ["--chunk-tokenizer", str(tmp_path / "gone")],
            "gone",
        ),
        (["--corpus", str(corpus), "--teacher", str(broken)], "broken-teacher"),
    ]
    for flags, named in cases:
        out = tmp_path / "out"
        assert main(["teachers", *flags, "--output", str(out)]) == 2, flags
        assert named in _one_error_line(capsys.readouterr().err)
        assert not out.exists()  # nothing written for bad input


class _FakeModel:
    class config:
        head_names, heads = ("dense_4",), (4,)


class _FakeEncoder:
    def __init__(self, model, batch_size):
        del model, batch_size

    def encode_heads(self, captions, heads):
        vectors = np.stack([np.arange(4, dtype=np.float32) + len(c) for c in captions])
        return {head: vectors for head in heads}


@pytest.fixture()
def fake_student(monkeypatch):
    student = {"student": "fake", "step": 1}
    monkeypatch.setattr(caption_dataset, "_student_identity", lambda s: (_FakeModel, student))
    monkeypatch.setattr(caption_dataset, "TextEncoder", _FakeEncoder)


EXAMPLES = [CaptionedImage(bytes([i]) * 10, f"caption {i}", "seen") for i in range(9)]


def build_captions(out, **kwargs):
    return caption_dataset.build_caption_dataset(
        EXAMPLES, "student", out, chunk_size=4, progress=False, **kwargs
    )


def test_caption_dataset_is_verified_locked_and_cleaned(fake_student, tmp_path, monkeypatch):
    out = tmp_path / "caps"
    (out / "_parts").mkdir(parents=True)
    (out / "_parts" / "tmp1234.npy").write_bytes(b"half")
    (out / ".build-old" / "tfds").mkdir(parents=True)
    real_save = _full_disk_after(monkeypatch, saves=1)
    with pytest.raises(OSError, match="No space left"):
        build_captions(out)
    monkeypatch.setattr(np, "save", real_save)
    assert sorted(p.name for p in (out / "_parts").iterdir()) == [
        "plan.json",
        "rows-0000000000-0000000004.npy",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["_parts"]
    holder = _hold_lock(out, ".jasper-jax.lock")
    try:
        with pytest.raises(UserError, match=f"pid {holder.pid}"):
            build_captions(out)
    finally:
        _release(holder)
    target = build_captions(out)
    assert sorted(p.name for p in out.iterdir()) == ["dataset"]
    source, meta = open_caption_dataset(out)
    assert len(source) == len(EXAMPLES) and "checksums.json" in os.listdir(target)
    record = next(target.glob("*.array_record-*"))
    os.truncate(record, record.stat().st_size - 1)
    _no_reads(monkeypatch)
    with pytest.raises(UserError, match=f"{record.name} is .*captions --output"):
        open_caption_dataset(out)


def test_a_dataset_folder_jasper_jax_did_not_write_is_never_replaced(tmp_path):
    out = tmp_path / "ds"
    (out / "dataset").mkdir(parents=True)
    (out / "dataset" / "mine.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not a dataset jasper-jax wrote"):
            build(out, overwrite=overwrite)
    assert (out / "dataset" / "mine.txt").read_text() == "precious"
