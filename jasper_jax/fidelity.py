"""How closely a student's vectors track its teachers' on held-out texts (plain NumPy/SciPy)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def pairwise_spearman(student: np.ndarray, teacher: np.ndarray) -> float:
    """Spearman correlation between the student's and the teacher's pairwise cosine similarities.

    Args:
      student: [N, d] and teacher: [N, D] unit rows (dims may differ); the N(N-1)/2 pairs i < j.
    """
    rows, cols = np.triu_indices(len(student), k=1)
    # Upper triangles of the [N, N] Gram matrices: O(N^2) memory, not O(N^2 d) gathered rows.
    s = (student @ student.T)[rows, cols]
    t = (teacher @ teacher.T)[rows, cols]
    return float(stats.spearmanr(s, t).statistic)


def neighbour_recall(student: np.ndarray, teacher: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each text's k nearest teacher neighbours that are also among its k nearest
    student neighbours (self excluded)."""

    def top_k(x):
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :k]

    s, t = top_k(student), top_k(teacher)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(s, t, strict=True)]))


def fidelity_metrics(student: np.ndarray, teacher: np.ndarray, k: int = 10) -> dict[str, float]:
    """cosine (only when dims match: mean <s_i, t_i>), spearman, recall@k of teacher neighbours."""
    out = {
        "spearman": pairwise_spearman(student, teacher),
        f"nn_recall_at_{k}": neighbour_recall(student, teacher, k),
    }
    if student.shape[1] == teacher.shape[1]:
        out["cosine"] = float(np.mean(np.sum(student * teacher, axis=1)))
    return out
