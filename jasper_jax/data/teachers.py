"""Teacher embedding models: load them, fingerprint them, and encode texts into target vectors.

A teacher is a sentence-transformers folder (or a name from ``teacher_assets.KNOWN_TEACHERS``)
run by our Flax port (BERT/MPNet/Qwen2) or by sentence-transformers on torch.
:func:`compute_teacher_vectors` L2-normalises each teacher's vectors and concatenates them in the
given order; the concatenation is NOT renormalised (each slice has unit norm, the row has norm
sqrt(num_teachers)); the trainer renormalises it (SPEC 1.4).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import platform
import re
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
import tqdm

from jasper_jax.data.teacher_assets import KNOWN_TEACHERS, cache_root, resolve_model_folder
from jasper_jax.encode import TextEncoder, resolve_head
from jasper_jax.errors import UnsupportedModel, UserError, one_line
from jasper_jax.models.embedder import POOLED
from jasper_jax.models.loading import load_model, st_prompts
from jasper_jax.tokenizer import TOKENIZER_FILES, from_hf

_LARGE_FILE = 16 << 20  # hash only the ends of weight files: a full hash of GBs takes minutes
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """One teacher model. ``encode(texts) -> [len(texts), dim]`` float32, unnormalised."""

    name: str
    folder: str
    dim: int
    prompt: str | None
    model_fingerprint: str
    tokenizer_fingerprint: str
    encode: Callable[[list[str]], np.ndarray] = dataclasses.field(repr=False, compare=False)
    max_length: int | None = None  # tokens per text; None: the folder's max_seq_length
    # texts -> how many `encode` cuts at its token limit (their vectors see a prefix only)
    count_truncated: Callable[[list[str]], int] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )
    head: str | None = None  # a projection head chosen with `:head=` ("dense_8192")

    def describe(self) -> dict:
        """JSON-ready description stored in the dataset metadata (no callables)."""
        fields = dataclasses.asdict(self)
        fields.pop("encode")
        fields.pop("count_truncated")
        for name in ("max_length", "head"):
            if fields[name] is None:  # identities of datasets built before the field
                fields.pop(name)
        return fields


# Per-teacher options after the name or folder; `prompt=` comes last (its text may hold ':').
SPEC_OPTIONS = ("head", "prompt_name", "prompt")
_OPTION_START = re.compile(r":(head|prompt_name|prompt)=")


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """A `--teacher` value: `NAME_OR_FOLDER[:head=DIM][:prompt_name=NAME][:prompt=TEXT]`.

    head: a projection head of the folder (`8192` or `dense_8192`, e.g. one of stella's
      `2_Dense_<dim>` folders) instead of the one its modules.json runs.
    prompt_name: a prompt of the folder's `config_sentence_transformers.json` ("query").
    prompt: the prompt text itself (everything after `prompt=`).
    """

    source: str
    head: str | None = None
    prompt_name: str | None = None
    prompt: str | None = None


def parse_teacher_spec(text: str) -> TeacherSpec:
    """Splits a `--teacher` value into its source and options (see `TeacherSpec`).

    Raises:
      UserError: an unknown or repeated option, or an empty value.
    """
    start = _OPTION_START.search(text)
    if start is None:
        return TeacherSpec(text)
    options: dict[str, str] = {}
    rest = text[start.start() + 1 :]
    while rest:
        key, _, rest = rest.partition("=")
        if key == "prompt":
            value, rest = rest, ""
        else:
            value, _, rest = rest.partition(":")
        if key not in SPEC_OPTIONS or key in options or (not value and key != "prompt"):
            raise UserError(
                f"--teacher {text!r}: bad option {key + '=' + value!r}; write "
                "NAME_OR_FOLDER[:head=DIM][:prompt_name=NAME][:prompt=TEXT], each option once, "
                "prompt= last"
            )
        options[key] = value
    return TeacherSpec(text[: start.start()], **options)


def folder_fingerprints(folder: pathlib.Path) -> tuple[str, str]:
    """(model, tokenizer) SHA-256 fingerprints of a model folder's files.

    Files over 16 MiB contribute their size and first and last 4 MiB, so a changed checkpoint
    is still detected without reading gigabytes.
    """
    model, tokenizer = hashlib.sha256(), hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        if relative.startswith(".") or path.name in ("README.md", "desktop.ini"):
            continue
        target = tokenizer if path.name in TOKENIZER_FILES else model
        target.update(relative.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with open(path, "rb") as handle:
            if path.stat().st_size <= _LARGE_FILE:
                target.update(handle.read())
            else:
                target.update(handle.read(4 << 20))
                handle.seek(-(4 << 20), 2)
                target.update(handle.read())
    return model.hexdigest(), tokenizer.hexdigest()


def _jax_encoder(
    folder: pathlib.Path,
    prompt: str | None,
    batch_size: int,
    max_length: int | None = None,
    head: str | None = None,
):
    """Our Flax encoder for the folder (parity with sentence-transformers: cosine >= 0.9999),
    or None when its architecture or modules are not ones we implement; `head` chooses a
    projection head (None: the one the folder's modules.json runs)."""
    try:
        model = load_model(folder)
    except UnsupportedModel:  # a damaged folder is reported, not handed to torch
        return None, 0, None
    encoder = TextEncoder(model, batch_size=batch_size)
    try:
        head = resolve_head(model.config, head)
    except UserError as err:  # resolve_head speaks of `encode --head`
        dims = [name.removeprefix("dense_") for name in model.config.head_names]
        raise UserError(
            f"teacher {str(folder)!r}: head={head} does not exist in this model; its heads: "
            f"{dims or 'none (pooled output only)'}; fix: choose one of them or drop head="
        ) from err
    dim = model.config.hidden_size if head == POOLED else int(head.removeprefix("dense_"))

    def encode(texts: list[str]) -> np.ndarray:
        return encoder.encode(texts, head=head, prompt=prompt, max_length=max_length)

    def count(texts: list[str]) -> int:
        return encoder.count_truncated(texts, prompt=prompt, max_length=max_length)

    return encode, int(dim), count


def _torch_encoder(
    spec, folder: pathlib.Path, prompt: str | None, batch_size: int, max_length: int | None = None
):
    # sentence-transformers (and torch): optional, the `teachers` extra
    from sentence_transformers import SentenceTransformer

    try:
        model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    except Exception as err:  # a broken folder surfaces as many different exception types
        raise UserError(
            f"cannot load teacher {str(spec)!r} from {str(folder)!r} with sentence-transformers: "
            f"{one_line(err)}; fix: point --teacher at a complete sentence-transformers folder"
        ) from err
    if max_length:
        model.max_seq_length = max_length

    def encode(texts: list[str]) -> np.ndarray:
        vectors = model.encode(texts, batch_size=batch_size, prompt=prompt, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    tokenizer = from_hf(model.tokenizer)

    def count(texts: list[str]) -> int:
        return tokenizer.tokenize(texts, model.max_seq_length, prompt).truncated

    return encode, int(model.get_embedding_dimension()), count


BACKENDS = ("auto", "jax", "torch")


def load_teacher(
    spec: str | pathlib.Path,
    prompt: str | None = None,
    batch_size: int = 64,
    backend: str = "auto",
    max_length: int | None = None,
    sample: Sequence[str] = (),
) -> Teacher:
    """Load a teacher; ``prompt`` is prefixed to every text.

    spec: a bundled name or a folder, with options (`parse_teacher_spec`): `:head=8192` runs
    that projection head (our port only), `:prompt_name=query` / `:prompt=TEXT` this teacher's
    own prompt instead of ``prompt``.
    backend: "jax" runs our Flax port of the folder (BERT / MPNet / Qwen2 / Qwen3
    sentence-transformers models; the only choice on TPU); "torch" runs sentence-transformers
    (CPU); "auto" takes jax where the architecture is supported, else torch, and on a CPU-only
    machine with a ``sample`` of at least ``MIN_SAMPLE`` texts times both on it and keeps the
    faster, once per teacher and machine (see ``remembered_backend``).
    max_length: tokens each text is cut to; None keeps the folder's ``max_seq_length`` (long
    documents want the model's position limit, e.g. 512 for BERT/MPNet teachers).
    sample: texts like the ones to encode (a spread over the corpus), for ``auto``'s timing.
    """
    if backend not in BACKENDS:
        raise UserError(f"teacher backend {backend!r}: choose one of {BACKENDS}")
    parsed = parse_teacher_spec(str(spec))
    spec = parsed.source
    folder = resolve_model_folder(spec, what="teacher")
    prompt = _teacher_prompt(parsed, folder, prompt)
    if parsed.head is not None:
        if backend == "torch":
            raise UserError(
                f"teacher {str(spec)!r}: head={parsed.head} runs on our port only "
                "(sentence-transformers runs the head its modules.json names); fix: use "
                "--backend jax or auto"
            )
        backend = "jax"  # sentence-transformers cannot run another head: nothing to time
    model_fp, tokenizer_fp = folder_fingerprints(folder)
    key = f"{model_fp}:{tokenizer_fp}"
    timed = backend == "auto" and _can_time_both(sample)
    if timed and recalled_backend(key) == "torch":
        # our port timed slower here before: do not load it only to learn that again
        log.info("teacher %s: torch, as timed before on this machine (%s)", spec, _choices_file())
        backend = "torch"
    encode, dim, count = (
        (None, 0, None)
        if backend == "torch"
        else _jax_encoder(folder, prompt, batch_size, max_length, parsed.head)
    )
    ported = encode is not None
    if not ported:
        if backend == "jax":
            raise UserError(
                f"teacher {str(spec)!r}: its architecture is not one jasper-jax implements; "
                "fix: use --backend torch (sentence-transformers)"
                + (" without head=" if parsed.head else "")
            )
        encode, dim, count = _torch_encoder(spec, folder, prompt, batch_size, max_length)
    if backend == "auto" and ported and timed:
        sides = {"jax": (encode, dim, count)}
        load_torch = lambda: _torch_encoder(spec, folder, prompt, batch_size, max_length)

        def measure() -> str:
            sides["torch"] = load_torch()
            return _faster(str(spec), sides, list(sample), batch_size)

        choice = remembered_backend(key, str(spec), measure)
        encode, dim, count = sides[choice] if choice in sides else load_torch()
    name = str(spec) if str(spec) in KNOWN_TEACHERS else folder.name
    head = None if parsed.head is None else f"dense_{dim}"
    return Teacher(
        name, str(folder), dim, prompt, model_fp, tokenizer_fp, encode, max_length, count, head
    )


def _teacher_prompt(parsed: TeacherSpec, folder: pathlib.Path, prompt: str | None) -> str | None:
    """The teacher's own prompt (`prompt=`, or `prompt_name=` looked up in the folder's
    sentence-transformers prompts), else the build's."""
    if parsed.prompt is not None:
        return parsed.prompt or None
    if parsed.prompt_name is None:
        return prompt
    prompts, _ = st_prompts(folder)
    if parsed.prompt_name not in prompts:
        raise UserError(
            f"teacher {parsed.source!r}: prompt_name={parsed.prompt_name!r} is not one of its "
            f"prompts {sorted(prompts)} (config_sentence_transformers.json); fix: name one of "
            "them, or give the text with prompt=..."
        )
    return prompts[parsed.prompt_name] or None


# Sample texts below which `auto` does not time the two backends (timing noise, and small jobs
# should not pay for a second model load).
MIN_SAMPLE = 64


# Texts from which `auto` times the backends; smaller builds take jax without timing.
TIMING_FROM = 4096


def timing_sample(texts: Sequence[str], size: int = 128) -> list[str]:
    """`size` texts spread over a corpus of at least TIMING_FROM texts (else none): enough to
    time a backend, about 1% of a big build's work per backend."""
    if len(texts) < TIMING_FROM:
        return []
    return list(texts[:: len(texts) // size][:size])


def _can_time_both(sample: Sequence[str]) -> bool:
    """Timing is worth it on a CPU-only machine (elsewhere jax runs on the accelerator and torch
    here would not) where sentence-transformers is installed, with enough sample texts."""
    return (
        len(sample) >= MIN_SAMPLE
        and jax.default_backend() == "cpu"
        and importlib.util.find_spec("sentence_transformers") is not None
    )


def _choices_file() -> pathlib.Path:
    return cache_root() / "teacher-backends.json"


def _machine_key(key: str) -> str:
    return f"{key}:{platform.machine()}:{os.cpu_count()}:{jax.default_backend()}"


def recalled_backend(key: str) -> str | None:
    """The backend `auto` timed faster for this teacher (fingerprints `key`) on this machine
    before, or None."""
    try:
        known = json.loads(_choices_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    choice = known.get(_machine_key(key)) if isinstance(known, dict) else None
    return choice if choice in ("jax", "torch") else None


def remembered_backend(key: str, name: str, measure: Callable[[], str]) -> str:
    """The backend `auto` runs a teacher with on this machine: timed once (`measure`), then read
    back from ``cache_root()/teacher-backends.json`` (by the teacher's fingerprints and the
    machine), so every later build, a resumed one included, encodes with the same backend and
    gives the same vectors. Delete the file to time again."""
    choice = recalled_backend(key)
    path = _choices_file()
    if choice is not None:
        log.info("teacher %s: %s, as timed before on this machine (%s)", name, choice, path)
        return choice
    key = _machine_key(key)
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    known[key] = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(known, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(partial, path)
    except OSError as e:  # a read-only cache costs a timing per build, nothing else
        log.warning("could not remember the backend choice in %s: %s", path, e)
    return known[key]


def _faster(name: str, sides: dict[str, tuple], sample: list[str], batch_size: int) -> str:
    """The backend ("jax" or "torch") that encodes `sample` faster, timed after a warm-up pass
    (which also compiles the jax programs the sample's lengths need, kept for the real run)."""
    rates = {}
    for backend, (encode, _, _) in sides.items():
        encode(sample if backend == "jax" else sample[:batch_size])
        start = time.perf_counter()
        encode(sample)
        rates[backend] = len(sample) / (time.perf_counter() - start)
    best = max(rates, key=rates.__getitem__)
    log.info(
        "teacher %s: %s on %d sample texts; using %s",
        name,
        ", ".join(f"{b} {r:.0f} texts/s" for b, r in rates.items()),
        len(sample),
        best,
    )
    return best


def normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """Unit-length rows [n, d] float32; rows with a NaN/inf or zero norm become all-NaN.

    Marking bad rows with NaN (rather than raising) lets the caller reject exactly those rows
    and report their ids.
    """
    vectors = vectors.astype(np.float64)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    bad = ~np.isfinite(norms) | (norms == 0)
    safe = np.where(bad, 1.0, norms)
    out = np.where(bad, np.nan, vectors / safe)
    return out.astype(np.float32)


def compute_teacher_vectors(
    texts: Sequence[str],
    teachers: Sequence[Teacher],
    *,
    encode_batch: int = 256,
    progress: bool = True,
    bar: tqdm.tqdm | None = None,
) -> np.ndarray:
    """Concatenated per-teacher unit vectors.

    Returns: [len(texts), sum(teacher.dim)] float32. Teacher k occupies columns
    ``offset_k : offset_k + dim_k`` (offsets in teacher order). A row where any teacher gave a
    NaN or all-zero vector is all-NaN in that teacher's slice (see :func:`normalise_rows`).
    ``bar`` is an outer progress bar to advance (one unit per text per teacher); without one a
    bar of its own is shown when ``progress``.
    """
    out = np.empty((len(texts), sum(t.dim for t in teachers)), dtype=np.float32)
    own_bar = bar is None
    if own_bar:
        bar = tqdm.tqdm(total=len(texts) * len(teachers), unit="text", disable=not progress)
    offset = 0
    # Blocks of similar length: a block pads to its longest text, so one long text among short
    # ones would make every batch of its block long (character count is a cheap proxy).
    order = np.argsort([len(t) for t in texts], kind="stable")
    try:
        for teacher in teachers:
            bar.set_postfix_str(teacher.name)
            for start in range(0, len(texts), encode_batch):
                rows = order[start : start + encode_batch]
                batch = [texts[i] for i in rows]
                raw = teacher.encode(batch)
                if raw.shape != (len(batch), teacher.dim):
                    raise UserError(
                        f"teacher {teacher.name!r} returned shape {raw.shape} for "
                        f"{len(batch)} texts; expected ({len(batch)}, {teacher.dim})"
                    )
                out[rows, offset : offset + teacher.dim] = normalise_rows(raw)
                bar.update(len(batch))
            offset += teacher.dim
    finally:
        if own_bar:
            bar.close()
    return out


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
