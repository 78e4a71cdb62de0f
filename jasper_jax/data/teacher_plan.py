"""The plan of a teacher-dataset build: its checked inputs, its identity, and its slices.

A plan (``OUTPUT/_parts/plan.json``) is::

    identity      what the dataset is: teachers (name, dim, prompt, fingerprints, offset), dim,
                  dtype, corpus fingerprint, number of texts (and the chunking in chunk mode;
                  in pair mode ``pairs``: negatives k and the column roles, and each teacher's
                  document prompt)
    num_shards    slices the corpus is cut into (one per machine or process)
    chunk_size    rows per resumable block of work
    skipped_empty empty texts left out of the corpus

A build resumes only the parts of a plan with the same identity and layout; anything else is
refused (or, with ``overwrite``, started over), never mixed.

Pair mode: the texts are the pair rows' m = 2 + k columns flattened column-major (n queries,
then n positives, then each negative slot), so text ``c * n + r`` is column c of row r, and the
first n texts (role "query") take the teachers' query prompts, the rest their document prompts.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
from collections.abc import Sequence

import jax
import numpy as np

from jasper_jax import sharding
from jasper_jax.data import corpus as corpus_lib
from jasper_jax.data.corpus_mix import CorpusMix
from jasper_jax.data.dataset_build import (
    DATASET_DIR,
    PARTS_DIR,
    PARTS_LEFTOVERS,
    PLAN,
    finished_identity,
    read_plan,
    refuse_foreign_dataset,
    verify_dataset_files,
    write_plan,
)
from jasper_jax.data.pairs import DOCUMENT, QUERY
from jasper_jax.data.teacher_backends import timing_sample
from jasper_jax.data.teachers import Runtime, Teacher, load_teacher
from jasper_jax.errors import UserError, one_line
from jasper_jax.locks import remove_leftovers
from jasper_jax.paths import is_remote

FORMAT_VERSION = 1
DTYPES = {"float32": np.float32, "float16": np.float16}  # storage of the teacher vectors
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")  # teacher compute; auto: bf16 on TPU/GPU
log = logging.getLogger(__name__)


def check_arguments(
    dtype, shard_index, num_shards, batch_size, chunk_size, limit, output: str | os.PathLike = ""
) -> None:
    """Raises UserError for an unknown dtype, a slice out of range, a non-positive size or a
    cloud URL as the output (``check_local_output``)."""
    check_local_output(output)
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


def check_local_output(output: str | os.PathLike) -> None:
    """Refuses a cloud URL as the output: the build relies on atomic renames and file locks,
    which object stores lack (and pathlib would make a local folder named "gs:")."""
    if is_remote(output):
        raise UserError(
            f"--output {str(output)!r}: a teacher dataset is built in a local or mounted folder "
            "(it needs atomic renames and locks); fix: build into a local folder or a gcsfuse "
            "mount of the bucket, then copy it with `gcloud storage cp -r`"
        )


def corpus_texts(
    corpus: str | CorpusMix | Sequence[str], limit: int | None
) -> tuple[list[str], int]:
    """(the non-empty texts, first ``limit`` of them, number of empty texts skipped); a spec or
    a ``CorpusMix`` (several corpora, weights, augmentation) chooses its ``limit`` texts itself."""
    if isinstance(corpus, str):
        corpus = CorpusMix((corpus,))
    if isinstance(corpus, CorpusMix):
        texts, skipped = corpus.texts(limit)
    else:
        texts = [t for t in corpus if t.strip()]
        skipped = len(corpus) - len(texts)
        texts = texts[:limit] if limit else texts
    if skipped:
        log.warning("skipped %d empty texts", skipped)
    if not texts:
        name = (
            repr(", ".join(corpus.specs))
            if isinstance(corpus, CorpusMix)
            else f"of {len(corpus)} given texts"
        )
        raise UserError(
            f"corpus {name} holds no non-empty texts; fix: give a corpus with text on its lines"
        )
    return texts, skipped


def teacher_runtime(mesh_shape: Sequence[int] | None, compute_dtype: str) -> Runtime | None:
    """Where teachers run: None (the default: data parallel over local devices, float32) unless
    a mesh is asked for, several processes run together, or the compute dtype is bfloat16."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise UserError(f"compute dtype {compute_dtype!r}: choose one of {COMPUTE_DTYPES}")
    if compute_dtype == "auto":
        accelerated = jax.default_backend() in ("tpu", "gpu")
        compute_dtype = "bfloat16" if accelerated else "float32"
    if mesh_shape is None and jax.process_count() == 1 and compute_dtype == "float32":
        return None
    mesh = sharding.make_mesh(tuple(mesh_shape or (-1, 1, 1)), flag="--mesh-shape")
    return Runtime(mesh, compute_dtype)


def load_build_teacher(
    spec,
    prompt,
    batch_size,
    backend,
    max_length,
    texts=(),
    runtime: Runtime | None = None,
    document_prompt: str | None = None,
) -> Teacher:
    """A loaded teacher (a ``Teacher`` passes through); a folder whose files do not load (a
    damaged weights file) is a UserError naming it, in one line (libraries raise many types
    with long messages)."""
    if isinstance(spec, Teacher):
        return spec
    try:
        sample = timing_sample(texts)
        return load_teacher(
            spec, prompt, batch_size, backend, max_length, sample, runtime, document_prompt
        )
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


def make_plan(texts, skipped, teachers, dtype, num_shards, chunk_size, pairs=None) -> dict:
    """The plan (module docstring) of a build of ``texts`` with ``teachers``; ``pairs`` (pair
    mode: {"negatives": k, "roles": the m column roles}) joins the identity."""
    offset, described = 0, []
    for teacher in teachers:
        entry = teacher.describe()
        entry["folder"] = os.path.basename(entry["folder"])  # machines differ in absolute paths
        entry["offset"] = offset
        entry.pop("document_prompt", None)  # single texts: the one prompt is every text's
        if pairs is not None:
            entry["document_prompt"] = teacher.document_prompt
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
    if pairs is not None:
        identity["pairs"] = pairs
    return {
        "identity": identity,
        "num_shards": num_shards,
        "chunk_size": chunk_size,
        "skipped_empty": skipped,
    }


def differences(old: dict, new: dict) -> list[str]:
    """Readable list of what differs between two dataset identities."""
    if "unreadable" in old:
        return [f"its {old['unreadable']} is unreadable"]
    found = []
    old_teachers = [(t["name"], t["dim"]) for t in old.get("teachers", [])]
    new_teachers = [(t["name"], t["dim"]) for t in new["teachers"]]
    if old_teachers != new_teachers:
        found.append(f"teachers (name, dim) {old_teachers} vs now {new_teachers}")
    else:
        for key in ("prompt", "document_prompt", "model_fingerprint", "tokenizer_fingerprint"):
            if [t.get(key) for t in old["teachers"]] != [t.get(key) for t in new["teachers"]]:
                found.append(f"teacher {key.replace('_', ' ')}s differ")
    for key in ("corpus_fingerprint", "num_texts", "dtype", "format_version", "chunks", "pairs"):
        if old.get(key) != new.get(key):
            found.append(f"{key} {old.get(key)!r} vs now {new.get(key)!r}")
    return found or ["unknown difference"]


def prepare_output(output: pathlib.Path, plan: dict, overwrite: bool, fix: str) -> bool:
    """True when ``output`` already holds this dataset (its files verified, ``fix`` named if
    damaged); else False, with ``_parts`` ready for the plan. Raises UserError for a different
    dataset (unless ``overwrite``) or foreign files."""
    existing = finished_identity(output)
    if existing == plan["identity"] and not overwrite:
        log.info("%s already holds this dataset; nothing to do", output)
        verify_dataset_files(output / DATASET_DIR, fix)
        return True
    if existing is not None and not overwrite:
        raise UserError(
            f"output folder {str(output)!r} already holds a different teacher dataset ("
            + "; ".join(differences(existing, plan["identity"]))
            + "); fix: choose another --output, or pass --overwrite to replace it"
        )
    parts = prepare_parts(output, plan, overwrite)
    remove_leftovers(parts, PARTS_LEFTOVERS)
    return False


def prepare_parts(output: pathlib.Path, plan: dict, overwrite: bool) -> pathlib.Path:
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
    plan_file = parts / PLAN
    if plan_file.is_file():
        reasons = _plan_conflicts(plan_file, plan)
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
    write_plan(parts, plan)
    return parts


def _plan_conflicts(plan_file: pathlib.Path, new: dict) -> list[str]:
    """Why the plan in ``plan_file`` cannot be resumed as ``new`` (empty: it can)."""
    old = read_plan(plan_file)
    try:
        if old["identity"] != new["identity"]:
            return differences(old["identity"], new["identity"])
        layout = ("num_shards", "chunk_size")
        if any(old[k] != new[k] for k in layout):
            return [
                f"(num_shards, chunk_size) were {[old[k] for k in layout]}, now "
                f"{[new[k] for k in layout]}"
            ]
    except (KeyError, TypeError):  # damaged (None) or not a plan
        return [f"its {plan_file} is unreadable"]
    return []


def slice_marker(parts: pathlib.Path, index: int, count: int) -> pathlib.Path:
    """The file that marks slice ``index`` of ``count`` as finished."""
    return parts / f"slice-{index:05d}-of-{count:05d}.done"


def slice_blocks(plan: dict, index: int) -> list[tuple[int, int]]:
    """Contiguous row ranges [start, stop) of one slice, block by block."""
    rows, count = plan["identity"]["num_texts"], plan["num_shards"]
    begin, end = rows * index // count, rows * (index + 1) // count
    step = plan["chunk_size"]
    return [(a, min(a + step, end)) for a in range(begin, end, step)]


def pair_width(metadata: dict) -> int | None:
    """m = 2 + k, the texts per record of a pair dataset (its metadata or plan identity);
    None for a single-text dataset."""
    pairs = metadata.get("pairs")
    return None if pairs is None else len(pairs["roles"])


def role_runs(identity: dict, start: int, stop: int) -> list[tuple[int, int, str]]:
    """The texts [start, stop) cut into runs of one role, [(a, b, role)]: single texts are all
    queries; pair mode's first num_texts / m texts are (module docstring)."""
    width = pair_width(identity)
    queries = identity["num_texts"] if width is None else identity["num_texts"] // width
    runs = [(start, min(stop, queries), QUERY), (max(start, queries), stop, DOCUMENT)]
    return [(a, b, role) for a, b, role in runs if a < b]
