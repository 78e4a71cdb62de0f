"""`jasper-jax encode --chunks SPEC`: document vectors and chunk vectors in one pass.

Input: a .txt file (one document per line) or a .jsonl file (one object per line with a string
``"text"`` and, for ``--chunks given``, ``"chunks"``: a list of [start, end) character spans).
Outputs, each written atomically::

    OUTPUT                 [N, dim] float32 document vectors (row i = document i)
    OUTPUT.chunks.npy      [M, dim] float32 chunk vectors, grouped by document
                           (both in --precision's dtype and width, `encode_precision.py`; int8
                           and uint8 use the same ranges of the head for both)
    OUTPUT.chunks.jsonl    one line per chunk: {"document", "start", "end", "text"}

A .txt input keeps blank lines as empty documents (row i is line i); a .jsonl input skips
them (row i is the i-th object). NaN/inf vectors are refused; the three files are renamed into
place together after all are written, so a failure (disk full) leaves existing outputs as they
were.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from jasper_jax import sharding
from jasper_jax.commands.encode_io import (
    npy_writer,
    read_lines,
    read_texts,
    role_prompt,
    text_writer,
    write_outputs,
)
from jasper_jax.commands.encode_precision import PrecisionPlan
from jasper_jax.encode import TextEncoder, check_finite, check_finite_model, resolve_head
from jasper_jax.encode_chunks import ChunkEncoder
from jasper_jax.errors import UserError
from jasper_jax.run_folder import load_any_model

log = logging.getLogger(__name__)


def read_documents(path: str | Path, with_spans: bool) -> tuple[list[str], list | None]:
    """(documents, spans or None) from a .txt (one per line) or .jsonl file."""
    if not str(path).endswith(".jsonl"):
        if with_spans:
            raise UserError(f"--chunks given reads spans from a .jsonl input; {path} is not one")
        return read_texts(path), None
    documents, spans = [], []
    lines = read_lines(path)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number}: not valid JSON ({e.msg})") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path} line {number}: expected an object with a string 'text'")
        documents.append(record["text"])
        if with_spans:
            if "chunks" not in record:
                raise UserError(f"{path} line {number}: --chunks given needs a 'chunks' field")
            spans.append([tuple(int(x) for x in span) for span in record["chunks"]])
    return documents, spans if with_spans else None


def encode_chunks_main(args: argparse.Namespace, plan: PrecisionPlan | None = None) -> int:
    """`--chunks SPEC`: document and chunk vectors of one pass, three files written together,
    stored as `plan` says (None: float32)."""
    plan = plan or PrecisionPlan("float32")
    given = args.chunks == "given"
    documents, spans = read_documents(args.input, given)
    if not documents:
        raise UserError(f"{args.input} holds no documents")
    model = load_any_model(args.model)
    check_finite_model(model.params, args.model)
    head = resolve_head(model.config, args.head)  # fail before any compile
    plan.check_head(head)
    encoder = TextEncoder(
        model,
        dtype=args.dtype,
        mesh=sharding.make_mesh(sharding.parse_mesh_shape(args.mesh, "--mesh"), flag="--mesh"),
        batch_size=args.batch_size,
    )
    result = ChunkEncoder(encoder).encode(
        documents,
        chunking=None if given else args.chunks,
        spans=spans,
        heads=(head,),
        prompt=role_prompt(model, args.prompt, args.role),
        max_length=args.max_length,
        progress=True,
    )
    check_finite(result.documents[head], "document vectors")
    check_finite(result.chunks[head], "chunk vectors")
    dim = result.documents[head].shape[1]
    ranges = plan.ranges(encoder, head, dim, args.max_length)
    listing = "".join(
        json.dumps(
            {"document": int(i), "start": int(a), "end": int(b), "text": documents[i][a:b]},
            ensure_ascii=False,
        )
        + "\n"
        for i, (a, b) in zip(result.owner, result.spans, strict=True)
    )
    write_outputs(
        {
            args.output: npy_writer(plan.store(result.documents[head], ranges)),
            f"{args.output}.chunks.npy": npy_writer(plan.store(result.chunks[head], ranges)),
            f"{args.output}.chunks.jsonl": text_writer(listing),
        }
    )
    log.info(
        "wrote %s (%d documents) and %s.chunks.npy (%d chunks; %d cut by the max length and "
        "left out) as %s",
        args.output,
        len(documents),
        args.output,
        len(result.owner),
        result.dropped,
        plan.describe(len(result.owner), dim),
    )
    return 0
