"""Teacher dataset: each corpus text with its concatenated teacher vector, as TFDS array_record.

Layout of an output folder::

    OUTPUT/dataset/            finished TFDS dataset (features text, teacher [D], index)
    OUTPUT/_parts/plan.json    what is being built (teachers, corpus, dtype, slicing)
    OUTPUT/_parts/rows-*.npy   finished chunks of vectors, each written atomically
    OUTPUT/_parts/slice-I-of-N.done
    OUTPUT/dataset/checksums.json   size and SHA-256 of every file, checked on open

``build_teacher_dataset(..., shard_index=I, num_shards=N)`` encodes the I-th contiguous slice of
the corpus; many machines (sharing OUTPUT) can each take one slice. A re-run keeps finished
chunks and redoes the rest. The run that finds every slice done combines them into
``OUTPUT/dataset`` (built in a temp folder, then renamed) and removes ``_parts``.

One process per slice (lock ``OUTPUT/.slice-I-of-N.lock``) and one combining (``.combine.lock``);
temporary names carry the writer's ``process_tag`` so the next run removes what a killed one left.

Chunk mode (``chunking=`` or ``chunk_spans=``, dewey-style chunk alignment): each text is a
document; rows also hold ``chunk_spans`` [n, 2] (character spans) and ``chunk_teacher`` [n, D]
(each chunk encoded on its own), see ``jasper_jax.data.chunk_vectors``.

Stored vectors: each teacher's slice is unit length; the concatenation is NOT renormalised on
disk (row norm sqrt(num_teachers)); the trainer renormalises it (SPEC 1.4). TFDS shuffles rows
by key on write; ``index`` is the text's row in the corpus (after empty texts are skipped).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from jasper_jax.data import chunk_vectors
from jasper_jax.data import corpus as corpus_lib
from jasper_jax.data.chunking import ChunkingConfig, Span
from jasper_jax.data.teachers import Teacher, compute_teacher_vectors, load_teacher
from jasper_jax.errors import UserError, one_line
from jasper_jax.locks import FolderLock, process_tag, remove_leftovers
from jasper_jax.paths import honour_umask, read_json

DATASET_DIR = "dataset"
PARTS_DIR = "_parts"
FORMAT_VERSION = 1
DTYPES = {"float32": np.float32, "float16": np.float16}
NORMALISATION_NOTE = (
    "each teacher's slice is L2-normalised; the concatenation is not renormalised on disk "
    "(row norm = sqrt(num_teachers)); the trainer renormalises it to unit length"
)
CHECKSUMS = "checksums.json"
_TFDS_JSON = ("dataset_info.json", "features.json", "metadata.json")
_BLOCK = 1 << 20  # hashing reads 1 MiB at a time: datasets of 50 GB need no more memory
COMBINE_LOCK = ".combine.lock"
# Temporaries of a killed run: ours carry a process tag (kept while that process lives); the
# untagged ones are an older version's (tempfile names), removed under the lock.
PARTS_LEFTOVERS = ("tmp*.npy", "tmp*.npz", ".*.tmp", ".plan.json.*", ".slice-*.done.*")
OUTPUT_LEFTOVERS = (".build-*", ".retired-*")
log = logging.getLogger(__name__)
_VERIFIED: dict[str, tuple] = {}  # dataset folder -> file stats when it was last verified


class TeacherDataset(tfds.core.GeneratorBasedBuilder):
    """TFDS builder for one split ``train`` of (text, teacher vector, corpus row index)."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, texts: Sequence[str], chunks: list, metadata: dict, **kwargs: Any):
        self._texts, self._chunks, self._metadata = texts, chunks, metadata
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo(builder=...) directly: dataset_info_from_configs needs package files.
        dtype, dim = DTYPES[self._metadata["dtype"]], self._metadata["dim"]
        features = {
            "text": tfds.features.Text(),
            "teacher": tfds.features.Tensor(shape=(dim,), dtype=dtype),
            "index": tfds.features.Scalar(dtype=np.int64),
        }
        if "chunks" in self._metadata:
            features["chunk_spans"] = tfds.features.Tensor(shape=(None, 2), dtype=np.int32)
            features["chunk_teacher"] = tfds.features.Tensor(shape=(None, dim), dtype=dtype)
        features = tfds.features.FeaturesDict(features)
        metadata = tfds.core.MetadataDict(self._metadata)
        return tfds.core.DatasetInfo(builder=self, features=features, metadata=metadata)

    def _split_generators(self, dl_manager: Any) -> dict:
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        chunked = "chunks" in self._metadata
        for start, path in self._chunks:
            vectors = np.load(path, mmap_mode="r")
            if chunked:
                payload = chunk_vectors.load_payload(chunk_vectors.payload_path(path))
                per_document, bad = payload.per_document(), payload.bad_documents()
            for offset, vector in enumerate(vectors):
                if not np.isfinite(vector).all() or (chunked and bad[offset]):
                    continue
                row = start + offset
                example = {"text": self._texts[row], "teacher": vector, "index": row}
                if chunked:
                    example["chunk_spans"], example["chunk_teacher"] = per_document[offset]
                yield row, example


@dataclasses.dataclass(frozen=True)
class BuildResult:
    """Outcome of one :func:`build_teacher_dataset` call."""

    dataset_dir: pathlib.Path | None  # None while other slices are still unfinished
    rows: int  # texts in the corpus (after skipping empty ones)
    skipped_empty: int
    pending_slices: list[int]
    # teacher name -> texts longer than its token limit (their vectors describe a prefix only)
    truncated: dict[str, int] = dataclasses.field(default_factory=dict)


def build_teacher_dataset(
    corpus: str | Sequence[str],
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
) -> BuildResult:
    """Encode slice ``shard_index`` of ``num_shards`` and, once all are done, write the dataset.

    Args:
      corpus: a ``load_corpus`` name/path, or the texts themselves (empty ones are skipped).
      teachers: known teacher names, sentence-transformers folders, or loaded ``Teacher``s;
        their vectors are concatenated in this order.
      prompt: prefixed to every text by each teacher loaded here.
      dtype: "float32" or "float16" storage of the teacher vectors.
      limit: keep only the first ``limit`` texts.
      chunk_size: rows per resumable unit of work.
      backend: how named teachers run: "auto", "jax" or "torch" (see ``load_teacher``).
      max_length: tokens per text for named teachers (None: each folder's max_seq_length).
      chunking: chunk mode, splitting each text with e.g. ``"sentences:64"`` (see
        ``ChunkingConfig``), sizes counted by ``chunk_tokenizer`` (default: first teacher's).
      chunk_spans: chunk mode with the caller's character spans, one list per text.

    Raises:
      UserError: bad arguments or corpus; an output folder that holds a different dataset or
        unrelated files (unless ``overwrite``); a resumed build with other teachers or corpus.
    """
    _check_arguments(dtype, shard_index, num_shards, batch_size, chunk_size, limit)
    texts, skipped = _corpus_texts(corpus, limit)
    if chunk_spans is not None and (skipped or len(chunk_spans) != len(texts)):
        raise UserError(
            f"chunk_spans has {len(chunk_spans)} lists for {len(texts)} non-empty texts "
            f"({skipped} empty skipped); fix: drop empty texts and give one list per text"
        )
    loaded = [_load_teacher(t, prompt, batch_size, backend, max_length) for t in teachers]
    if not loaded:
        raise UserError("no teachers given; fix: pass --teacher NAME_OR_DIR at least once")
    plan = _make_plan(texts, skipped, loaded, dtype, num_shards, chunk_size)
    chunker = None
    if chunking is not None or chunk_spans is not None:
        if isinstance(chunking, str):
            chunking = ChunkingConfig.parse(chunking)
        chunker, plan["identity"]["chunks"] = chunk_vectors.make_chunker(
            texts, chunking, chunk_spans, chunk_tokenizer or loaded[0].folder
        )
    output = pathlib.Path(output_dir).expanduser()
    # Slices of one output run on many machines at once: each slice has its own lock.
    with _lock(output, f".slice-{shard_index:05d}-of-{num_shards:05d}.lock"):
        existing = finished_identity(output)
        if existing == plan["identity"] and not overwrite:
            log.info("%s already holds this dataset; nothing to do", output)
            verify_dataset_files(output / DATASET_DIR, _rebuild_fix(output))
            truncated = _recorded_truncation(output)
            return BuildResult(output / DATASET_DIR, len(texts), skipped, [], truncated)
        if existing is not None and not overwrite:
            raise UserError(
                f"output folder {str(output)!r} already holds a different teacher dataset ("
                + "; ".join(_differences(existing, plan["identity"]))
                + "); fix: choose another --output, or pass --overwrite to replace it"
            )
        before = _stamp(output / DATASET_DIR)
        parts = _prepare_parts(output, plan, overwrite)
        remove_leftovers(parts, PARTS_LEFTOVERS)
        _encode_slice(parts, plan, texts, loaded, shard_index, progress, chunker)
        pending = [i for i in range(num_shards) if not _slice_marker(parts, i, num_shards).exists()]
        if pending:
            log.info(
                "slice %d done; slices %s still to run before the dataset is combined",
                shard_index,
                pending,
            )
            return BuildResult(None, len(texts), skipped, pending)
        return _combine_once(output, parts, plan, texts, loaded, before)


def open_teacher_dataset(data_dir: str | pathlib.Path) -> tuple[Any, dict]:
    """(random-access source, metadata) of a built teacher dataset.

    ``source[i]`` is a dict: ``text`` bytes, ``teacher`` [D] float32/16, ``index`` int64.

    ``data_dir`` is a build output folder or the TFDS dataset folder itself. The source is a
    TFDS ``ArrayRecordDataSource``, which grain accepts as a ``RandomAccessDataSource``. Every
    file's size and SHA-256 is checked against ``checksums.json`` first (once per process).

    Raises:
      UserError: no dataset, an unfinished one, or a damaged, truncated or missing file.
    """
    path = pathlib.Path(data_dir).expanduser()
    folder = path / DATASET_DIR if (path / DATASET_DIR / "dataset_info.json").is_file() else path
    if not (folder / "dataset_info.json").is_file():
        plan_file = path / PARTS_DIR / "plan.json"
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
    return (
        f"rebuild it with `jasper-jax teachers --output {output} ... --overwrite` (same corpus "
        "and teachers), or restore the folder from a backup"
    )


def _load_teacher(spec, prompt, batch_size, backend, max_length) -> Teacher:
    """A loaded teacher; a folder whose files do not load (a damaged weights file) is a
    UserError naming it, in one line (libraries raise many types with long messages)."""
    if isinstance(spec, Teacher):
        return spec
    try:
        return load_teacher(spec, prompt, batch_size, backend, max_length)
    except UserError as err:
        if "\n" not in str(err):
            raise
        raise UserError(one_line(str(err))) from err
    except MemoryError:
        raise  # the CLI says what to lower
    except Exception as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise  # the CLI names the file and the fix (a full disk, no permission)
        raise UserError(
            f"cannot load teacher {str(spec)!r}: {type(err).__name__}: {one_line(str(err))}; "
            "fix: point --teacher at a complete sentence-transformers folder (re-download it "
            "if a weights file is damaged)"
        ) from err


def _lock(output: pathlib.Path, name: str) -> FolderLock:
    return FolderLock(output, "teachers", name=name, what="output folder", flag="--output")


def _check_arguments(dtype, shard_index, num_shards, batch_size, chunk_size, limit) -> None:
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise UserError(
            f"shard index {shard_index} of {num_shards} shards is out of range; expected "
            "0 <= --shard-index < --num-shards"
        )
    for name, value in (("batch size", batch_size), ("chunk size", chunk_size)):
        if value < 1:
            raise UserError(f"{name} {value} must be a positive integer")
    if limit is not None and limit < 1:
        raise UserError(f"limit {limit} must be a positive integer (or omitted)")


def _corpus_texts(corpus: str | Sequence[str], limit: int | None) -> tuple[list[str], int]:
    if isinstance(corpus, str):
        read = corpus_lib.read_corpus(corpus)
        texts, skipped = read.texts, read.skipped_empty
    else:
        texts = [t for t in corpus if t.strip()]
        skipped = len(corpus) - len(texts)
    if skipped:
        log.warning("skipped %d empty texts", skipped)
    texts = texts[:limit] if limit else texts
    if not texts:
        name = repr(corpus) if isinstance(corpus, str) else f"of {len(corpus)} given texts"
        raise UserError(
            f"corpus {name} holds no non-empty texts; fix: give a corpus with text on its lines"
        )
    return texts, skipped


def _make_plan(texts, skipped, teachers, dtype, num_shards, chunk_size) -> dict:
    offset, described = 0, []
    for teacher in teachers:
        entry = teacher.describe()
        entry["folder"] = os.path.basename(entry["folder"])  # machines differ in absolute paths
        entry["offset"] = offset
        described.append(entry)
        offset += teacher.dim
    identity = {
        "format_version": FORMAT_VERSION,
        "teachers": described,
        "dim": offset,
        "dtype": dtype,
        "corpus_fingerprint": corpus_lib.corpus_fingerprint(texts),
        "num_texts": len(texts),
    }
    return {
        "identity": identity,
        "num_shards": num_shards,
        "chunk_size": chunk_size,
        "skipped_empty": skipped,
    }


def _differences(old: dict, new: dict) -> list[str]:
    """Readable list of what differs between two dataset identities."""
    if "unreadable" in old:
        return [f"its {old['unreadable']} is unreadable"]
    found = []
    old_teachers = [(t["name"], t["dim"]) for t in old.get("teachers", [])]
    new_teachers = [(t["name"], t["dim"]) for t in new["teachers"]]
    if old_teachers != new_teachers:
        found.append(f"teachers (name, dim) {old_teachers} vs now {new_teachers}")
    else:
        for key in ("prompt", "model_fingerprint", "tokenizer_fingerprint"):
            if [t[key] for t in old["teachers"]] != [t[key] for t in new["teachers"]]:
                found.append(f"teacher {key.replace('_', ' ')}s differ")
    for key in ("corpus_fingerprint", "num_texts", "dtype", "format_version", "chunks"):
        if old.get(key) != new.get(key):
            found.append(f"{key} {old.get(key)!r} vs now {new.get(key)!r}")
    return found or ["unknown difference"]


def finished_identity(output: pathlib.Path) -> dict | None:
    """The identity of the finished dataset in ``output``; None if there is none."""
    info = output / DATASET_DIR / "metadata.json"
    if not info.is_file():
        return None
    try:
        return json.loads(info.read_text(encoding="utf-8")).get("identity", {})
    except (ValueError, AttributeError):  # damaged: replaced only with --overwrite
        return {"unreadable": str(info)}


def _prepare_parts(output: pathlib.Path, plan: dict, overwrite: bool) -> pathlib.Path:
    """Create or validate ``_parts`` for this plan; refuse unrelated or conflicting content."""
    parts = output / PARTS_DIR
    names = [p.name for p in output.iterdir()] if output.is_dir() else []
    foreign = [n for n in names if n not in (DATASET_DIR, PARTS_DIR) and not n.startswith(".")]
    refuse_foreign_dataset(output / DATASET_DIR)
    if foreign and not overwrite:
        raise UserError(
            f"output folder {str(output)!r} holds files that are not a teacher dataset "
            f"({foreign[:5]}); fix: choose an empty or new --output folder"
        )
    plan_file = parts / "plan.json"
    if plan_file.is_file():
        try:
            reasons = _plan_conflicts(json.loads(plan_file.read_text(encoding="utf-8")), plan)
        except (ValueError, KeyError, TypeError):
            reasons = [f"its {plan_file} is unreadable"]
        if not reasons:
            return parts
        if not overwrite:
            raise UserError(
                f"cannot resume the unfinished build in {str(output)!r}: "
                + "; ".join(reasons)
                + "; fix: rerun with the original teachers/corpus/--num-shards, another "
                "--output, or --overwrite to start over"
            )
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    _write_atomically(plan_file, json.dumps(plan, indent=2).encode())
    return parts


def refuse_foreign_dataset(folder: pathlib.Path) -> None:
    """A ``dataset`` folder that jasper-jax did not write is never replaced, not even with
    --overwrite: the refusal names it."""
    if not is_ours(folder):
        raise UserError(
            f"{folder} exists and is not a dataset jasper-jax wrote; fix: move it away or "
            "choose another --output folder"
        )


def is_ours(folder: pathlib.Path) -> bool:
    """Whether a dataset folder may be replaced: missing, empty, or written by jasper-jax."""
    if not folder.exists():
        return True
    if not folder.is_dir():
        return False
    if (folder / "metadata.json").is_file() or (folder / CHECKSUMS).is_file():
        return True
    try:
        info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
        return str(info.get("moduleName", "")).startswith("jasper_jax.")
    except (OSError, ValueError, AttributeError):
        return not any(folder.iterdir())


def _plan_conflicts(old: dict, new: dict) -> list[str]:
    if old["identity"] != new["identity"]:
        return _differences(old["identity"], new["identity"])
    layout = ("num_shards", "chunk_size")
    if any(old[k] != new[k] for k in layout):
        return [
            f"(num_shards, chunk_size) were {[old[k] for k in layout]}, now "
            f"{[new[k] for k in layout]}"
        ]
    return []


@contextlib.contextmanager
def atomic_file(path: pathlib.Path) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as f:`` ``path`` appears only complete, with the umask's mode.

    The temporary name carries this process's tag, so a later run (under the lock) removes it
    if this process is killed; any failure (a full disk) removes it at once.
    """
    tmp = path.with_name(f".{path.name}.{process_tag()}{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # plain open: the mode follows the umask
            yield f
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_atomically(path: pathlib.Path, payload: bytes) -> None:
    with atomic_file(path) as f:
        f.write(payload)


def _slice_marker(parts: pathlib.Path, index: int, count: int) -> pathlib.Path:
    return parts / f"slice-{index:05d}-of-{count:05d}.done"


def _slice_chunks(plan: dict, index: int) -> list[tuple[int, int]]:
    """Contiguous row ranges [start, stop) of one slice, chunk by chunk."""
    rows, count = plan["identity"]["num_texts"], plan["num_shards"]
    begin, end = rows * index // count, rows * (index + 1) // count
    step = plan["chunk_size"]
    return [(a, min(a + step, end)) for a in range(begin, end, step)]


def _chunk_path(parts: pathlib.Path, start: int, stop: int) -> pathlib.Path:
    return parts / f"rows-{start:010d}-{stop:010d}.npy"


def _encode_slice(parts, plan, texts, teachers, index, progress, chunker=None) -> None:
    marker = _slice_marker(parts, index, plan["num_shards"])
    if marker.exists():
        return
    todo = [(a, b) for a, b in _slice_chunks(plan, index) if not _chunk_path(parts, a, b).exists()]
    dtype = DTYPES[plan["identity"]["dtype"]]
    total = sum(b - a for a, b in todo) * len(teachers)
    with tqdm.tqdm(total=total, unit="text", disable=not progress, smoothing=0.05) as bar:
        for start, stop in todo:
            vectors = compute_teacher_vectors(texts[start:stop], teachers, bar=bar)
            path = _chunk_path(parts, start, stop)
            if chunker is not None:  # saved first: the .npy marks the whole block as done
                payload = chunk_vectors.encode_chunks(
                    texts[start:stop], chunker(start, stop), teachers, bar
                )
                with atomic_file(chunk_vectors.payload_path(path)) as f:
                    chunk_vectors.save_payload(f, payload, dtype)
            with atomic_file(path) as f:  # a chunk file exists only when complete
                np.save(f, vectors.astype(dtype))
    _write_atomically(marker, b"done\n")


def _recorded_truncation(output: pathlib.Path) -> dict[str, int]:
    info = output / DATASET_DIR / "metadata.json"
    try:
        return json.loads(info.read_text(encoding="utf-8")).get("truncated_by_teacher", {})
    except (OSError, ValueError, AttributeError):
        return {}


def count_truncated(texts: list[str], teachers: Sequence[Teacher], batch: int = 4096) -> dict:
    """{teacher name: texts it cuts at its token limit}, by tokenising only (teachers that cannot
    tell are left out). Such a text's vector describes its first tokens only."""
    counts = {}
    for teacher in teachers:
        if teacher.count_truncated is None:
            continue
        n = sum(teacher.count_truncated(texts[i : i + batch]) for i in range(0, len(texts), batch))
        counts[teacher.name] = int(n)
        if n:
            limit = f"{teacher.max_length} tokens" if teacher.max_length else "its max_seq_length"
            log.warning(
                "%d of %d texts are longer than teacher %s reads (%s): their vectors describe "
                "the start of the text only; fix: a larger --max-length (up to the teacher's "
                "position limit) or shorter texts/documents",
                n,
                len(texts),
                teacher.name,
                limit,
            )
    return counts


def _combine_once(output, parts, plan, texts, teachers, before) -> BuildResult:
    """Combine under ``.combine.lock``: of slices finishing together, the first combines."""
    rows, skipped = len(texts), plan["skipped_empty"]
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


def _combine(
    output: pathlib.Path,
    parts: pathlib.Path,
    plan: dict,
    texts: list[str],
    teachers: Sequence[Teacher],
) -> pathlib.Path:
    """Build the TFDS dataset from all chunks in a temp folder, then move it into place."""
    chunks = [
        (a, _chunk_path(parts, a, b))
        for i in range(plan["num_shards"])
        for a, b in _slice_chunks(plan, i)
    ]
    chunked = "chunks" in plan["identity"]
    rejected, num_chunks = [], 0
    for start, path in chunks:
        bad = ~np.isfinite(np.load(path, mmap_mode="r")).all(axis=1)
        if chunked:
            payload = chunk_vectors.load_payload(chunk_vectors.payload_path(path))
            bad |= payload.bad_documents()
            num_chunks += int(payload.counts[~bad].sum())
        rejected.extend((start + np.flatnonzero(bad)).tolist())
    if rejected:
        log.warning(
            "rejected %d rows with NaN or all-zero teacher vectors, e.g. rows %s",
            len(rejected),
            rejected[:10],
        )
    if len(rejected) == len(texts):
        raise UserError(
            f"every one of {len(texts)} texts got a NaN or all-zero teacher vector; the teacher "
            "models look broken; fix: check the --teacher folders"
        )
    metadata = {
        "identity": plan["identity"],
        "dim": plan["identity"]["dim"],
        "dtype": plan["identity"]["dtype"],
        "teachers": plan["identity"]["teachers"],
        "normalisation": NORMALISATION_NOTE,
        "rows": len(texts) - len(rejected),
        "skipped_empty": plan["skipped_empty"],
        "rejected": {"count": len(rejected), "first_rows": rejected[:20]},
        "truncated_by_teacher": count_truncated(texts, teachers),
    }
    if chunked:
        metadata["chunks"] = {**plan["identity"]["chunks"], "count": num_chunks}
    target = output / DATASET_DIR
    build_and_install(TeacherDataset, output, target, texts=texts, chunks=chunks, metadata=metadata)
    shutil.rmtree(parts, ignore_errors=True)
    return target


def build_and_install(
    builder_class: type, output: pathlib.Path, target: pathlib.Path, **fields: Any
) -> None:
    """Prepares the TFDS ``builder_class(**fields)`` as array_record in a temporary folder of
    ``output`` and installs the result at ``target`` (see ``install``)."""
    with build_folder(output) as tmp:
        builder = builder_class(
            **fields, data_dir=os.path.join(tmp, "tfds"), file_format="array_record"
        )
        builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"))
        install(pathlib.Path(builder.data_dir), target)


@contextlib.contextmanager
def build_folder(output: pathlib.Path) -> Iterator[str]:
    """A temporary folder in ``output`` named with this process's tag (see OUTPUT_LEFTOVERS),
    removed on the way out whatever happens (a full disk)."""
    with tempfile.TemporaryDirectory(dir=output, prefix=f".build-{process_tag()}") as tmp:
        yield tmp


def install(built: pathlib.Path, target: pathlib.Path) -> None:
    """Move a finished build to ``target`` with checksums and the umask's modes; an old dataset
    there is replaced, never mixed."""
    record_checksums(built)
    honour_umask(built, directory=True)  # tempfile made its parents 0700
    for path in built.iterdir():
        honour_umask(path, directory=path.is_dir())
    retired = None
    if target.exists():
        retired = target.with_name(f".retired-{process_tag()}{target.name}")
        os.replace(target, retired)
    os.replace(built, target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def record_checksums(folder: pathlib.Path) -> None:
    """Writes ``checksums.json``: size and SHA-256 of every file of a finished dataset folder."""
    files = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != CHECKSUMS:
            files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    payload = {"algorithm": "sha256", "files": files}
    _write_atomically(folder / CHECKSUMS, (json.dumps(payload, indent=2) + "\n").encode())


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def verify_dataset_files(folder: pathlib.Path, fix: str) -> None:
    """Checks every file of a dataset folder against its ``checksums.json`` (size, SHA-256),
    so a damaged file stops the run now rather than at the step that reads it. A folder
    verified before in this process, whose files did not change since, is not read again.

    Raises:
      UserError: a file is missing, truncated or damaged (message names it and ``fix``).
    """
    sums = folder / CHECKSUMS
    if not sums.is_file():
        if str(folder.resolve()) in _VERIFIED:
            return  # warned already
        _VERIFIED[str(folder.resolve())] = ()
        log.warning(
            "dataset %s has no %s (built by an older jasper-jax): its files are not verified "
            "(a rebuild with --overwrite adds it)",
            folder,
            CHECKSUMS,
        )
        return
    files = _recorded_files(sums, fix)
    signature = _signature(folder, files, fix)
    if _VERIFIED.get(str(folder.resolve())) == signature:
        return
    started, size = time.monotonic(), 0
    for name, entry in files.items():
        path = folder / name
        if path.stat().st_size != entry["size"]:
            raise UserError(
                f"dataset file {path} is {path.stat().st_size} bytes, {entry['size']} when built "
                f"(truncated or damaged); fix: {fix}"
            )
        if _sha256(path) != entry["sha256"]:
            raise UserError(
                f"dataset file {path} is damaged (its SHA-256 differs from the one recorded in "
                f"{CHECKSUMS} at build time); fix: {fix}"
            )
        size += entry["size"]
    _VERIFIED[str(folder.resolve())] = signature
    log.info(
        "verified %d files (%.1f MB) of %s in %.1f s",
        len(files),
        size / 1e6,
        folder,
        time.monotonic() - started,
    )


def _recorded_files(sums: pathlib.Path, fix: str) -> dict[str, dict]:
    """The ``files`` of a checksums.json, checked for shape (names are plain file names)."""
    files = read_json_object(sums, fix).get("files")
    ok = isinstance(files, dict) and all(
        pathlib.PurePath(name).name == name
        and isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
        for name, entry in files.items()
    )
    if not ok:
        raise UserError(f"{sums} does not list files with size and sha256; fix: {fix}")
    return files


def _signature(folder: pathlib.Path, files: dict, fix: str) -> tuple:
    """(name, size, mtime, inode) of each listed file; a missing one is refused here."""
    out = []
    for name in files:
        try:
            stat = (folder / name).stat()
        except FileNotFoundError:
            raise UserError(f"dataset file {folder / name} is missing; fix: {fix}") from None
        out.append((name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return tuple(out)


def read_json_object(path: pathlib.Path, fix: str) -> dict:
    """A JSON object file of a dataset; a missing, truncated or invalid one is a UserError."""
    value = read_json(path, f"fix: {fix}")
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a {type(value).__name__}, not a JSON object; fix: {fix}")
    return value


def open_tfds_folder(folder: pathlib.Path, fix: str) -> tuple[Any, Any, dict]:
    """(builder, ``train`` data source, metadata) of a finished dataset folder, its files
    verified first (:func:`verify_dataset_files`).

    Raises:
      UserError: a damaged, missing or unreadable file, named with ``fix``.
    """
    verify_dataset_files(folder, fix)
    for name in _TFDS_JSON:  # datasets without checksums: a clear error still
        read_json_object(folder / name, fix)
    try:
        builder = tfds.builder_from_directory(str(folder))
        shards = builder.info.splits["train"].filepaths
        source = builder.as_data_source(split="train")
    except Exception as err:  # tfds raises many types for a broken folder
        raise UserError(
            f"cannot read the dataset in {folder} ({type(err).__name__}: {one_line(str(err))}); "
            f"fix: {fix}"
        ) from err
    for shard in shards:  # the reader opens them lazily: at the first row of each
        if not os.path.isfile(shard):
            raise UserError(f"dataset file {shard} is missing; fix: {fix}")
    return builder, source, dict(builder.info.metadata)
