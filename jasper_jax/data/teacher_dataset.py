"""Teacher dataset: each corpus text with its concatenated teacher vector, as TFDS array_record.

Layout of an output folder::

    OUTPUT/dataset/            finished TFDS dataset (features text, teacher [D], index)
    OUTPUT/_parts/plan.json    what is being built (teachers, corpus, dtype, slicing)
    OUTPUT/_parts/rows-*.npy   finished chunks of vectors, each written atomically
    OUTPUT/_parts/slice-I-of-N.done

``build_teacher_dataset(..., shard_index=I, num_shards=N)`` encodes the I-th contiguous slice of
the corpus; many machines (sharing OUTPUT) can each take one slice. A re-run keeps finished
chunks and redoes the rest. The run that finds every slice done combines them into
``OUTPUT/dataset`` (built in a temp folder, then renamed) and removes ``_parts``.

Chunk mode (``chunking=`` or ``chunk_spans=``, dewey-style chunk alignment): each text is a
document; rows also hold ``chunk_spans`` [n, 2] (character spans) and ``chunk_teacher`` [n, D]
(each chunk encoded on its own), see ``jasper_jax.data.chunk_vectors``.

Stored vectors: each teacher's slice is unit length; the concatenation is NOT renormalised on
disk (row norm sqrt(num_teachers)); the trainer renormalises it (SPEC 1.4). TFDS shuffles rows
by key on write; ``index`` is the text's row in the corpus (after empty texts are skipped).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from jasper_jax.data import chunk_vectors
from jasper_jax.data import corpus as corpus_lib
from jasper_jax.data.chunking import ChunkingConfig, Span
from jasper_jax.data.teachers import Teacher, compute_teacher_vectors, load_teacher
from jasper_jax.errors import UserError

DATASET_DIR = "dataset"
PARTS_DIR = "_parts"
FORMAT_VERSION = 1
DTYPES = {"float32": np.float32, "float16": np.float16}
NORMALISATION_NOTE = (
    "each teacher's slice is L2-normalised; the concatenation is not renormalised on disk "
    "(row norm = sqrt(num_teachers)); the trainer renormalises it to unit length"
)
log = logging.getLogger(__name__)


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
    loaded = [
        t if isinstance(t, Teacher) else load_teacher(t, prompt, batch_size, backend, max_length)
        for t in teachers
    ]
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
    existing = _finished_identity(output)
    if existing == plan["identity"] and not overwrite:
        log.info("%s already holds this dataset; nothing to do", output)
        truncated = _recorded_truncation(output)
        return BuildResult(output / DATASET_DIR, len(texts), skipped, [], truncated)
    if existing is not None and not overwrite:
        raise UserError(
            f"output folder {str(output)!r} already holds a different teacher dataset ("
            + "; ".join(_differences(existing, plan["identity"]))
            + "); fix: choose another --output, or pass --overwrite to replace it"
        )
    parts = _prepare_parts(output, plan, overwrite)
    _encode_slice(parts, plan, texts, loaded, shard_index, progress, chunker)
    pending = [i for i in range(num_shards) if not _slice_marker(parts, i, num_shards).exists()]
    if pending:
        log.info(
            "slice %d done; slices %s still to run before the dataset is combined",
            shard_index,
            pending,
        )
        return BuildResult(None, len(texts), skipped, pending)
    dataset_dir = _combine(output, parts, plan, texts, loaded)
    return BuildResult(dataset_dir, len(texts), skipped, [], _recorded_truncation(output))


def open_teacher_dataset(data_dir: str | pathlib.Path) -> tuple[Any, dict]:
    """(random-access source, metadata) of a built teacher dataset.

    ``source[i]`` is a dict: ``text`` bytes, ``teacher`` [D] float32/16, ``index`` int64.

    ``data_dir`` is a build output folder or the TFDS dataset folder itself. The source is a
    TFDS ``ArrayRecordDataSource``, which grain accepts as a ``RandomAccessDataSource``.
    """
    path = pathlib.Path(data_dir).expanduser()
    folder = path / DATASET_DIR if (path / DATASET_DIR / "dataset_info.json").is_file() else path
    if not (folder / "dataset_info.json").is_file():
        if (path / PARTS_DIR / "plan.json").is_file():
            num_shards = json.loads((path / PARTS_DIR / "plan.json").read_text())["num_shards"]
            done = sorted(p.name for p in (path / PARTS_DIR).glob("slice-*.done"))
            raise UserError(
                f"teacher dataset {str(path)!r} is unfinished: {len(done)} of {num_shards} slices "
                "done; fix: run the remaining `jasper-jax teachers --shard-index I` slices"
            )
        raise UserError(
            f"no teacher dataset at {str(path)!r} (no dataset_info.json); fix: build one with "
            "`jasper-jax teachers --corpus ... --teacher ... --output DIR`"
        )
    builder = tfds.builder_from_directory(str(folder))
    return builder.as_data_source(split="train"), dict(builder.info.metadata)


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
        raise UserError(f"corpus {str(corpus)[:80]!r} holds no non-empty texts; fix: check it")
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


def _finished_identity(output: pathlib.Path) -> dict | None:
    info = output / DATASET_DIR / "metadata.json"
    if not info.is_file():
        return None
    return json.loads(info.read_text()).get("identity", {})


def _prepare_parts(output: pathlib.Path, plan: dict, overwrite: bool) -> pathlib.Path:
    """Create or validate ``_parts`` for this plan; refuse unrelated or conflicting content."""
    parts = output / PARTS_DIR
    names = [p.name for p in output.iterdir()] if output.is_dir() else []
    foreign = [n for n in names if n not in (DATASET_DIR, PARTS_DIR) and not n.startswith(".")]
    if foreign and not overwrite:
        raise UserError(
            f"output folder {str(output)!r} holds files that are not a teacher dataset "
            f"({foreign[:5]}); fix: choose an empty or new --output folder"
        )
    plan_file = parts / "plan.json"
    if plan_file.is_file():
        reasons = _plan_conflicts(json.loads(plan_file.read_text()), plan)
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


def _write_atomically(path: pathlib.Path, payload: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        f.write(payload)
    os.replace(f.name, path)


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
                chunk_vectors.save_payload(chunk_vectors.payload_path(path), payload, dtype)
            with tempfile.NamedTemporaryFile(dir=parts, suffix=".npy", delete=False) as f:
                np.save(f, vectors.astype(dtype))
            os.replace(f.name, path)  # a chunk file exists only when complete
    _write_atomically(marker, b"done\n")


def _recorded_truncation(output: pathlib.Path) -> dict[str, int]:
    info = output / DATASET_DIR / "metadata.json"
    if not info.is_file():
        return {}
    return json.loads(info.read_text()).get("truncated_by_teacher", {})


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
    with tempfile.TemporaryDirectory(dir=output, prefix=".build-") as tmp:
        builder = TeacherDataset(
            texts=texts,
            chunks=chunks,
            metadata=metadata,
            data_dir=os.path.join(tmp, "tfds"),
            file_format="array_record",
        )
        builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"))
        _install(pathlib.Path(builder.data_dir), target, plan["identity"])
    shutil.rmtree(parts, ignore_errors=True)
    return target


def _install(built: pathlib.Path, target: pathlib.Path, identity: dict) -> None:
    """Move a finished build to ``target``; an old dataset there is replaced, never mixed."""
    if _finished_identity(target.parent) == identity and target.exists():
        return  # a concurrent slice run installed the same dataset first
    retired = None
    if target.exists():
        retired = target.with_name(f".retired-{os.getpid()}-{target.name}")
        os.replace(target, retired)
    os.replace(built, target)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
