"""grain pipeline: fixed shapes, HF-identical tokens, exact resume, per-process batch rows."""

import hashlib

import numpy as np
import pytest
import transformers

from jasper_jax.data.eval_records import load_eval_arrays
from jasper_jax.data.pipeline import make_text_pipeline
from jasper_jax.data.teacher_assets import teacher_folder
from jasper_jax.data.teacher_dataset import build_teacher_dataset
from jasper_jax.data.teachers import Teacher
from jasper_jax.errors import UserError

ROWS, DIM = 100, 5


def fake_vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    return np.random.default_rng(seed).normal(size=DIM).astype(np.float32)


@pytest.fixture(scope="module")
def texts():
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "kine",
        "graze",
    ]
    # Lengths 1..20 words so that some texts exceed a short max_length.
    return [" ".join(words[(i + j) % len(words)] for j in range(1 + i % 20)) for i in range(ROWS)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, texts):
    teacher = Teacher(
        "fake", "fake", DIM, None, "m", "t", lambda b: np.stack([fake_vector(t) for t in b])
    )
    out = tmp_path_factory.mktemp("pipe") / "ds"
    # float16 on disk: the pipeline must hand out float32 unit vectors anyway.
    build_teacher_dataset(texts, [teacher], out, dtype="float16", progress=False)
    return out


@pytest.fixture(scope="module")
def tokenizer_dir():
    return teacher_folder("all-MiniLM-L6-v2")


def pipeline(dataset, tokenizer_dir, **kwargs):
    settings = dict(batch_size=8, max_length=12, seed=7, num_epochs=1)
    return make_text_pipeline(dataset, tokenizer_dir, **(settings | kwargs))


def test_batches_match_hf_tokenizer_and_unit_teacher(dataset, tokenizer_dir, texts):
    reference = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    iterator = pipeline(dataset, tokenizer_dir, prompt="query: ")
    batches = list(iterator)
    assert len(batches) == ROWS // 8
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "teacher", "index"}
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (8, 12)
        assert batch["input_ids"].dtype == batch["attention_mask"].dtype == np.int32
        assert batch["teacher"].dtype == np.float32 and batch["index"].dtype == np.int64
        batch_texts = ["query: " + texts[i] for i in batch["index"]]
        expected = reference(
            batch_texts, padding="max_length", truncation=True, max_length=12, return_tensors="np"
        )
        np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])
        np.testing.assert_array_equal(batch["attention_mask"], expected["attention_mask"])
        want = np.stack([fake_vector(texts[i]) for i in batch["index"]])
        want /= np.linalg.norm(want, axis=1, keepdims=True)
        np.testing.assert_allclose(batch["teacher"], want, atol=2e-3)  # float16 storage
        np.testing.assert_allclose(np.linalg.norm(batch["teacher"], axis=1), 1.0, atol=1e-6)
    seen = [i for batch in batches for i in batch["index"]]
    full_lengths = [len(reference("query: " + texts[i])["input_ids"]) for i in seen]
    assert iterator.truncated_texts == sum(n > 12 for n in full_lengths) > 0


def test_restored_state_replays_the_same_batches(dataset, tokenizer_dir):
    uninterrupted = list(pipeline(dataset, tokenizer_dir, num_epochs=3))
    first = pipeline(dataset, tokenizer_dir, num_epochs=3)
    for _ in range(14):  # past the first epoch boundary (12 batches per epoch)
        next(first)
    state = first.get_state()
    resumed = pipeline(dataset, tokenizer_dir, num_epochs=3)
    resumed.set_state(state)
    replay = [next(resumed) for _ in range(5)]
    for got, want in zip(replay, uninterrupted[14:19], strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    other_seed = next(pipeline(dataset, tokenizer_dir, seed=8))
    assert not np.array_equal(other_seed["index"], uninterrupted[0]["index"])
    epochs = [
        np.concatenate([b["index"] for b in uninterrupted[k * 12 : (k + 1) * 12]]) for k in range(3)
    ]
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch


def test_process_rows_split_the_global_batch(dataset, tokenizer_dir):
    whole = list(pipeline(dataset, tokenizer_dir, batch_size=10))
    parts = [
        list(pipeline(dataset, tokenizer_dir, batch_size=10, process_index=i, process_count=2))
        for i in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for k, batch in enumerate(whole):
        assert parts[0][k]["input_ids"].shape[0] == 5
        for key in batch:
            joined = np.concatenate([parts[0][k][key], parts[1][k][key]])
            np.testing.assert_array_equal(joined, batch[key])
    mine, theirs = (set(np.concatenate([b["index"] for b in p]).tolist()) for p in parts)
    assert not mine & theirs and mine | theirs == set(range(ROWS))  # disjoint, union = epoch


def test_eval_arrays_and_bad_settings(dataset, tokenizer_dir, texts):
    eval_texts, teacher, index = load_eval_arrays(dataset)
    assert eval_texts == texts and index.tolist() == list(range(ROWS))
    np.testing.assert_allclose(np.linalg.norm(teacher, axis=1), 1.0, atol=1e-6)
    with pytest.raises(UserError, match="fewer than one batch"):
        pipeline(dataset, tokenizer_dir, batch_size=ROWS + 2, process_count=2)
    with pytest.raises(UserError, match="multiple of the process count"):
        pipeline(dataset, tokenizer_dir, batch_size=9, process_count=2)
    with pytest.raises(UserError, match="no teacher dataset"):
        pipeline(dataset / "nothing", tokenizer_dir)


GROUPED = dict(length_groups=4, pad_multiple=4)  # 3 groups of 4 batches of 8 per epoch


def test_length_groups_pad_each_batch_to_its_own_longest_text(dataset, tokenizer_dir, texts):
    reference = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    fixed = list(pipeline(dataset, tokenizer_dir))
    grouped = list(pipeline(dataset, tokenizer_dir, **GROUPED))
    assert len(grouped) == 12 and len(fixed) == 12
    lengths = set()
    for batch in grouped:
        n = batch["input_ids"].shape[1]
        lengths.add(n)
        true = [min(len(reference(texts[i])["input_ids"]), 12) for i in batch["index"]]
        assert n % 4 == 0 or n == 12
        assert max(true) <= n < max(true) + 4  # rounded up to the multiple, never beyond
        expected = reference(
            [texts[i] for i in batch["index"]],
            padding="max_length",
            truncation=True,
            max_length=n,
            return_tensors="np",
        )
        np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])
        np.testing.assert_array_equal(batch["attention_mask"], expected["attention_mask"])
        assert batch["attention_mask"].sum(axis=1).tolist() == true
        want = np.stack([fake_vector(texts[i]) for i in batch["index"]])
        np.testing.assert_allclose(
            batch["teacher"], want / np.linalg.norm(want, axis=1)[:, None], atol=2e-3
        )
    assert len(lengths) > 1
    # The same epoch's rows (complete groups of the same shuffle), with less padding.
    rows = lambda bs: sorted(i for b in bs for i in b["index"].tolist())
    assert rows(grouped) == rows(fixed)
    pad = lambda bs: sum(b["attention_mask"].size for b in bs)
    assert pad(grouped) < pad(fixed)
    # Each batch holds texts of similar length: sorted within a group, so batches are tighter.
    spread = lambda bs: np.mean([np.ptp(b["attention_mask"].sum(1)) for b in bs])
    assert spread(grouped) < spread(fixed)


def test_length_groups_resume_inside_a_group_replays_the_same_batches(dataset, tokenizer_dir):
    settings = dict(num_epochs=2, **GROUPED)
    uninterrupted = list(pipeline(dataset, tokenizer_dir, **settings))
    for stop in (0, 2, 4, 13):  # before any, inside a group, at a group's end, next epoch
        first = pipeline(dataset, tokenizer_dir, **settings)
        for _ in range(stop):
            next(first)
        resumed = pipeline(dataset, tokenizer_dir, **settings)
        resumed.set_state(first.get_state())
        for got, want in zip(resumed, uninterrupted[stop:], strict=True):
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])


def test_length_groups_process_rows_split_each_global_batch(dataset, tokenizer_dir):
    whole = list(pipeline(dataset, tokenizer_dir, batch_size=10, length_groups=3))
    parts = [
        list(
            pipeline(
                dataset,
                tokenizer_dir,
                batch_size=10,
                length_groups=3,
                process_index=i,
                process_count=2,
            )
        )
        for i in range(2)
    ]
    assert len(parts[0]) == len(parts[1]) == len(whole) == 9
    for k, batch in enumerate(whole):
        for key in batch:  # both processes pad to the global batch's length
            joined = np.concatenate([parts[0][k][key], parts[1][k][key]])
            np.testing.assert_array_equal(joined, batch[key])


def test_length_groups_bad_settings_and_small_data(dataset, tokenizer_dir):
    # More groups than the data has batches: the whole epoch is one group.
    whole = list(pipeline(dataset, tokenizer_dir, length_groups=50, pad_multiple=1))
    assert len(whole) == ROWS // 8
    assert len({b["input_ids"].shape[1] for b in whole}) > 1
    for bad in (dict(length_groups=0), dict(pad_multiple=0)):
        with pytest.raises(UserError, match="length_groups"):
            pipeline(dataset, tokenizer_dir, **bad)
