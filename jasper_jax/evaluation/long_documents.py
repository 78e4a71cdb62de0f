"""Long-document retrieval: one vector per document vs the best of its chunk vectors.

Task (built offline from the bundled corpus's held-out split): documents are runs of consecutive
WordNet definitions of synsets that have usage examples (hundreds of tokens each); a query is a
usage example of a synset (every example of it), relevant to the one document holding that
synset's definition. A single document vector must summarise dozens of definitions; a chunk
vector covers a few, so best-chunk scoring should find more.

Rows compare, with the same chunk spans:
- the teacher target (per-teacher unit vectors concatenated): document vector (each teacher
  reads the document up to its length limit) vs best chunk (each chunk encoded on its own);
- a student: document vector vs best chunk, both from ONE pass over the document (late
  chunking: chunk = mean of its tokens' states).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from jasper_jax.data.chunking import (
    ChunkingConfig,
    Span,
    chunk_texts,
    group_texts,
    join_sentences,
    plain_tokenizer,
)
from jasper_jax.data.corpus import load_embedded_records
from jasper_jax.encode import TextEncoder, resolve_head
from jasper_jax.encode_chunks import ChunkEncoder
from jasper_jax.evaluation.retrieval import rank_of_relevant, retrieval_metrics


@dataclasses.dataclass(frozen=True)
class LongDocumentTask:
    """queries[i] is relevant to documents[relevant[i]] only; spans: chunks of each document."""

    queries: list[str]
    documents: list[str]
    spans: list[list[Span]]
    relevant: np.ndarray


def long_document_task(
    tokenizer,
    *,
    min_tokens: int = 128,
    max_tokens: int = 480,
    max_documents: int = 120,
    max_queries: int = 500,
    chunking: ChunkingConfig | str = "sentences:64",
    seed: int = 0,
) -> LongDocumentTask:
    """The task on the held-out synsets; lengths and chunk sizes in ``tokenizer``'s tokens (an
    HF fast tokenizer; the student's, so chunks match what the student is trained on)."""

    records = load_embedded_records("validation")
    examples: dict[str, list[str]] = {}
    for r in records:
        if r["kind"] == "example":
            examples.setdefault(r["synset"], []).append(r["text"])
    # Definitions of synsets with usage examples, in corpus order: every one can be asked for.
    glosses = [r for r in records if r["kind"] == "gloss" and r["synset"] in examples]
    backend = plain_tokenizer(tokenizer)
    count = lambda text: len(backend.encode(text, add_special_tokens=False).ids)
    texts = [g["text"] for g in glosses]
    groups = group_texts(texts, count, min_tokens, max_tokens, seed)[:max_documents]
    documents = [join_sentences([texts[i] for i in group]) for group in groups]
    pairs = [  # every usage example of every synset whose definition is in a document
        (example, d)
        for d, group in enumerate(groups)
        for i in group
        for example in examples.get(glosses[i]["synset"], [])
    ]
    if len(pairs) > max_queries:
        keep = np.linspace(0, len(pairs) - 1, max_queries).round().astype(int)
        pairs = [pairs[i] for i in keep]
    if isinstance(chunking, str):
        chunking = ChunkingConfig.parse(chunking)
    return LongDocumentTask(
        queries=[q for q, _ in pairs],
        documents=documents,
        spans=chunk_texts(documents, backend, chunking),
        relevant=np.array([d for _, d in pairs], np.int64),
    )


def best_chunk_scores(
    queries: np.ndarray, chunks: np.ndarray, owner: np.ndarray, num_documents: int
) -> np.ndarray:
    """[Q, N] scores: each document's best chunk cosine for each query (-inf: no chunk).

    queries: [Q, d] and chunks: [M, d] unit rows; owner: [M] document of each chunk.
    """
    scores = np.full((num_documents, len(queries)), -np.inf, np.float32)
    np.maximum.at(scores, owner, chunks @ queries.T)
    return scores.T


def score_rows(
    task: LongDocumentTask,
    queries: np.ndarray,
    documents: np.ndarray,
    chunks: np.ndarray,
    owner: np.ndarray,
) -> dict[str, dict[str, float]]:
    """{"document vector": metrics, "best chunk": metrics} for one model's unit vectors."""
    single = retrieval_metrics(rank_of_relevant(queries @ documents.T, task.relevant))
    best = best_chunk_scores(queries, chunks, owner, len(task.documents))
    return {
        "document vector": single,
        "best chunk": retrieval_metrics(rank_of_relevant(best, task.relevant)),
    }


def student_rows(model, task: LongDocumentTask, batch_size: int = 16, attention=None) -> dict:
    """Rows for a loaded student (``LoadedModel``): its default output, one pass per document."""

    kwargs = {"attention": attention} if attention is not None else {}
    encoder = TextEncoder(model, batch_size=batch_size, **kwargs)
    head = resolve_head(model.config, None)
    result = ChunkEncoder(encoder).encode(
        task.documents, spans=task.spans, heads=(head,), max_length=_length_limit(model)
    )
    queries = encoder.encode(task.queries, head=head, prompt=model.prompts.get("query") or None)
    return score_rows(task, queries, result.documents[head], result.chunks[head], result.owner)


def teacher_rows(
    encode_queries: Callable[[Sequence[str]], np.ndarray],
    documents: np.ndarray,
    chunks: np.ndarray,
    task: LongDocumentTask,
) -> dict:
    """Rows for the teacher target: stored document/chunk vectors (a chunk-mode teacher dataset
    of ``task``'s documents and spans, all chunks kept) and a query encoder."""
    owner = np.repeat(np.arange(len(task.spans)), [len(s) for s in task.spans])
    return score_rows(task, encode_queries(task.queries), documents, chunks, owner)


def _length_limit(model) -> int:
    return int(getattr(model.config.encoder, "max_position_embeddings", model.max_seq_length))


def format_rows(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: model | vectors | nDCG@10 | recall@1."""
    lines = ["| model | vectors | nDCG@10 | recall@1 |", "|---|---|---:|---:|"]
    for model, by_kind in rows.items():
        for kind, m in by_kind.items():
            lines.append(f"| {model} | {kind} | {m['ndcg_at_10']:.4f} | {m['recall_at_1']:.4f} |")
    return "\n".join(lines)
