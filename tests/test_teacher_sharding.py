"""Teachers sharded over a mesh and across processes: the same dataset as one device, with the
weights spread over every device (a Qwen3-Embedding-style teacher, tiny and random)."""

import re
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.local_processes import run_processes
from tests.test_qwen3_teacher import QUERY_PROMPT, qwen3_folder  # noqa: F401
from tests.text_samples import varied_texts

MESHES = [(1, 8, 1), (2, 2, 2)]


def _texts(n: int = 70) -> list[str]:
    return [t for t in varied_texts(n) if t.strip()]


def _rows(out: Path) -> tuple[list[str], np.ndarray, dict]:
    from jasper_jax.data.teacher_dataset import open_teacher_dataset

    source, meta = open_teacher_dataset(out)
    rows = sorted(source.__getitems__(list(range(len(source)))), key=lambda r: int(r["index"]))
    texts = [r["text"].decode() for r in rows]
    return texts, np.stack([r["teacher"] for r in rows]).astype(np.float32), meta


def _build(folder: Path, out: Path, mesh_shape, **kwargs) -> Path:
    from jasper_jax.data.teacher_dataset import build_teacher_dataset

    spec = f"{folder}:prompt={QUERY_PROMPT}"
    build_teacher_dataset(
        _texts(), [spec], out, mesh_shape=mesh_shape, progress=False, chunk_size=16, **kwargs
    )
    return out


@pytest.fixture(scope="module")
def one_device(qwen3_folder, tmp_path_factory):  # noqa: F811
    return _rows(_build(qwen3_folder, tmp_path_factory.mktemp("one") / "data", (1, 1, 1)))


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_teacher_dataset_equals_one_device(qwen3_folder, one_device, tmp_path, mesh_shape):  # noqa: F811
    texts, want, meta = one_device
    got_texts, got, got_meta = _rows(_build(qwen3_folder, tmp_path / "data", mesh_shape))
    assert got_texts == texts
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got_meta["identity"] == meta["identity"]  # a float32 mesh is the same dataset


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_weights_are_spread_over_every_device(qwen3_folder, mesh_shape):  # noqa: F811
    from jasper_jax import sharding
    from jasper_jax.encode import TextEncoder
    from jasper_jax.models.loading import load_model

    model = load_model(qwen3_folder)
    total = sum(np.asarray(x).nbytes for x in jax.tree.leaves(model.params))
    mesh = sharding.make_mesh(mesh_shape)
    encoder = TextEncoder(model, mesh=mesh, sharded_weights=True)
    per_device = sharding.bytes_per_device(encoder.params)
    assert len(per_device) == 8
    assert max(per_device.values()) <= total / 6, (max(per_device.values()), total)
    # the training layout keeps weights whole over `data`: more per device on (2,2,2)
    training = TextEncoder(model, mesh=mesh)
    assert max(sharding.bytes_per_device(training.params).values()) >= max(per_device.values())


def test_bfloat16_teacher_is_close_and_named_in_the_identity(qwen3_folder, one_device, tmp_path):  # noqa: F811
    _, want, meta = one_device
    _, got, got_meta = _rows(
        _build(qwen3_folder, tmp_path / "data", (1, 8, 1), compute_dtype="bfloat16")
    )
    cos = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.99, cos.min()
    assert got_meta["teachers"][0]["compute_dtype"] == "bfloat16"
    assert "compute_dtype" not in meta["teachers"][0]


def _cli(folder: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jasper_jax.cli",
        "teachers",
        "--corpus",
        str(out.parent / "corpus.txt"),
        "--teacher",
        f"{folder}:prompt={QUERY_PROMPT}",
        "--output",
        str(out),
        "--block-size",
        "16",
        *extra,
    ]


@pytest.mark.slow
def test_two_processes_build_the_one_process_dataset(qwen3_folder, one_device, tmp_path):  # noqa: F811
    """2 processes x 4 CPU devices, one (2,4,1) mesh: the same rows as one device; each
    process wrote its own blocks (5 blocks of 16 rows: 0, 2, 4 by process 0; 1, 3 by 1)."""
    texts, want, _ = one_device
    (tmp_path / "corpus.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "data"
    outputs = run_processes(
        lambda i, port: (
            _cli(qwen3_folder, out, "--mesh-shape", "2,4,1")
            + [f"--coordinator=127.0.0.1:{port}", "--num-processes=2", f"--process-id={i}"]
        ),
        timeout=600,
    )
    got_texts, got, meta = _rows(out)
    assert got_texts == texts
    np.testing.assert_allclose(got, want, atol=1e-5)
    wrote = [
        re.search(r"process (\d) wrote rows (\d+)-", line) for line in "".join(outputs).splitlines()
    ]
    writers = sorted((int(m[2]), int(m[1])) for m in wrote if m)
    assert writers == [(0, 0), (16, 1), (32, 0), (48, 1), (64, 0)]


def test_bad_mesh_exits_2_and_writes_nothing(qwen3_folder, tmp_path, capsys):  # noqa: F811
    from jasper_jax.cli import main

    (tmp_path / "corpus.txt").write_text("one text\nanother\n", encoding="utf-8")
    out = tmp_path / "data"
    for mesh, words in (("3,1,1", "do not divide"), ("1,8", "three sizes"), ("2,8,1", "needs 16")):
        code = main(_cli(qwen3_folder, out, "--mesh-shape", mesh)[3:])
        err = capsys.readouterr().err
        assert code == 2 and words in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    code = main(_cli(qwen3_folder, tmp_path / "x", "--output", "gs://bucket/teachers")[3:])
    err = capsys.readouterr().err
    assert code == 2 and "gcsfuse" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "gs:").exists() and not Path("gs:").exists()


def test_a_weight_whose_rule_cannot_apply_is_still_split_over_every_device():
    """An odd vocabulary cannot go on `tensor`; spread puts `tensor` on the embedding width."""
    from jax.sharding import PartitionSpec as P

    from jasper_jax import sharding

    mesh = sharding.make_mesh((2, 2, 2))
    rules = sharding.INFERENCE_AXIS_RULES
    spec = sharding.spec_for((151669, 1024), ("vocab", "embed"), mesh, rules)
    assert spec == P(None, ("fsdp", "data"))
    assert sharding.spread(spec, (151669, 1024), mesh) == P(None, ("fsdp", "data", "tensor"))
    # a kernel whose rules use every axis keeps its layout; an 8-wide norm takes what divides it
    kernel = sharding.spec_for((1024, 2048), ("embed", "heads"), mesh, rules)
    assert sharding.spread(kernel, (1024, 2048), mesh) == kernel == P(("fsdp", "data"), "tensor")
    assert sharding.spread(P(None), (6,), mesh) == P("data")
