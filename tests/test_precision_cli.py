"""`jasper-jax export --calibration` and `jasper-jax encode --precision` on a tiny trained student:
the ranges are the min/max of our JAX vectors, every stored precision equals
sentence-transformers' `quantize_embeddings` of the float32 output, refusals exit 2 and leave
existing files alone."""

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from jasper_jax.cli import main
from jasper_jax.config import to_settings
from jasper_jax.encode import TextEncoder
from jasper_jax.models.loading import load_model
from jasper_jax.precision import PRECISIONS
from jasper_jax.run_folder import is_workdir
from tests.text_samples import varied_texts
from tests.train_fixtures import tiny_config, tiny_setup  # noqa: F401

OUTPUTS = ("pooled", "dense_384", "dense_32", "dense_16")


@pytest.fixture(scope="module")
def workdir(tiny_setup, tmp_path_factory) -> Path:  # noqa: F811
    """The tiny stage-3 run of tests/test_export.py (same folder: trained once per session)."""
    from jasper_jax.train.loop import train_and_evaluate

    path = tmp_path_factory.getbasetemp() / "export_stage3" / "stage3"
    if not is_workdir(path):
        prompts = {"data.query_prompt": "query: ", "data.document_prompt": "passage: "}
        c = tiny_config(tiny_setup, 3, **{"train.steps": 2, **prompts})
        train_and_evaluate(to_settings(c), path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """calibration texts (120) and texts to store (40, other texts)."""
    root = tmp_path_factory.mktemp("precision_texts")
    texts = varied_texts(160)
    out = {"calib": root / "calib.txt", "store": root / "store.txt"}
    out["calib"].write_text("\n".join(texts[:120]) + "\n", encoding="utf-8")
    out["store"].write_text("\n".join(texts[120:]) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def exported(workdir, files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("precision_export") / "out"
    argv = ["export", "--workdir", str(workdir), "--output", str(out)]
    assert main([*argv, "--calibration", str(files["calib"])]) == 0
    return out


def _encode(model: Path, text_file: Path, out: Path, *flags: str) -> int:
    argv = ["encode", "--model", str(model), "--input", str(text_file), "--output", str(out)]
    return main([*argv, *flags])


def test_export_calibration_is_the_min_max_of_our_jax_vectors(exported, files):
    saved = json.loads((exported / "calibration.json").read_text())
    card = (exported / "README.md").read_text()  # the model card names the file and its texts
    assert "`calibration.json`" in card and f"{saved['texts']['count']} texts" in card
    assert "onnx/" not in card  # no --onnx: no ONNX line
    texts = files["calib"].read_text(encoding="utf-8").splitlines()
    assert saved["texts"]["count"] == 120 and saved["texts"]["prompt"] == "passage: "
    assert saved["texts"]["sha256"] == hashlib.sha256(files["calib"].read_bytes()).hexdigest()
    assert sorted(saved["outputs"]) == sorted(OUTPUTS)
    vectors = TextEncoder(load_model(exported)).encode_heads(
        texts, heads=OUTPUTS, prompt="passage: "
    )
    for name in OUTPUTS:
        entry = saved["outputs"][name]
        assert entry["dim"] == vectors[name].shape[1]
        np.testing.assert_array_equal(np.float32(entry["min"]), vectors[name].min(axis=0))
        np.testing.assert_array_equal(np.float32(entry["max"]), vectors[name].max(axis=0))
        assert (np.array(entry["min"]) < np.array(entry["max"])).all()


def test_every_precision_equals_quantize_embeddings_of_the_float_output(
    exported, files, tmp_path, caplog
):
    from sentence_transformers import quantize_embeddings

    saved = json.loads((exported / "calibration.json").read_text())["outputs"]["dense_32"]
    ranges = np.array([saved["min"], saved["max"]], np.float32)
    assert _encode(exported, files["store"], tmp_path / "float32.npy", "--head", "32") == 0
    floats = np.load(tmp_path / "float32.npy")
    assert floats.shape == (40, 32) and floats.dtype == np.float32
    for precision in PRECISIONS:
        out = tmp_path / f"{precision}.npy"
        with caplog.at_level(logging.INFO, logger="jasper_jax.commands.encode"):
            assert (
                _encode(exported, files["store"], out, "--head", "32", "--precision", precision)
                == 0
            )
        stored = np.load(out)
        if precision == "float16":
            expected = floats.astype(np.float16)
        else:
            expected = quantize_embeddings(floats, precision=precision, ranges=ranges)
        assert stored.dtype == expected.dtype, precision
        np.testing.assert_array_equal(stored, expected, err_msg=precision)
        per_vector = stored.nbytes // len(stored)
        assert f"{per_vector} bytes per 32-d vector" in caplog.text, precision
    assert np.load(tmp_path / "binary.npy").shape == (40, 4)  # 32 dims -> 4 packed bytes
    assert (np.load(tmp_path / "int8.npy") != -128).any()  # not all clipped at the bottom


def test_encode_calibration_flag_measures_ranges_the_same_way(exported, files, tmp_path):
    """--calibration TEXTS (here the export's own texts) == the saved calibration.json; other
    texts give other ranges, and their codes."""
    from sentence_transformers import quantize_embeddings

    flags = ("--head", "16", "--precision", "uint8")
    assert _encode(exported, files["store"], tmp_path / "saved.npy", *flags) == 0
    override = ("--calibration", str(files["calib"]))
    assert _encode(exported, files["store"], tmp_path / "same.npy", *flags, *override) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "same.npy"), np.load(tmp_path / "saved.npy"))

    assert _encode(exported, files["store"], tmp_path / "f.npy", "--head", "16") == 0
    floats = np.load(tmp_path / "f.npy")
    other = ("--calibration", str(files["store"]))  # ranges of the stored texts themselves
    assert _encode(exported, files["store"], tmp_path / "own.npy", *flags, *other) == 0
    own = np.stack([floats.min(axis=0), floats.max(axis=0)])
    expected = quantize_embeddings(floats, precision="uint8", ranges=own)
    np.testing.assert_array_equal(np.load(tmp_path / "own.npy"), expected)
    assert not np.array_equal(expected, np.load(tmp_path / "saved.npy"))


def _refused(argv_tail, out: Path, capsys, model: Path, files) -> str:
    code = _encode(model, files["store"], out, *argv_tail)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_refusals_exit_2_and_leave_the_output_alone(exported, files, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(exported, bare)
    (bare / "calibration.json").unlink()
    out = tmp_path / "keep.npy"
    np.save(out, np.arange(3.0))

    err = _refused(["--precision", "int8"], out, capsys, bare, files)
    assert "calibration.json" in err and "--calibration TEXTS.txt" in err
    err = _refused(["--precision", "binary", "--calibration", "x.txt"], out, capsys, bare, files)
    assert "drop --calibration" in err
    missing = str(tmp_path / "none.txt")
    err = _refused(["--precision", "int8", "--calibration", missing], out, capsys, bare, files)
    assert "does not exist" in err
    images = ["encode", "--model", str(exported), "--images", str(tmp_path), "--output", str(out)]
    assert main([*images, "--precision", "binary"]) == 2
    err = capsys.readouterr().err
    assert "drop --images" in err and len(err.strip().splitlines()) == 1
    calib = ["--calibration", str(files["calib"])]
    err = _refused(
        ["--precision", "int8", "--backend", "onnx", *calib], out, capsys, exported, files
    )
    assert "export ... --calibration" in err and "--backend onnx" in err

    damaged = tmp_path / "damaged"
    shutil.copytree(exported, damaged)
    saved = json.loads((damaged / "calibration.json").read_text())
    del saved["outputs"]["dense_16"]
    (damaged / "calibration.json").write_text(json.dumps(saved))
    err = _refused(["--precision", "int8", "--head", "16"], out, capsys, damaged, files)
    assert "not 'dense_16'" in err and "dense_32" in err
    np.testing.assert_array_equal(np.load(out), np.arange(3.0))  # untouched every time


def test_export_refuses_missing_calibration_texts_before_writing(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["export", "--workdir", str(workdir), "--output", str(out)]
    assert main([*argv, "--calibration", str(tmp_path / "none.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_chunks_store_documents_and_chunks_in_the_precision(exported, files, tmp_path):
    from sentence_transformers import quantize_embeddings

    saved = json.loads((exported / "calibration.json").read_text())["outputs"]["dense_32"]
    ranges = np.array([saved["min"], saved["max"]], np.float32)
    chunks = ("--head", "32", "--chunks", "sentences:8")
    assert _encode(exported, files["store"], tmp_path / "f.npy", *chunks) == 0
    floats = {
        "": np.load(tmp_path / "f.npy"),
        ".chunks.npy": np.load(tmp_path / "f.npy.chunks.npy"),
    }
    assert len(floats[".chunks.npy"]) > len(floats[""])  # some documents gave several chunks
    for precision in ("int8", "ubinary"):
        out = tmp_path / f"{precision}.npy"
        assert _encode(exported, files["store"], out, *chunks, "--precision", precision) == 0
        for suffix, x in floats.items():
            expected = quantize_embeddings(x, precision=precision, ranges=ranges)
            np.testing.assert_array_equal(np.load(f"{out}{suffix}"), expected)
        listing = Path(f"{out}.chunks.jsonl").read_text()
        assert listing == (tmp_path / "f.npy.chunks.jsonl").read_text()
