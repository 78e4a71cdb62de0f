"""Fidelity metrics against plain definitions computed pair by pair."""

import itertools

import numpy as np
from scipy import stats

from jasper_jax.fidelity import fidelity_metrics, neighbour_recall, pairwise_spearman


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_pairwise_spearman_matches_the_pair_by_pair_definition():
    rng = np.random.default_rng(0)
    student, teacher = _unit(rng.normal(size=(40, 8))), _unit(rng.normal(size=(40, 12)))
    pairs = list(itertools.combinations(range(40), 2))
    s = [student[i] @ student[j] for i, j in pairs]
    t = [teacher[i] @ teacher[j] for i, j in pairs]
    want = stats.spearmanr(s, t).statistic
    np.testing.assert_allclose(pairwise_spearman(student, teacher), want, rtol=1e-10)
    np.testing.assert_allclose(pairwise_spearman(teacher, teacher), 1.0)


def test_neighbour_recall_and_cosine():
    rng = np.random.default_rng(1)
    teacher = _unit(rng.normal(size=(30, 6)))
    assert neighbour_recall(teacher, teacher, k=5) == 1.0
    noisy = _unit(teacher + 0.05 * rng.normal(size=teacher.shape))
    m = fidelity_metrics(noisy, teacher, k=5)
    assert 0.5 < m["nn_recall_at_5"] <= 1.0
    np.testing.assert_allclose(m["cosine"], np.mean(np.sum(noisy * teacher, axis=1)))
    assert "cosine" not in fidelity_metrics(noisy[:, :4], teacher, k=5)  # dims differ
