"""Teacher dataset: each corpus text with its concatenated teacher vector, as TFDS array_record.

The build is resumable and atomic (``dataset_build.py``; its plan: ``teacher_plan.py``)::

    OUTPUT/dataset/            finished TFDS dataset (records: ``teacher_records``)
    OUTPUT/_parts/plan.json    what is being built (teachers, corpus, dtype, slicing)
    OUTPUT/_parts/rows-*.npy   finished blocks of vectors, each written atomically
    OUTPUT/_parts/slice-I-of-N.done
    OUTPUT/dataset/checksums.json   size and SHA-256 of every file, checked on open

``build_teacher_dataset(..., shard_index=I, num_shards=N)`` encodes the I-th contiguous slice of
the corpus; many machines (sharing OUTPUT) can each take one slice. A re-run keeps finished
blocks and redoes the rest. The run that finds every slice done combines them into
``OUTPUT/dataset`` (built in a temp folder, then renamed) and removes ``_parts``.

One process per slice (lock ``OUTPUT/.slice-I-of-N.lock``) and one combining (``.combine.lock``);
temporary names carry the writer's ``process_tag`` so the next run removes what a killed one left.

Chunk mode (``chunking=`` or ``chunk_spans=``, dewey-style chunk alignment): each text is a
document; rows also hold ``chunk_spans`` [n, 2] (character spans) and ``chunk_teacher`` [n, D]
(each chunk encoded on its own), see ``jasper_jax.data.chunk_vectors``.

Pair mode (``pair_dataset.build_pair_dataset``): the texts are pair rows' columns, each teacher
encoding queries with its query prompt and documents with its document prompt; a record is a
pair row (texts [m], teacher [m, D]), see ``teacher_plan`` and ``teacher_records``.

Stored vectors: each teacher's slice is unit length; the concatenation is NOT renormalised on
disk (row norm sqrt(num_teachers)); the trainer renormalises it (SPEC 1.4). TFDS shuffles rows
by key on write; ``index`` is the text's row in the corpus (after empty texts are skipped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import pathlib
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from jasper_jax.data import chunk_vectors
from jasper_jax.data.chunking import ChunkingConfig, Span
from jasper_jax.data.corpus_mix import CorpusMix
from jasper_jax.data.dataset_build import (
    DATASET_DIR,
    OUTPUT_LEFTOVERS,
    PARTS_DIR,
    PLAN,
    block_path,
    build_and_install,
    dataset_folder,
    finished_identity,
    open_tfds_folder,
    read_json_object,
)
from jasper_jax.data.teacher_plan import (
    check_arguments,
    corpus_texts,
    load_build_teacher,
    make_plan,
    pair_width,
    prepare_output,
    role_runs,
    slice_blocks,
    slice_marker,
    teacher_runtime,
)
from jasper_jax.data.teacher_records import TeacherDataset, rejected_records
from jasper_jax.data.teacher_slices import Group, encode_slice
from jasper_jax.data.teachers import Teacher, count_truncated
from jasper_jax.errors import UserError
from jasper_jax.locks import FolderLock, remove_leftovers

NORMALISATION_NOTE = (
    "each teacher's slice is L2-normalised; the concatenation is not renormalised on disk "
    "(row norm = sqrt(num_teachers)); the trainer renormalises it to unit length"
)
COMBINE_LOCK = ".combine.lock"
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """Outcome of one :func:`build_teacher_dataset` call."""

    dataset_dir: pathlib.Path | None  # None while other slices are still unfinished
    rows: int  # texts in the corpus (after skipping empty ones); pair mode: pair rows
    skipped_empty: int
    pending_slices: list[int]
    # teacher name -> texts longer than its token limit (their vectors describe a prefix only)
    truncated: dict[str, int] = dataclasses.field(default_factory=dict)


def build_teacher_dataset(
    corpus: str | CorpusMix | Sequence[str],
    teachers: Sequence[str | pathlib.Path | Teacher],
    output_dir: str | pathlib.Path,
    prompt: str | None = None,
    dtype: str = "float32",
    shard_index: int = 0,
    num_shards: int = 1,
    batch_size: int = 64,
    overwrite: bool = False,
    *,
    limit: int | None = None,
    chunk_size: int = 4096,
    progress: bool = True,
    backend: str = "auto",
    max_length: int | None = None,
    chunking: ChunkingConfig | str | None = None,
    chunk_spans: Sequence[Sequence[Span]] | None = None,
    chunk_tokenizer: str | pathlib.Path | None = None,
    mesh_shape: Sequence[int] | None = None,
    compute_dtype: str = "auto",
) -> BuildResult:
    """Encode slice ``shard_index`` of ``num_shards`` and, once all are done, write the dataset.

    Args:
      corpus: a ``load_corpus`` name/path, a ``CorpusMix``, or the texts (empty ones skipped).
      teachers: known teacher names, sentence-transformers folders, or loaded ``Teacher``s;
        their vectors are concatenated in this order.
      prompt: prefixed to every text by each teacher loaded here.
      dtype: "float32" or "float16" storage of the teacher vectors.
      limit: keep only the first ``limit`` texts.
      chunk_size: rows per resumable unit of work.
      backend, max_length: how named teachers run, tokens per text (see ``load_teacher``).
      chunking: chunk mode, splitting each text with e.g. ``"sentences:64"`` (see
        ``ChunkingConfig``), sizes counted by ``chunk_tokenizer`` (default: first teacher's).
      chunk_spans: chunk mode with the caller's character spans, one list per text.
      mesh_shape, compute_dtype: the (data, fsdp, tensor) mesh our port runs the teachers on,
        weights over every device, and "float32"/"bfloat16"/"auto" (``teacher_runtime``);
        several ``jax.distributed`` processes encode each block together (``teacher_slices``).

    Raises:
      UserError: bad arguments or corpus; an output folder that holds a different dataset or
        unrelated files (unless ``overwrite``); a resumed build with other teachers or corpus.
    """
    check_arguments(dtype, shard_index, num_shards, batch_size, chunk_size, limit, output_dir)
    texts, skipped = corpus_texts(corpus, limit)
    if chunk_spans is not None and (skipped or len(chunk_spans) != len(texts)):
        raise UserError(
            f"chunk_spans has {len(chunk_spans)} lists for {len(texts)} non-empty texts "
            f"({skipped} empty skipped); fix: drop empty texts and give one list per text"
        )
    settings = (batch_size, backend, max_length, mesh_shape, compute_dtype)
    loaded = load_teachers(teachers, texts, (prompt, None), *settings)
    plan = make_plan(texts, skipped, loaded, dtype, num_shards, chunk_size)
    chunker = None
    if chunking is not None or chunk_spans is not None:
        tokenizer = chunk_tokenizer or loaded[0].folder
        chunker = _add_chunker(plan, texts, chunking, chunk_spans, tokenizer)
    return run_build(output_dir, plan, texts, loaded, shard_index, overwrite, progress, chunker)


def load_teachers(
    teachers: Sequence[str | pathlib.Path | Teacher],
    texts: Sequence[str],
    prompts: tuple[str | None, str | None],
    batch_size: int,
    backend: str,
    max_length: int | None,
    mesh_shape: Sequence[int] | None,
    compute_dtype: str,
) -> list[Teacher]:
    """Every teacher loaded (``load_build_teacher``) with the build's (query, document)
    ``prompts`` (`auto` backends timed on a sample of ``texts``) on the ``teacher_runtime`` of
    ``mesh_shape`` and ``compute_dtype``; UserError when there is none."""
    query, document = prompts
    runtime = teacher_runtime(mesh_shape, compute_dtype)
    loaded = [
        load_build_teacher(t, query, batch_size, backend, max_length, texts, runtime, document)
        for t in teachers
    ]
    if not loaded:
        raise UserError("no teachers given; fix: pass --teacher NAME_OR_DIR at least once")
    return loaded


def run_build(
    output_dir: str | pathlib.Path,
    plan: dict,
    texts: list[str],
    teachers: Sequence[Teacher],
    shard_index: int,
    overwrite: bool,
    progress: bool,
    chunker: chunk_vectors.Chunker | None = None,
) -> BuildResult:
    """Encodes slice ``shard_index`` of the ``plan`` of ``texts`` and, once every slice is done,
    combines them, under the slice's lock: slices of one output run on many machines at once,
    each with its own lock, held by the lead process of a multi-process group."""
    output = pathlib.Path(output_dir).expanduser()
    group = Group.current()
    lock = _lock(output, f".slice-{shard_index:05d}-of-{plan['num_shards']:05d}.lock")
    with lock if group.lead else contextlib.nullcontext():
        return _build_slice(
            output, plan, texts, teachers, shard_index, chunker, overwrite, progress, group
        )


def _add_chunker(plan, texts, chunking, chunk_spans, tokenizer) -> chunk_vectors.Chunker:
    """Chunk mode's chunker; its identity joins the plan's (a resumed build must match it)."""
    if isinstance(chunking, str):
        chunking = ChunkingConfig.parse(chunking)
    chunker, plan["identity"]["chunks"] = chunk_vectors.make_chunker(
        texts, chunking, chunk_spans, tokenizer
    )
    return chunker


def _build_slice(
    output, plan, texts, teachers, shard_index, chunker, overwrite, progress, group
) -> BuildResult:
    """Under the slice's lock: nothing when the dataset is built, else encode the slice and,
    once every slice is done, combine them. In a multi-process `group` the lead checks and
    prepares the folder and combines; all encode (``teacher_slices``). Returns the BuildResult."""
    rows, skipped, num_shards = _records(plan), plan["skipped_empty"], plan["num_shards"]
    finished = lambda: BuildResult(
        output / DATASET_DIR, rows, skipped, [], _recorded_truncation(output)
    )
    before = _stamp(output / DATASET_DIR)
    prepared = lambda: int(prepare_output(output, plan, overwrite, _rebuild_fix(output)))
    if group.lead_first(prepared):  # 1: the folder already holds this dataset
        return finished()
    parts = output / PARTS_DIR
    group.check_shared(parts)
    encode_slice(parts, plan, texts, teachers, shard_index, progress, chunker, group)
    marked = [slice_marker(parts, i, num_shards).exists() for i in range(num_shards)]
    marked = group.agree(np.array(marked, np.int32))  # the lead's view: all act alike
    pending = [i for i in range(num_shards) if not marked[i]]
    if pending:
        log.info("slice %d done; slices %s still to run before combining", shard_index, pending)
        return BuildResult(None, rows, skipped, pending)
    combined = lambda: int(
        _combine_once(output, parts, plan, texts, teachers, before).dataset_dir is not None
    )
    if group.lead_first(combined) and finished_identity(output) == plan["identity"]:
        return finished()
    return BuildResult(None, rows, skipped, [])


def open_teacher_dataset(data_dir: str | pathlib.Path) -> tuple[Any, dict]:
    """(random-access source, metadata) of a built teacher dataset.

    ``source[i]`` is a dict: ``text`` bytes, ``teacher`` [D] float32/16, ``index`` int64; of
    a pair dataset (``pair_width(metadata)`` is m): ``texts`` [m] bytes, ``teacher`` [m, D],
    ``index`` the pair row (``teacher_records``).

    ``data_dir`` is a build output folder or the TFDS dataset folder itself. The source is a
    TFDS ``ArrayRecordDataSource``, which grain accepts as a ``RandomAccessDataSource``. Every
    file's size and SHA-256 is checked against ``checksums.json`` first (once per process).

    Raises:
      UserError: no dataset, an unfinished one, or a damaged, truncated or missing file.
    """
    path = pathlib.Path(data_dir).expanduser()
    folder = dataset_folder(path)
    if not (folder / "dataset_info.json").is_file():
        plan_file = path / PARTS_DIR / PLAN
        if plan_file.is_file():
            num_shards = read_json_object(plan_file, _rebuild_fix(path)).get("num_shards", "?")
            done = sorted(p.name for p in (path / PARTS_DIR).glob("slice-*.done"))
            raise UserError(
                f"teacher dataset {str(path)!r} is unfinished: {len(done)} of {num_shards} slices "
                "done; fix: run the remaining `jasper-jax teachers --shard-index I` slices"
            )
        raise UserError(
            f"no teacher dataset at {str(path)!r} (no dataset_info.json); fix: build one with "
            "`jasper-jax teachers --corpus ... --teacher ... --output DIR`"
        )
    _, source, metadata = open_tfds_folder(folder, _rebuild_fix(path))
    return source, metadata


def _rebuild_fix(output: pathlib.Path) -> str:
    """The fix named in errors about a damaged or unfinished dataset in ``output``."""
    return (
        f"rebuild it with `jasper-jax teachers --output {output} ... --overwrite` (same corpus "
        "and teachers), or restore the folder from a backup"
    )


def _lock(output: pathlib.Path, name: str) -> FolderLock:
    """The output folder's lock ``name`` (one per slice, one for combining)."""
    return FolderLock(output, "teachers", name=name, what="output folder", flag="--output")


def _recorded_truncation(output: pathlib.Path) -> dict[str, int]:
    """{teacher name: texts cut} as recorded in the finished dataset ({} if unreadable)."""
    info = output / DATASET_DIR / "metadata.json"
    try:
        return json.loads(info.read_text(encoding="utf-8")).get("truncated_by_teacher", {})
    except (OSError, ValueError, AttributeError):
        return {}


def _combine_once(output, parts, plan, texts, teachers, before) -> BuildResult:
    """Combine under ``.combine.lock``: of slices finishing together, the first combines."""
    rows, skipped = _records(plan), plan["skipped_empty"]
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_lock(output, COMBINE_LOCK))
        except UserError as busy:  # a peer slice finished at the same time: it combines
            log.info("all slices are done; the dataset is being combined elsewhere: %s", busy)
            return BuildResult(None, rows, skipped, [])
        installed = _stamp(output / DATASET_DIR) != before
        if installed and finished_identity(output) == plan["identity"]:
            log.info("another slice's run installed the dataset first")
        else:
            remove_leftovers(output, OUTPUT_LEFTOVERS)
            _combine(output, parts, plan, texts, teachers)
    return BuildResult(output / DATASET_DIR, rows, skipped, [], _recorded_truncation(output))


def _stamp(folder: pathlib.Path) -> tuple | None:
    """Tells one installed dataset folder from its replacement (renamed in: new inode)."""
    try:
        stat = folder.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_ctime_ns


def _records(plan: dict) -> int:
    """Records of the plan's dataset: its texts, or pair rows in pair mode."""
    return plan["identity"]["num_texts"] // (pair_width(plan["identity"]) or 1)


def _combine(
    output: pathlib.Path,
    parts: pathlib.Path,
    plan: dict,
    texts: list[str],
    teachers: Sequence[Teacher],
) -> pathlib.Path:
    """Build the TFDS dataset from all blocks in a temp folder, then move it into place."""
    identity = plan["identity"]
    chunks = [
        (a, block_path(parts, a, b))
        for i in range(plan["num_shards"])
        for a, b in slice_blocks(plan, i)
    ]
    bad, num_chunks = rejected_records(chunks, identity)
    rejected, what = (
        np.flatnonzero(bad).tolist(),
        "texts" if pair_width(identity) is None else "pair rows",
    )
    if rejected:
        log.warning(
            "rejected %d %s with NaN or all-zero teacher vectors, e.g. %s %s",
            len(rejected),
            what,
            what,
            rejected[:10],
        )
    if len(rejected) == len(bad):
        raise UserError(
            f"every one of {len(bad)} {what} got a NaN or all-zero teacher vector; the teacher "
            "models look broken; fix: check the --teacher folders"
        )
    runs = role_runs(identity, 0, len(texts))
    metadata = {
        "identity": identity,
        "dim": identity["dim"],
        "dtype": identity["dtype"],
        "teachers": identity["teachers"],
        "normalisation": NORMALISATION_NOTE,
        "rows": len(bad) - len(rejected),
        "skipped_empty": plan["skipped_empty"],
        "rejected": {"count": len(rejected), "first_rows": rejected[:20]},
        "truncated_by_teacher": count_truncated(texts, teachers, runs=runs),
    }
    if "chunks" in identity:
        metadata["chunks"] = {**identity["chunks"], "count": num_chunks}
    if "pairs" in identity:
        metadata["pairs"] = identity["pairs"]
    target = output / DATASET_DIR
    fields = dict(texts=texts, chunks=chunks, metadata=metadata, rejected=bad)
    build_and_install(TeacherDataset, output, target, **fields)
    shutil.rmtree(parts, ignore_errors=True)
    return target
