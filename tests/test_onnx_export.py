"""`jasper-jax export --onnx` and `encode --backend onnx|onnx-int8`: the graphs give the JAX
encoder's vectors (BERT and Qwen2 students; prompts, truncation, unicode), int8 stays close on a
real model, and bad input is refused before anything is written."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from jasper_jax.calibration import CalibrationTexts
from jasper_jax.cli import main
from jasper_jax.commands.encode_io import read_texts
from jasper_jax.config import to_settings
from jasper_jax.export import export_workdir
from jasper_jax.run_folder import is_workdir
from tests.text_samples import varied_texts
from tests.train_fixtures import TOKENIZER_FILES, tiny_config, tiny_setup  # noqa: F401

pytest.importorskip("onnxruntime")
PROMPTS = {"data.query_prompt": "query: ", "data.document_prompt": "passage: "}


def _train(setup: dict, path: Path, **overrides) -> Path:
    from jasper_jax.train.loop import train_and_evaluate

    if not is_workdir(path):
        c = tiny_config(setup, 3, **{"train.steps": 2, **PROMPTS, **overrides})
        train_and_evaluate(to_settings(c), path)
    return path


@pytest.fixture(scope="module")
def bert_workdir(tiny_setup, tmp_path_factory) -> Path:  # noqa: F811
    """The tiny BERT stage-3 run of test_export (heads 384, 32, 16; max length 16)."""
    return _train(tiny_setup, tmp_path_factory.getbasetemp() / "export_stage3" / "stage3")


@pytest.fixture(scope="module")
def qwen2_workdir(tiny_setup, tmp_path_factory) -> Path:  # noqa: F811
    """A tiny Qwen2 (GQA) student trained for 2 stage-3 steps, MiniLM's tokenizer."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("onnx_qwen2")
    torch.manual_seed(3)
    cfg = transformers.Qwen2Config(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    transformers.Qwen2Model(cfg).save_pretrained(root / "student")
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tiny_setup["student"]) / name, root / "student" / name)
    return _train(tiny_setup, root / "stage3", **{"model.init_hf": str(root / "student")})


@pytest.fixture(scope="module")
def bert_export(bert_workdir, text_file, tmp_path_factory) -> Path:
    """ONNX graphs of dense_384 and pooled, and int8 ranges measured on the 300 texts."""
    out = tmp_path_factory.mktemp("onnx_bert") / "out"
    texts = CalibrationTexts.from_file(text_file, read_texts(text_file))
    summary = export_workdir(
        bert_workdir, out, onnx_heads=["dense_384", "pooled"], calibration=texts
    )
    assert summary["onnx"] == ["dense_384", "pooled"]
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    """300 varied texts (short, long and cut at 16 tokens, unicode, empty-ish)."""
    texts = varied_texts(300)
    texts[:4] = ["", "ünïcødé — 東京 🚀 naïve café", "a " * 200, "x"]
    path = tmp_path_factory.mktemp("onnx_texts") / "texts.txt"
    path.write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n", encoding="utf-8")
    return path


def _encode(model: Path, text_file: Path, out: Path, *flags: str) -> np.ndarray:
    argv = ["encode", "--model", str(model), "--input", str(text_file), "--output", str(out)]
    assert main([*argv, *flags]) == 0
    return np.load(out)


def _parity(workdir: Path, export: Path, text_file: Path, tmp_path: Path, head: str) -> None:
    """ONNX fp32 == the JAX encoder (on the workdir itself) for plain, query and given prompts."""
    for flags in ([], ["--role", "query"], ["--prompt", "search: "]):
        ref = _encode(workdir, text_file, tmp_path / "jax.npy", "--head", head, *flags)
        got = _encode(
            export, text_file, tmp_path / "onnx.npy", "--head", head, "--backend", "onnx", *flags
        )
        assert got.shape == ref.shape == (300, ref.shape[1])
        cos = np.sum(got * ref, axis=1)
        assert cos.min() >= 0.9999, (head, flags, int(cos.argmin()), float(cos.min()))
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_folder_holds_both_graphs_and_their_description(bert_export):
    meta = json.loads((bert_export / "onnx" / "onnx.json").read_text())
    assert set(meta["heads"]) == {"dense_384", "pooled"}
    assert meta["heads"]["dense_384"]["dim"] == 384 and meta["heads"]["pooled"]["dim"] == 32
    assert meta["prompts"] == {"query": "query: ", "document": "passage: "}
    assert meta["max_seq_length"] == 16 and meta["pooling"] == "mean"
    assert meta["int8"]["reduce_range"] is True and meta["int8"]["weight_type"] == "QInt8"
    for head in ("dense_384", "pooled"):
        assert (bert_export / "onnx" / f"{head}.onnx").is_file()
        assert (bert_export / "onnx" / f"{head}_int8.onnx").is_file()
    assert not [p for p in bert_export.parent.iterdir() if p.name.startswith(".out.")]
    card = (bert_export / "README.md").read_text()
    assert "`onnx/<head>.onnx`" in card and "`dense_384`, `pooled`" in card


def test_graph_has_dynamic_batch_and_sequence_axes(bert_export):
    import onnxruntime as ort

    session = ort.InferenceSession(str(bert_export / "onnx" / "dense_384.onnx"))
    inputs = {i.name: i for i in session.get_inputs()}
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert all(isinstance(d, str) for d in inputs["input_ids"].shape)  # symbolic, not fixed
    for batch, seq in ((1, 3), (5, 16)):
        ids = np.full((batch, seq), 1000, np.int64)
        (out,) = session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        assert out.shape == (batch, 384)


@pytest.mark.parametrize("head", ["dense_384", "pooled"])
def test_bert_onnx_fp32_matches_jax_encode(bert_workdir, bert_export, text_file, tmp_path, head):
    _parity(bert_workdir, bert_export, text_file, tmp_path, head)


def test_qwen2_onnx_fp32_matches_jax_encode(qwen2_workdir, text_file, tmp_path):
    out = tmp_path / "export"
    assert main(["export", "--workdir", str(qwen2_workdir), "--output", str(out), "--onnx"]) == 0
    _parity(qwen2_workdir, out, text_file, tmp_path, "dense_384")


@pytest.mark.parametrize("backend", ["onnx", "onnx-int8"])
def test_onnx_vectors_stored_in_each_precision(bert_export, text_file, tmp_path, backend):
    """--precision on the ONNX backend = quantize() of its float output with the export's
    calibration.json ranges (int8/uint8), as on the JAX backend."""
    from jasper_jax.precision import quantize

    flags = ("--head", "dense_384", "--backend", backend)
    floats = _encode(bert_export, text_file, tmp_path / "f.npy", *flags)
    saved = json.loads((bert_export / "calibration.json").read_text())["outputs"]["dense_384"]
    ranges = np.array([saved["min"], saved["max"]], np.float32)
    for precision in ("int8", "ubinary", "float16"):
        got = _encode(bert_export, text_file, tmp_path / "p.npy", *flags, "--precision", precision)
        want = quantize(floats, precision, ranges if precision == "int8" else None)
        assert got.dtype == want.dtype and got.shape == want.shape, precision
        np.testing.assert_array_equal(got, want, err_msg=precision)


def test_int8_on_tiny_student_stays_close(bert_export, text_file, tmp_path):
    fp32 = _encode(bert_export, text_file, tmp_path / "a.npy", "--backend", "onnx")
    int8 = _encode(bert_export, text_file, tmp_path / "b.npy", "--backend", "onnx-int8")
    cos = np.sum(fp32 * int8, axis=1)
    assert not np.allclose(fp32, int8)  # it is really the quantized graph
    assert cos.min() >= 0.99, (int(cos.argmin()), float(cos.min()))


def test_bad_onnx_head_exits_2_and_leaves_the_old_export(bert_workdir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["export", "--workdir", str(bert_workdir), "--output", str(out)]
    assert main([*argv, "--onnx", "dense_7"]) == 2
    assert "--onnx 'dense_7'" in capsys.readouterr().err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    assert main(argv) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert main([*argv, "--overwrite", "--onnx", "dense_7"]) == 2
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_missing_onnxruntime_names_the_extra(bert_workdir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    out = tmp_path / "out"
    assert main(["export", "--workdir", str(bert_workdir), "--output", str(out), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime" in err and "jasper-jax[onnx]" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_encode_onnx_refuses_folders_and_heads_without_graphs(
    bert_workdir, bert_export, text_file, tmp_path, capsys
):
    plain = tmp_path / "plain"
    export_workdir(bert_workdir, plain)
    argv = ["encode", "--input", str(text_file), "--output", str(tmp_path / "v.npy")]
    assert main([*argv, "--model", str(plain), "--backend", "onnx"]) == 2
    assert "--onnx" in capsys.readouterr().err
    assert main([*argv, "--model", str(bert_export), "--backend", "onnx", "--head", "16"]) == 2
    assert "no ONNX graph" in capsys.readouterr().err
    assert not (tmp_path / "v.npy").exists()
