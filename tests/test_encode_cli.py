"""`jasper-jax encode` on the real packaged all-MiniLM-L6-v2 against sentence-transformers."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jasper_jax.cli import main
from tests.text_samples import varied_texts


@pytest.fixture(scope="module")
def minilm() -> Path:
    from jasper_jax.data.teacher_assets import teacher_folder

    return teacher_folder("all-MiniLM-L6-v2")


@pytest.fixture(scope="module")
def texts_file(tmp_path_factory) -> tuple[Path, list[str]]:
    texts = varied_texts(300)
    path = tmp_path_factory.mktemp("enc") / "texts.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return path, texts


def test_encode_matches_sentence_transformers(minilm, texts_file, tmp_path):
    from sentence_transformers import SentenceTransformer

    path, texts = texts_file
    out = tmp_path / "v.npy"
    assert main(["encode", "--model", str(minilm), "--input", str(path), "--output", str(out)]) == 0
    ours = np.load(out)
    ref = SentenceTransformer(str(minilm), device="cpu").encode(
        texts, normalize_embeddings=True, batch_size=64
    )
    assert ours.shape == ref.shape == (300, 384) and ours.dtype == np.float32
    cos = (ours * ref).sum(-1)
    assert cos.min() >= 0.9999, (cos.argmin(), cos.min())
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)


def test_prompt_and_max_length_match_sentence_transformers(minilm, texts_file, tmp_path):
    from sentence_transformers import SentenceTransformer

    path, texts = texts_file
    out = tmp_path / "q.npy"
    args = ["--prompt", "query: ", "--max-length", "32", "--batch-size", "16"]
    argv = ["encode", "--model", str(minilm), "--input", str(path), "--output", str(out), *args]
    assert main(argv) == 0
    st = SentenceTransformer(str(minilm), device="cpu")
    st.max_seq_length = 32
    ref = st.encode(texts[:60], prompt="query: ", normalize_embeddings=True)
    assert ((np.load(out)[:60] * ref).sum(-1)).min() >= 0.9999


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_bad_inputs_exit_2_with_a_clear_message(minilm, texts_file, tmp_path, capsys):
    path, _ = texts_file
    out = str(tmp_path / "o.npy")
    base = ["encode", "--output", out]

    code, err = _run([*base, "--model", str(tmp_path / "nope"), "--input", str(path)], capsys)
    assert code == 2 and "does not exist" in err

    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, err = _run([*base, "--model", str(gpt), "--input", str(path)], capsys)
    assert code == 2 and "gpt2" in err and "bert" in err and "qwen2" in err

    latin = tmp_path / "latin1.txt"
    latin.write_bytes("fine line\ncaf\xe9\n".encode("latin-1"))
    code, err = _run([*base, "--model", str(minilm), "--input", str(latin)], capsys)
    assert code == 2 and "not UTF-8" in err and "line 2" in err

    code, err = _run([*base, "--model", str(minilm), "--input", str(path), "--head", "7"], capsys)
    assert code == 2 and "dense_7" in err and "pooled" in err

    code, err = _run([*base, "--model", str(minilm), "--input", str(tmp_path / "x")], capsys)
    assert code == 2 and "does not exist" in err
    assert not Path(out).exists()


def test_corrupt_weights_do_not_touch_existing_output(minilm, texts_file, tmp_path, capsys):
    path, _ = texts_file
    broken = tmp_path / "broken"
    shutil.copytree(minilm, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    out = tmp_path / "keep.npy"
    np.save(out, np.arange(3.0))
    code, err = _run(
        ["encode", "--model", str(broken), "--input", str(path), "--output", str(out)], capsys
    )
    assert code == 2 and "model.safetensors" in err
    np.testing.assert_array_equal(np.load(out), np.arange(3.0))


def test_console_script_exit_code(tmp_path):
    """The installed entry point (a real process) exits 2 without a traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "jasper_jax.cli", "encode", "--model", str(tmp_path / "none")]
        + ["--input", "x", "--output", "y.npy"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_bucket_lengths_bound_padding_and_programs():
    from jasper_jax.encode import bucket_length

    lengths = [bucket_length(n, 512) for n in range(1, 513)]
    for n, padded in enumerate(lengths, start=1):
        assert n <= padded <= 512 and padded % 8 == 0
        assert padded - n < max(8, n / 4), (n, padded)  # under a quarter of a row past 8 tokens
    assert len(set(lengths)) == 20  # programs one corpus up to 512 tokens can compile
    assert bucket_length(17, 512) == 24 and bucket_length(65, 512) == 80
    assert bucket_length(300, 256) == 256  # the cap wins
