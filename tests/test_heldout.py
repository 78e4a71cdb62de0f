"""The demo's held-out set: fidelity + retrieval from one teacher pass; its table and picture."""

import numpy as np
import pytest

from jasper_jax.demo.main import spread_sample
from jasper_jax.evaluation import retrieval
from jasper_jax.evaluation.heldout import TARGET, HeldOut, heldout_texts
from jasper_jax.evaluation.learning_table import Row, markdown_table, plot_learning
from jasper_jax.fidelity import fidelity_metrics


def _task() -> retrieval.RetrievalTask:
    return retrieval.RetrievalTask(
        "toy", ["q0", "q1", "shared"], ["d0", "d1", "d2", "shared"], np.array([0, 1, 3])
    )


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _heldout(rng) -> HeldOut:
    texts = heldout_texts(["f0", "f1", "q1", "f2", "f3", "f4"], _task())
    a, b = _unit(rng.normal(size=(len(texts), 5))), _unit(rng.normal(size=(len(texts), 3)))
    stored = np.concatenate([a, b], axis=1)  # each teacher's unit rows side by side
    return HeldOut.build(texts, stored, [("A", 5), ("B", 3)], 6, _task())


def test_heldout_texts_keep_order_and_each_text_once():
    texts = heldout_texts(["f0", "q1"], _task())
    assert texts == ["f0", "q1", "q0", "shared", "d0", "d1", "d2"]


def test_scores_are_fidelity_on_the_first_rows_and_retrieval_by_text():
    rng = np.random.default_rng(0)
    held = _heldout(rng)
    vectors = _unit(rng.normal(size=(len(held.texts), 8)))
    scores = held.score(vectors)
    expected = fidelity_metrics(vectors[:6], held.target[:6])
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value)
    rows = {t: i for i, t in enumerate(held.texts)}
    q = vectors[[rows[t] for t in ("q0", "q1", "shared")]]
    d = vectors[[rows[t] for t in ("d0", "d1", "d2", "shared")]]
    found = retrieval.evaluate_float(q, d, np.array([0, 1, 3]))
    assert scores["ndcg_at_10"] == pytest.approx(found["ndcg_at_10"])
    # The text "shared" is both a query and a document: it retrieves itself first.
    assert held.score(held.stored)["recall_at_1"] >= 1 / 3


def test_teacher_rows_come_from_their_own_columns():
    held = _heldout(np.random.default_rng(1))
    teachers = held.teacher_scores()
    assert set(teachers) == {"A", "B", TARGET}
    assert teachers["A"] == held.score(held.stored[:, :5])
    assert teachers["B"] == held.score(held.stored[:, 5:])
    assert teachers[TARGET]["cosine"] == pytest.approx(1.0)
    assert "cosine" not in teachers["A"]  # 5-d vs an 8-d target


def test_missing_retrieval_text_is_refused():
    with pytest.raises(ValueError, match="lacks 1 retrieval texts"):
        HeldOut.build(["q0", "q1", "shared", "d0", "d1"], np.ones((5, 2)), [("A", 2)], 2, _task())


def test_spread_sample_covers_the_whole_split():
    texts = [f"t{i}" for i in range(1000)]
    sample = spread_sample(texts, 10)
    assert sample[0] == "t0" and sample[-1] == "t999" and len(set(sample)) == 10
    assert spread_sample(texts[:5], 10) == texts[:5]


def test_table_and_picture(tmp_path):
    rows = [
        Row("mpnet", "embedding", {"spearman": 0.9, "ndcg_at_10": 0.3, "recall_at_1": 0.2}, True),
        Row("start", "pooled", {"spearman": 0.8, "ndcg_at_10": 0.24, "recall_at_1": 0.14}),
        Row("stage 1", "dense_8", {"cosine": 0.88, "spearman": 0.94, "ndcg_at_10": 0.234}),
    ]
    table = markdown_table(rows).splitlines()
    assert len(table) == 5
    assert table[4].split("|")[3:7] == [" 0.8800 ", " 0.9400 ", " 0.2340 ", " n/a "]
    path = plot_learning(rows, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
