"""One held-out set that scores fidelity and retrieval together, teachers included, from one
teacher pass.

The demo's validation teacher dataset holds, in this order, the first `fidelity_texts` held-out
texts (fidelity: cosine and pairwise Spearman against the target) and every query and document
of the held-out WordNet retrieval task (`retrieval.wordnet_task`). Its stored rows are the
teachers' unit vectors side by side, so each teacher's own vectors, and the concatenated target,
are scored from the dataset with no second teacher pass; a student encodes the texts once, for
every head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from jasper_jax.encode import TextEncoder
from jasper_jax.evaluation import retrieval
from jasper_jax.fidelity import fidelity_metrics
from jasper_jax.vectors import unit_rows

TARGET = "teacher target"  # the concatenated, renormalised teacher vectors


def heldout_texts(fidelity: Sequence[str], task: retrieval.RetrievalTask) -> list[str]:
    """The texts to encode with the teachers: the fidelity texts, then the task's queries and
    documents not already among them (order kept, each text once)."""
    return list(dict.fromkeys([*fidelity, *task.queries, *task.documents]))


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """texts [N]; raw stored teacher rows [N, D] (per-teacher unit slices); the first
    `fidelity_count` rows score fidelity; query/document rows index the retrieval task."""

    texts: list[str]
    stored: np.ndarray
    teacher_slices: dict[str, tuple[int, int]]
    fidelity_count: int
    query_rows: np.ndarray
    document_rows: np.ndarray
    relevant: np.ndarray

    @property
    def target(self) -> np.ndarray:
        return unit_rows(self.stored)

    @classmethod
    def build(
        cls,
        texts: list[str],
        stored: np.ndarray,
        teachers: Sequence[tuple[str, int]],
        fidelity_count: int,
        task: retrieval.RetrievalTask,
    ) -> HeldOut:
        """From a validation dataset's texts and rows (`load_eval_arrays` order; the texts of
        `heldout_texts`) and its teachers as (name, dim) in column order."""
        row = {t: i for i, t in enumerate(texts)}
        missing = [t for t in [*task.queries, *task.documents] if t not in row]
        if missing or fidelity_count > len(texts):
            raise ValueError(
                f"held-out data lacks {len(missing)} retrieval texts (first: {missing[:1]}) "
                f"or has fewer than {fidelity_count} rows: rebuild it from heldout_texts()"
            )
        slices, start = {}, 0
        for name, dim in teachers:
            slices[name] = (start, start + dim)
            start += dim
        return cls(
            texts,
            np.asarray(stored, np.float32),
            slices,
            fidelity_count,
            np.array([row[q] for q in task.queries]),
            np.array([row[d] for d in task.documents]),
            task.relevant,
        )

    def score(self, vectors: np.ndarray) -> dict[str, float]:
        """Unit vectors [N, d] for every held-out text -> fidelity on the first rows (cosine
        only where d equals the target's dim) and retrieval nDCG@10 / recall@1."""
        vectors = unit_rows(vectors)
        n = self.fidelity_count
        scores = fidelity_metrics(vectors[:n], self.target[:n])
        found = retrieval.evaluate_float(
            vectors[self.query_rows], vectors[self.document_rows], self.relevant
        )
        return {**scores, **found}

    def teacher_scores(self) -> dict[str, dict[str, float]]:
        """The same scores for each teacher's own vectors and for the target itself."""
        out = {
            name: self.score(self.stored[:, a:b]) for name, (a, b) in self.teacher_slices.items()
        }
        out[TARGET] = self.score(self.stored)
        return out


def encode_heldout(
    encoder: TextEncoder, heldout: HeldOut, heads: Sequence[str], max_length: int | None = None
) -> dict[str, np.ndarray]:
    """Every held-out text once per head, [N, d] each: the retrieval task's queries with the
    model's query prompt, every other text (documents, fidelity rows) with its document
    prompt; no prompt where the model has none."""
    prompts = encoder.model.prompts
    vectors = encoder.encode_heads(
        heldout.texts, heads=heads, prompt=prompts.get("document") or None, max_length=max_length
    )
    if prompts.get("query"):
        queries = [heldout.texts[i] for i in heldout.query_rows]
        asked = encoder.encode_heads(
            queries, heads=heads, prompt=prompts["query"], max_length=max_length
        )
        for head in heads:
            vectors[head][heldout.query_rows] = asked[head]
    return vectors
