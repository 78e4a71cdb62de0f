"""Long documents in one pass: the document vector and one vector per chunk (late chunking).

Each document is tokenized once (up to ``max_length``); its chunks (character spans, from a
``ChunkingConfig`` or given) are found among the tokens, and the encoder's token states inside
each chunk are mean-pooled and projected by the same head as the document vector. Chunks cut by
``max_length`` are dropped and counted. Retrieval can score a document by its vector or by its
best chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from jasper_jax import sharding
from jasper_jax.data.chunking import (
    ChunkingConfig,
    Span,
    check_spans,
    chunk_texts,
    plain_tokenizer,
    token_spans,
)
from jasper_jax.encode import TextEncoder, position_limit, resolve_head
from jasper_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class ChunkedEncoding:
    """Vectors of N documents and their M kept chunks (float32 unit rows).

    Attributes:
      documents: head -> [N, dim].
      chunks: head -> [M, dim], grouped by document in order.
      owner: int64 [M], the document of each chunk.
      spans: int64 [M, 2], character span [start, end) of each chunk in its document.
      source: int64 [M], each kept chunk's row among all input chunks (documents in order).
      dropped: chunks left out because ``max_length`` cut them.
    """

    documents: dict[str, np.ndarray]
    chunks: dict[str, np.ndarray]
    owner: np.ndarray
    spans: np.ndarray
    source: np.ndarray
    dropped: int


def _power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class ChunkEncoder:
    """Document + chunk vectors with a loaded model; wraps a :class:`TextEncoder`.

    Args:
      encoder: its model, mesh, batch size and dtype are used.
    """

    def __init__(self, encoder: TextEncoder):
        if not getattr(encoder.tokenizer, "is_fast", False):
            raise UserError("chunk encoding needs a fast (Rust) tokenizer with offset mapping")
        self.encoder = encoder
        self._fns: dict = {}
        self._span_sharding = sharding.batch_sharding(encoder.mesh, 3)

    def _fn(self, heads: tuple[str, ...]):
        if heads not in self._fns:
            module, mesh = self.encoder.module, self.encoder.mesh

            def run(params, ids, mask, spans):
                with sharding.mesh_context(mesh):  # long documents: the flash kernels' shard_map
                    return module.apply(
                        {"params": params}, ids, mask, heads=heads, chunk_spans=spans
                    )

            self._fns[heads] = jax.jit(run, out_shardings=sharding.replicated(self.encoder.mesh))
        return self._fns[heads]

    def encode(
        self,
        documents: Sequence[str],
        *,
        chunking: ChunkingConfig | str | None = None,
        spans: Sequence[Sequence[Span]] | None = None,
        heads: Sequence[str | None] = (None,),
        prompt: str | None = None,
        max_length: int | None = None,
        progress: bool = False,
    ) -> ChunkedEncoding:
        """Vectors of ``documents`` and of their chunks; exactly one of ``chunking`` (e.g.
        "sentences:64", sizes in this model's tokens) and ``spans`` (character spans per
        document) says where the chunks are. ``heads`` as in ``TextEncoder.encode_heads``;
        ``max_length`` defaults to the model's position limit (not its ``max_seq_length``)."""
        model = self.encoder.model
        heads = tuple(resolve_head(model.config, h) for h in heads)
        spans = self._spans(documents, chunking, spans)
        # Long documents are the point here: by default read as far as the positions reach.
        limit = min(max_length or position_limit(model), position_limit(model))
        ids, kept_spans, kept = self._tokenize(documents, spans, prompt, limit)
        documents_out, chunks_out = self._run(ids, kept_spans, heads, limit, progress)
        owner = np.concatenate([np.full(k.sum(), i, np.int64) for i, k in enumerate(kept)])
        char_spans = np.concatenate(
            [np.asarray(s, np.int64).reshape(-1, 2)[k] for s, k in zip(spans, kept, strict=True)]
        )
        return ChunkedEncoding(
            documents=documents_out,
            chunks=chunks_out,
            owner=owner,
            spans=char_spans,
            source=np.flatnonzero(np.concatenate(kept)),
            dropped=int(sum((~k).sum() for k in kept)),
        )

    def _tokenize(
        self, documents: Sequence[str], spans: list[list[Span]], prompt: str | None, limit: int
    ) -> tuple[list[list[int]], list[np.ndarray], list[np.ndarray]]:
        """Each document tokenized once (cut at `limit` tokens) -> (token ids per document,
        int [kept, 2] token spans of its kept chunks, bool [chunks] which chunks are kept)."""
        enc = self.encoder.tokenizer(
            [(prompt or "") + d for d in documents],
            truncation=True,
            max_length=limit,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        kept_spans, kept = [], []
        for i, doc_spans in enumerate(spans):
            real = 1 - np.asarray(enc["special_tokens_mask"][i])
            t, k = token_spans(
                np.asarray(doc_spans), enc["offset_mapping"][i], real, len(prompt or "")
            )
            kept_spans.append(t[k])
            kept.append(k)
        return enc["input_ids"], kept_spans, kept

    def _run(
        self,
        ids: list[list[int]],
        kept_spans: list[np.ndarray],
        heads: tuple[str, ...],
        limit: int,
        progress: bool,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Batches of documents sorted by length -> ({head: [N, dim]} document vectors,
        {head: [M, dim]} chunk vectors grouped by document in input order)."""
        order = np.argsort([len(x) for x in ids], kind="stable")
        documents_out: dict[str, np.ndarray] = {}
        chunk_rows: dict[str, list] = {h: [None] * len(ids) for h in heads}
        bar = tqdm(total=len(ids), unit="doc", disable=not progress, desc="encode")
        for start in range(0, len(order), self.encoder.batch_size):
            rows = order[start : start + self.encoder.batch_size]
            batch_spans = [kept_spans[i] for i in rows]
            document, chunks = self._batch([ids[i] for i in rows], batch_spans, heads, limit)
            for name in heads:
                doc = np.asarray(document[name])[: len(rows)]
                documents_out.setdefault(name, np.zeros((len(ids), doc.shape[-1]), np.float32))
                documents_out[name][rows] = doc
                vectors = np.asarray(chunks[name])
                for j, i in enumerate(rows):
                    chunk_rows[name][i] = vectors[j, : len(kept_spans[i])]
            bar.update(len(rows))
        bar.close()
        chunks_out = {h: np.concatenate(chunk_rows[h]).astype(np.float32) for h in heads}
        return documents_out, chunks_out

    def _batch(
        self, ids: list[list[int]], spans: list[np.ndarray], heads: tuple[str, ...], limit: int
    ) -> tuple[dict, dict]:
        """One padded batch through the model -> ({head: [batch, dim]} document vectors,
        {head: [batch, slots, dim]} chunk vectors; slots: a power of two >= the most spans)."""
        token_ids, mask = self.encoder.pad(ids, limit)
        slots = _power_of_two(max(max(len(s) for s in spans), 1))
        padded = np.zeros((self.encoder.batch_size, slots, 2), np.int32)
        for j, s in enumerate(spans):
            padded[j, : len(s)] = s
        put = jax.make_array_from_callback(
            padded.shape, self._span_sharding, lambda index, x=padded: x[index]
        )
        return self._fn(heads)(self.encoder.params, token_ids, mask, put)

    def _spans(self, documents, chunking, spans) -> list[list[Span]]:
        if (chunking is None) == (spans is None):
            raise UserError("give exactly one of chunking (e.g. 'sentences:64') and spans")
        if spans is not None:
            if len(spans) != len(documents):
                raise UserError(f"{len(spans)} span lists for {len(documents)} documents")
            for i, (doc, s) in enumerate(zip(documents, spans, strict=True)):
                check_spans(np.asarray(s, np.int64), len(doc), f"document {i}")
            return [list(map(tuple, s)) for s in spans]
        if isinstance(chunking, str):
            chunking = ChunkingConfig.parse(chunking)
        return chunk_texts(documents, plain_tokenizer(self.encoder.tokenizer), chunking)
