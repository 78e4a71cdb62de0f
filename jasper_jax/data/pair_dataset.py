"""The pair teacher dataset: every text of (query, positive, k negatives) rows with its vectors.

Built like the single-text teacher dataset (``teacher_dataset``: resumable blocks, slices over
machines, locks, checksums), from the rows' m = 2 + k columns flattened column-major: all
queries, then all positives, then each negative slot, so a block is mostly of one role. Each
teacher encodes the queries with its query prompt and the documents (positives, negatives)
with its document prompt. One record per pair row (``teacher_records``)::

    texts    [m] Text            column order of ``PairRows``: query, positive, negatives
    teacher  [m, D] float32/16   each teacher's slice unit length (not renormalised on disk)
    index    int64               the pair row

Metadata ``pairs``: {"negatives": k, "roles": ["query", "document", ...]}; a row any of whose m
vectors is NaN or all-zero is left out and counted under ``rejected``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from jasper_jax.data.pairs import PairRows
from jasper_jax.data.teacher_dataset import BuildResult, load_teachers, run_build
from jasper_jax.data.teacher_plan import check_arguments, make_plan
from jasper_jax.data.teachers import Teacher
from jasper_jax.errors import UserError


def build_pair_dataset(
    pairs: PairRows,
    teachers: Sequence[str | pathlib.Path | Teacher],
    output_dir: str | pathlib.Path,
    prompt: str | None = None,
    document_prompt: str | None = None,
    dtype: str = "float32",
    shard_index: int = 0,
    num_shards: int = 1,
    batch_size: int = 64,
    overwrite: bool = False,
    *,
    chunk_size: int = 4096,
    progress: bool = True,
    backend: str = "auto",
    max_length: int | None = None,
    mesh_shape: Sequence[int] | None = None,
    compute_dtype: str = "auto",
) -> BuildResult:
    """Encode slice ``shard_index`` of ``num_shards`` of the pairs' texts and, once all slices
    are done, write the pair dataset (module docstring); see ``build_teacher_dataset``.

    Args:
      pairs: n rows of (query, positive, k negatives); n * m texts are encoded.
      teachers: known teacher names, sentence-transformers folders, or loaded ``Teacher``s;
        their vectors are concatenated in this order.
      prompt: the query prompt of each teacher loaded here without one of its own.
      document_prompt: the document prompt of each teacher loaded here without one of its own
        (default none: Jasper and NV-Embed give documents no instruction).
      dtype, shard_index, num_shards, batch_size, overwrite, chunk_size, progress, backend,
        max_length, mesh_shape, compute_dtype: as for ``build_teacher_dataset`` (chunk_size
        counts texts, not rows).

    Returns:
      BuildResult; ``rows`` counts pair rows.

    Raises:
      UserError: bad arguments or no rows; an output folder that holds a different dataset or
        unrelated files (unless ``overwrite``); a resumed build with other teachers, prompts,
        rows or k.
    """
    check_arguments(dtype, shard_index, num_shards, batch_size, chunk_size, None, output_dir)
    if not len(pairs):
        raise UserError(f"pairs {pairs.source!r} hold no rows; fix: give a source with rows")
    texts = [text for column in pairs.columns() for text in column]
    settings = (batch_size, backend, max_length, mesh_shape, compute_dtype)
    loaded = load_teachers(teachers, texts, (prompt, document_prompt), *settings)
    roles = {"negatives": pairs.negative_count, "roles": list(PairRows.roles(pairs.width))}
    plan = make_plan(texts, 0, loaded, dtype, num_shards, chunk_size, pairs=roles)
    return run_build(output_dir, plan, texts, loaded, shard_index, overwrite, progress)
