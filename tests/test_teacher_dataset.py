"""Teacher dataset: vectors match sentence-transformers; slices resume; bad inputs are refused."""

import hashlib

import numpy as np
import pytest

from jasper_jax.data.corpus import load_corpus
from jasper_jax.data.teacher_dataset import build_teacher_dataset, open_teacher_dataset
from jasper_jax.data.teachers import Teacher, load_teacher
from jasper_jax.errors import UserError

DIM = 6


def fake_vector(text: str) -> np.ndarray:
    """Deterministic stand-in embedding; NaN for 'NaN!' texts and zeros for 'ZERO!' texts."""
    if "NaN!" in text:
        return np.full(DIM, np.nan, np.float32)
    if "ZERO!" in text:
        return np.zeros(DIM, np.float32)
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).normal(size=DIM).astype(np.float32) * 3.0


def fake_teacher(name="fake", dim=DIM, tokenizer="tok-a", calls=None, fail_on=None) -> Teacher:
    def encode(texts):
        if fail_on is not None and fail_on in texts:
            raise KeyboardInterrupt("machine lost")
        if calls is not None:
            calls.extend(texts)
        return np.stack([fake_vector(t)[:dim] for t in texts])

    return Teacher(name, name, dim, None, "model-a", tokenizer, encode)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="session")
def real_texts():
    # Spread out (glosses, examples, fortunes); few texts because mpnet encodes ~70 texts/s.
    return load_corpus("embedded")[::2591][:64]


@pytest.fixture(scope="session")
def real_dataset(tmp_path_factory, real_texts):
    teachers = [load_teacher("all-mpnet-base-v2"), load_teacher("all-MiniLM-L6-v2")]
    out = tmp_path_factory.mktemp("real") / "ds"
    build_teacher_dataset(real_texts, teachers, out, progress=False, chunk_size=128)
    return out, teachers


def test_rows_equal_each_teachers_own_normalised_vectors(real_dataset, real_texts):
    from sentence_transformers import SentenceTransformer

    out, teachers = real_dataset
    source, meta = open_teacher_dataset(out)
    rows = source.__getitems__(list(range(len(source))))
    assert len(rows) == len(real_texts) == meta["rows"]
    order = np.argsort([int(r["index"]) for r in rows])
    stored = np.stack([rows[i]["teacher"] for i in order])
    assert [rows[i]["text"].decode() for i in order] == real_texts
    assert [(t["name"], t["dim"], t["offset"]) for t in meta["teachers"]] == [
        ("all-mpnet-base-v2", 768, 0),
        ("all-MiniLM-L6-v2", 384, 768),
    ]
    for teacher, entry in zip(teachers, meta["teachers"], strict=True):
        reference = SentenceTransformer(teacher.folder, device="cpu").encode(
            real_texts, normalize_embeddings=True
        )
        part = stored[:, entry["offset"] : entry["offset"] + entry["dim"]]
        cosine = np.sum(unit(part) * reference, axis=1)
        assert cosine.min() >= 0.9999
        np.testing.assert_allclose(np.linalg.norm(part, axis=1), 1.0, atol=1e-5)
    assert "not renormalised" in meta["normalisation"]


def test_tfds_corpus_reads_back_the_texts(real_dataset, real_texts):
    out, _ = real_dataset
    texts = load_corpus(f"tfds:{out / 'dataset'}:train:text")
    assert sorted(texts) == sorted(real_texts)


def test_slices_resume_and_combine(tmp_path):
    texts = [f"sentence number {i}" for i in range(50)]
    out = tmp_path / "ds"
    kwargs = dict(num_shards=3, chunk_size=4, progress=False)
    first = build_teacher_dataset(texts, [fake_teacher()], out, shard_index=0, **kwargs)
    assert first.dataset_dir is None and first.pending_slices == [1, 2]
    with pytest.raises(UserError, match="1 of 3 slices done"):
        open_teacher_dataset(out)
    # Slice 1 (rows 16..32) dies at row 25: chunks 16-20 and 20-24 are already on disk.
    with pytest.raises(KeyboardInterrupt):
        build_teacher_dataset(
            texts, [fake_teacher(fail_on=texts[25])], out, shard_index=1, **kwargs
        )
    calls = []
    build_teacher_dataset(texts, [fake_teacher(calls=calls)], out, shard_index=1, **kwargs)
    assert calls == texts[24:33]  # only the unfinished chunks were redone
    done = build_teacher_dataset(texts, [fake_teacher()], out, shard_index=2, **kwargs)
    source, meta = open_teacher_dataset(done.dataset_dir)
    rows = {int(r["index"]): r for r in source.__getitems__(list(range(len(source))))}
    assert sorted(rows) == list(range(50))
    for i, text in enumerate(texts):
        assert rows[i]["text"].decode() == text
        np.testing.assert_allclose(rows[i]["teacher"], unit(fake_vector(text)), atol=1e-6)
    assert not (out / "_parts").exists()


def test_nan_zero_and_empty_texts_are_counted(tmp_path):
    texts = ["a", "", "b NaN!", "c", "   ", "d ZERO!", "e"]
    result = build_teacher_dataset(texts, [fake_teacher()], tmp_path / "ds", progress=False)
    source, meta = open_teacher_dataset(result.dataset_dir)
    assert result.skipped_empty == meta["skipped_empty"] == 2
    # Rows are numbered after empty texts are dropped: a, b NaN!, c, d ZERO!, e.
    assert meta["rejected"] == {"count": 2, "first_rows": [1, 3]}
    assert sorted(r["text"].decode() for r in source) == ["a", "c", "e"]
    with pytest.raises(UserError, match="every one of 2 texts"):
        build_teacher_dataset(["x NaN!", "y ZERO!"], [fake_teacher()], tmp_path / "bad")


def test_resume_with_other_teachers_is_refused(tmp_path):
    texts = [f"t{i}" for i in range(12)]
    out = tmp_path / "ds"
    kwargs = dict(num_shards=2, chunk_size=4, progress=False)
    build_teacher_dataset(texts, [fake_teacher()], out, shard_index=0, **kwargs)
    for other, message in [
        (fake_teacher(name="other"), "teachers"),
        (fake_teacher(dim=4), "teachers"),
        (fake_teacher(tokenizer="tok-b"), "tokenizer fingerprints differ"),
    ]:
        with pytest.raises(UserError, match=message):
            build_teacher_dataset(texts, [other], out, shard_index=1, **kwargs)
    with pytest.raises(UserError, match="corpus_fingerprint"):
        build_teacher_dataset(texts[::-1], [fake_teacher()], out, shard_index=1, **kwargs)


def test_existing_different_dataset_is_kept_unless_overwrite(tmp_path):
    out = tmp_path / "ds"
    build_teacher_dataset(["one", "two"], [fake_teacher()], out, progress=False)
    files = {p: p.read_bytes() for p in (out / "dataset").iterdir()}
    with pytest.raises(UserError, match="different teacher dataset"):
        build_teacher_dataset(["three"], [fake_teacher()], out, dtype="float16", progress=False)
    assert {p: p.read_bytes() for p in (out / "dataset").iterdir()} == files
    build_teacher_dataset(["three"], [fake_teacher()], out, dtype="float16", overwrite=True)
    source, meta = open_teacher_dataset(out)
    assert meta["dtype"] == "float16" and source[0]["teacher"].dtype == np.float16
    assert [r["text"] for r in source] == [b"three"]
    assert sorted(p.name for p in out.iterdir()) == ["dataset"]  # no temp folders left


def test_foreign_folder_and_bad_arguments(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a teacher dataset"):
        build_teacher_dataset(["a"], [fake_teacher()], tmp_path, progress=False)
    with pytest.raises(UserError, match="out of range"):
        build_teacher_dataset(["a"], [fake_teacher()], tmp_path / "x", shard_index=2, num_shards=2)
    with pytest.raises(UserError, match="dtype"):
        build_teacher_dataset(["a"], [fake_teacher()], tmp_path / "x", dtype="int8")
    with pytest.raises(UserError, match="neither a known name"):
        build_teacher_dataset(["a"], [str(tmp_path)], tmp_path / "x")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match="not valid UTF-8"):
        build_teacher_dataset(str(bad), [fake_teacher()], tmp_path / "x")


def test_jax_and_torch_teacher_backends_agree(real_texts):
    jax_teacher = load_teacher("all-MiniLM-L6-v2", backend="jax")
    torch_teacher = load_teacher("all-MiniLM-L6-v2", backend="torch")
    assert jax_teacher.dim == torch_teacher.dim == 384
    assert jax_teacher.describe() == torch_teacher.describe()  # same model, same fingerprints
    a, b = (unit(t.encode(real_texts[:32])) for t in (jax_teacher, torch_teacher))
    assert np.sum(a * b, axis=1).min() >= 0.9999
    with pytest.raises(UserError, match="choose one of"):
        load_teacher("all-MiniLM-L6-v2", backend="tf")


def test_texts_cut_at_a_teachers_max_length_are_counted(tmp_path, real_texts):
    from transformers import AutoTokenizer

    texts = real_texts[:24]
    jax_teacher = load_teacher("all-MiniLM-L6-v2", backend="jax", max_length=12)
    torch_teacher = load_teacher("all-MiniLM-L6-v2", backend="torch", max_length=12)
    tokenizer = AutoTokenizer.from_pretrained(jax_teacher.folder)
    expected = sum(len(ids) > 12 for ids in tokenizer(texts)["input_ids"])
    assert 0 < expected < len(texts)
    assert jax_teacher.count_truncated(texts) == torch_teacher.count_truncated(texts) == expected
    result = build_teacher_dataset(texts, [jax_teacher], tmp_path / "ds", progress=False)
    _, meta = open_teacher_dataset(tmp_path / "ds")
    assert meta["truncated_by_teacher"] == result.truncated == {"all-MiniLM-L6-v2": expected}
    again = build_teacher_dataset(texts, [jax_teacher], tmp_path / "ds", progress=False)
    assert again.truncated == result.truncated  # read back from the finished dataset
    # At the folder's own limit (256 tokens) none of these texts is cut.
    assert load_teacher("all-MiniLM-L6-v2").count_truncated(texts) == 0


@pytest.mark.parametrize("slow", ["jax", "torch"])
def test_auto_backend_is_the_one_measured_faster(real_texts, slow, monkeypatch, caplog, tmp_path):
    import time

    from jasper_jax.data import teacher_backends, teachers

    real = {"jax": teachers._jax_encoder, "torch": teachers._torch_encoder}
    slow_calls = []

    def slowed(backend):
        def load(*args, **kwargs):
            encode, dim, count = real[backend](*args, **kwargs)

            def encode_slowly(texts):
                slow_calls.append(len(texts))
                time.sleep(0.05 * len(texts))
                return encode(texts)

            return encode_slowly, dim, count

        return load

    monkeypatch.setenv("JASPER_JAX_CACHE", str(tmp_path))  # no choice remembered yet
    monkeypatch.setattr(teachers, f"_{slow}_encoder", slowed(slow))
    sample = real_texts[: teacher_backends.MIN_SAMPLE]
    with caplog.at_level("INFO", logger="jasper_jax.data"):
        teacher = load_teacher("all-MiniLM-L6-v2", sample=sample)
    fast = {"jax": "torch", "torch": "jax"}[slow]
    assert "teacher all-MiniLM-L6-v2: jax " in caplog.text
    assert f"texts/s on {len(sample)} sample texts; using {fast}" in caplog.text
    timed_calls = len(slow_calls)
    assert timed_calls == 2  # warm-up and timed pass
    teacher.encode(real_texts[:4])
    assert len(slow_calls) == timed_calls  # the chosen encoder is not the slowed one
    # The choice is remembered: a later build (a resumed one) uses it without timing, even when
    # the other side would now be faster, so its vectors are the same as the first build's.
    monkeypatch.setattr(teachers, f"_{slow}_encoder", real[slow])
    monkeypatch.setattr(teachers, f"_{fast}_encoder", slowed(fast))
    caplog.clear()
    with caplog.at_level("INFO", logger="jasper_jax.data"):
        load_teacher("all-MiniLM-L6-v2", sample=sample)
    assert f"{fast}, as timed before on this machine" in caplog.text
    assert "texts/s" not in caplog.text
    if fast == "torch":  # our port is not loaded only to be set aside again

        def not_loaded(*args, **kwargs):
            raise AssertionError("the jax port was loaded though torch was remembered")

        monkeypatch.setattr(teachers, "_jax_encoder", not_loaded)
        assert load_teacher("all-MiniLM-L6-v2", sample=sample).dim == 384
        monkeypatch.setattr(teachers, "_jax_encoder", real["jax"])
    # Small builds time nothing and take our port, as before.
    assert teacher_backends.timing_sample(real_texts) == []
    caplog.clear()
    with caplog.at_level("INFO", logger="jasper_jax.data"):
        load_teacher("all-MiniLM-L6-v2", sample=sample[:10])
    assert "texts/s" not in caplog.text
