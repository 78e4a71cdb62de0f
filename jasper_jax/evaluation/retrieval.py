"""A labelled retrieval task built offline from the bundled corpus, and its metrics.

Held-out WordNet (the corpus's validation split, whose synsets never appear in training): each
query is a usage example of a synset ("in a weak financial state"), the documents are all
held-out definitions, and the one relevant document is the query's own synset's definition
("the way something is with respect to its main attributes"). Scores: nDCG@10 and recall@1.

Ranking is exact (brute force): cosine for float vectors, Hamming distance on packed sign bits
for binary-quantised vectors (`jasper_jax.precision`, as `encode --precision ubinary`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jasper_jax import precision
from jasper_jax.data.corpus import load_embedded_records
from jasper_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
    """queries[i] is relevant to documents[relevant[i]] only.

    Attributes:
      queries: Q texts; documents: D texts; relevant: int64 [Q] document indices.
    """

    name: str
    queries: list[str]
    documents: list[str]
    relevant: np.ndarray


def wordnet_task(max_queries: int | None = 1000, max_documents: int | None = None) -> RetrievalTask:
    """Example -> definition retrieval on the held-out synsets of the bundled corpus.

    One query per synset (its first example); queries are spread evenly over the split when
    `max_queries` cuts them. `max_documents` keeps every relevant definition and fills up with
    the other definitions in corpus order.
    """

    records = load_embedded_records("validation")
    glosses = {r["synset"]: r["text"] for r in records if r["kind"] == "gloss"}
    examples: dict[str, str] = {}
    for r in records:
        if r["kind"] == "example" and r["synset"] in glosses:
            examples.setdefault(r["synset"], r["text"])
    synsets = list(examples)
    if max_queries and len(synsets) > max_queries:
        keep = np.linspace(0, len(synsets) - 1, max_queries).round().astype(int)
        synsets = [synsets[i] for i in keep]
    doc_ids = list(glosses)
    if max_documents and max_documents < len(doc_ids):
        if max_documents < len(synsets):
            raise UserError(
                f"--docs {max_documents} is fewer than the {len(synsets)} relevant definitions; "
                "raise --docs or lower --queries"
            )
        wanted = set(synsets)
        others = [s for s in doc_ids if s not in wanted][: max_documents - len(synsets)]
        doc_ids = [s for s in doc_ids if s in wanted or s in set(others)]
    position = {s: i for i, s in enumerate(doc_ids)}
    return RetrievalTask(
        name="wordnet-example-to-definition",
        queries=[examples[s] for s in synsets],
        documents=[glosses[s] for s in doc_ids],
        relevant=np.array([position[s] for s in synsets], np.int64),
    )


def binarize(x: np.ndarray) -> np.ndarray:
    """Sign bits packed 8 per byte: [N, d] float -> [N, ceil(d / 8)] uint8 (bit 1 where x > 0):
    the rows `jasper-jax encode --precision ubinary` writes (`jasper_jax.precision`)."""
    return precision.quantize(x, "ubinary")


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[Na, B] x [Nb, B] packed bits -> [Na, Nb] int32 counts of differing bits."""
    return precision.hamming_distances(a, b)


def sign_vectors(x: np.ndarray) -> np.ndarray:
    """The unit vectors that binary quantisation keeps: sign(x) / sqrt(d), [N, d] float32.

    Their dot product is 1 - 2 * hamming / d, so they rank exactly as Hamming distance does.
    """
    return np.where(x > 0, 1.0, -1.0).astype(np.float32) / np.sqrt(x.shape[1])


def rank_of_relevant(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of each row's relevant column under descending `scores` [Q, D].

    Ties count against the relevant document (it ranks after every equal score), so a constant
    scorer gets no credit.
    """
    target = scores[np.arange(len(scores)), relevant][:, None]
    return (scores > target).sum(axis=1) + (scores == target).sum(axis=1)


def ndcg_gains(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-query nDCG@k [Q] with one relevant document per query (ideal DCG = 1)."""
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def retrieval_metrics(ranks: np.ndarray, k: int = 10) -> dict[str, float]:
    """nDCG@k and recall@1 with one relevant document per query (ideal DCG = 1)."""
    gain = ndcg_gains(ranks, k)
    return {f"ndcg_at_{k}": float(gain.mean()), "recall_at_1": float((ranks == 1).mean())}


def query_ranks(
    queries: np.ndarray, docs: np.ndarray, relevant: np.ndarray, binary: bool = False
) -> np.ndarray:
    """1-based rank [Q] of each query's relevant document: cosine ranking of unit rows, or
    (`binary`) Hamming ranking of their sign bits. queries [Q, d], docs [D, d]."""
    if binary:
        distances = hamming_distances(binarize(queries), binarize(docs))
        return rank_of_relevant(-distances, relevant)
    return rank_of_relevant(queries @ docs.T, relevant)


def evaluate_float(queries: np.ndarray, docs: np.ndarray, relevant: np.ndarray) -> dict:
    """Cosine ranking of unit rows: queries [Q, d], docs [D, d]."""
    return retrieval_metrics(query_ranks(queries, docs, relevant))


def evaluate_binary(queries: np.ndarray, docs: np.ndarray, relevant: np.ndarray) -> dict:
    """Hamming ranking of the sign bits of queries [Q, d] and docs [D, d]."""
    return retrieval_metrics(query_ranks(queries, docs, relevant, binary=True))


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of `a - b` over queries and its 95% paired-bootstrap interval (queries resampled
    with replacement, the same draw for both): (difference, low, high). a, b: [Q] per-query
    scores of two systems on the same queries."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    draws = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[draws].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(low), float(high)
