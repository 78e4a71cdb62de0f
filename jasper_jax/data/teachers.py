"""Teacher embedding models: load them, fingerprint them, and encode texts into target vectors.

A teacher is a sentence-transformers folder (or a name from ``teacher_assets.KNOWN_TEACHERS``)
run by our Flax port (BERT/MPNet/Qwen2/Qwen3/Mistral/NV-Embed) or by sentence-transformers on
torch.
:func:`compute_teacher_vectors` L2-normalises each teacher's vectors and concatenates them in the
given order; the concatenation is NOT renormalised (each slice has unit norm, the row has norm
sqrt(num_teachers)); the trainer renormalises it (SPEC 1.4).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pathlib
from collections.abc import Callable, Sequence

import jax
import numpy as np
import tqdm
from jax.sharding import Mesh

from jasper_jax.data.pairs import DOCUMENT, QUERY
from jasper_jax.data.teacher_assets import KNOWN_TEACHERS, resolve_model_folder
from jasper_jax.data.teacher_backends import (
    can_time_both,
    choices_file,
    faster,
    recalled_backend,
    remembered_backend,
)
from jasper_jax.data.teacher_spec import TeacherSpec, parse_teacher_spec, teacher_prompt
from jasper_jax.encode import TextEncoder, resolve_head
from jasper_jax.errors import UnsupportedModel, UserError, one_line
from jasper_jax.models.embedder import POOLED
from jasper_jax.models.loading import ENCODER_CONFIGS, load_model
from jasper_jax.tokenizer import TOKENIZER_FILES, from_hf

_LARGE_FILE = 16 << 20  # hash only the ends of weight files: a full hash of GBs takes minutes
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Teacher:
    """One teacher model. ``encode(texts) -> [len(texts), dim]`` float32, unnormalised, with
    ``prompt``; loaded ones take ``encode(texts, prompt=OTHER)`` too (:meth:`encode_as`)."""

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
    compute_dtype: str | None = None  # "bfloat16" when not float32 (vectors differ slightly)
    document_prompt: str | None = None  # a pair dataset's documents' (`prompt`: its queries')

    def describe(self) -> dict:
        """JSON-ready description stored in the dataset metadata (no callables)."""
        fields = dataclasses.asdict(self)
        fields.pop("encode")
        fields.pop("count_truncated")
        for name in ("max_length", "head", "compute_dtype", "document_prompt"):
            if fields[name] is None:  # identities of datasets built before the field
                fields.pop(name)
        return fields

    def encode_as(self, texts: list[str], role: str = QUERY) -> np.ndarray:
        """[len(texts), dim] float32, unnormalised: ``texts`` with the prompt of ``role``
        ("query": ``prompt``, "document": ``document_prompt``)."""
        return self._with_prompt(self.encode, texts, role)

    def count_as(self, texts: list[str], role: str = QUERY) -> int:
        """How many of ``texts``, with the prompt of ``role``, are cut at the token limit
        (``count_truncated`` must not be None)."""
        return self._with_prompt(self.count_truncated, texts, role)

    def _with_prompt(self, call: Callable, texts: list[str], role: str):
        """``call(texts)`` with the prompt of ``role``: the bound one (``prompt``) is passed
        on only when it differs, so an ``encode(texts)`` of one prompt serves both roles."""
        prompt = {QUERY: self.prompt, DOCUMENT: self.document_prompt}[role]
        return call(texts) if prompt == self.prompt else call(texts, prompt=prompt)


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


def _first_backend(
    parsed: TeacherSpec, backend: str, key: str, sample: Sequence[str], port_only: str | None
) -> tuple[str, bool]:
    """(backend to load first, whether `auto` times both): a chosen head, a mesh or bfloat16
    (`port_only` names which) run on our port only; a teacher whose port timed slower here
    before goes straight to torch."""
    if port_only:
        if backend == "torch":
            raise UserError(
                f"teacher {parsed.source!r}: {port_only} runs on our port only "
                "(sentence-transformers runs one process on CPU, with the head its modules.json "
                "names); fix: use --backend jax or auto"
            )
        return "jax", False  # sentence-transformers cannot do it: nothing to time
    timed = backend == "auto" and can_time_both(sample)
    if timed and recalled_backend(key) == "torch":
        # do not load our port only to learn again that it is slower here
        name = parsed.source
        log.info("teacher %s: torch, as timed before on this machine (%s)", name, choices_file())
        return "torch", True
    return backend, timed


def _jax_encoder(
    folder: pathlib.Path,
    prompt: str | None,
    batch_size: int,
    max_length: int | None = None,
    head: str | None = None,
    runtime: Runtime | None = None,
):
    """Our Flax encoder for the folder (parity with sentence-transformers: cosine >= 0.9999),
    or None when its architecture or modules are not ones we implement; `head` chooses a
    projection head (None: the one the folder's modules.json runs); `runtime`: the mesh and
    compute dtype (weights sharded over every device, see `TextEncoder`)."""
    try:
        model = load_model(folder)
    except UnsupportedModel:  # a damaged folder is reported, not handed to torch
        return None, 0, None
    placed = {} if runtime is None else dict(mesh=runtime.mesh, dtype=runtime.dtype)
    encoder = TextEncoder(model, batch_size=batch_size, sharded_weights=bool(placed), **placed)
    try:
        head = resolve_head(model.config, head)
    except UserError as err:  # resolve_head speaks of `encode --head`
        dims = [name.removeprefix("dense_") for name in model.config.head_names]
        raise UserError(
            f"teacher {str(folder)!r}: head={head} does not exist in this model; its heads: "
            f"{dims or 'none (pooled output only)'}; fix: choose one of them or drop head="
        ) from err
    dim = model.config.hidden_size if head == POOLED else int(head.removeprefix("dense_"))

    def encode(texts: list[str], prompt: str | None = prompt) -> np.ndarray:
        return encoder.encode(texts, head=head, prompt=prompt, max_length=max_length)

    def count(texts: list[str], prompt: str | None = prompt) -> int:
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

    def encode(texts: list[str], prompt: str | None = prompt) -> np.ndarray:
        vectors = model.encode(texts, batch_size=batch_size, prompt=prompt, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    tokenizer = from_hf(model.tokenizer)

    def count(texts: list[str], prompt: str | None = prompt) -> int:
        return tokenizer.tokenize(texts, model.max_seq_length, prompt).truncated

    return encode, int(model.get_embedding_dimension()), count


BACKENDS = ("auto", "jax", "torch")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where and how our port runs a teacher: a device mesh (weights sharded over all of its
    devices, batch rows over data x fsdp) and the compute dtype ("float32" or "bfloat16")."""

    mesh: Mesh
    dtype: str = "float32"

    def port_only(self) -> str | None:
        """What in this runtime sentence-transformers cannot do (None: nothing)."""
        if self.mesh.devices.size > 1 or jax.process_count() > 1:
            return f"a {self.mesh.devices.size}-device mesh"
        return None if self.dtype == "float32" else f"{self.dtype} compute"


def load_teacher(
    spec: str | pathlib.Path,
    prompt: str | None = None,
    batch_size: int = 64,
    backend: str = "auto",
    max_length: int | None = None,
    sample: Sequence[str] = (),
    runtime: Runtime | None = None,
    document_prompt: str | None = None,
) -> Teacher:
    """Load a teacher; ``prompt`` is prefixed to every text, ``document_prompt`` to a pair
    dataset's documents instead (``Teacher.encode_as``).

    spec: a bundled name or a folder, with options (`parse_teacher_spec`): `:head=8192` runs
    that projection head (our port only), `:prompt_name=query` / `:prompt=TEXT` (and their
    `document_` twins) this teacher's own prompts instead of the arguments.
    backend: "jax" runs our Flax port of the folder (BERT / MPNet / Qwen2 / Qwen3 / Mistral
    sentence-transformers models, NV-Embed; the only choice on TPU); "torch" runs
    sentence-transformers (CPU); "auto" takes jax where the architecture is supported, else
    torch, and on a CPU-only machine with a ``sample`` of at least ``MIN_SAMPLE`` texts times
    both on it and keeps the faster, once per teacher and machine (``remembered_backend``).
    max_length: tokens each text is cut to; None keeps the folder's ``max_seq_length`` (long
    documents want the model's position limit, e.g. 512 for BERT/MPNet teachers).
    sample: texts like the ones to encode (a spread over the corpus), for ``auto``'s timing.
    runtime: mesh and compute dtype for our port (None: data parallel over local devices,
        float32); a mesh of several devices or bfloat16 means our port.
    """
    if backend not in BACKENDS:
        raise UserError(f"teacher backend {backend!r}: choose one of {BACKENDS}")
    parsed = parse_teacher_spec(str(spec))
    spec = parsed.source
    folder = resolve_model_folder(spec, what="teacher")
    prompt = teacher_prompt(parsed, folder, prompt)
    document_prompt = teacher_prompt(parsed, folder, document_prompt, DOCUMENT)
    model_fp, tokenizer_fp = folder_fingerprints(folder)
    key = f"{model_fp}:{tokenizer_fp}"
    port_only = (runtime.port_only() if runtime else None) or (
        f"head={parsed.head}" if parsed.head is not None else None
    )
    backend, timed = _first_backend(parsed, backend, key, sample, port_only)
    load_jax = lambda: _jax_encoder(folder, prompt, batch_size, max_length, parsed.head, runtime)
    encode, dim, count = (None, 0, None) if backend == "torch" else load_jax()
    ported = encode is not None
    if not ported:
        if backend == "jax":
            raise _not_ported(spec, port_only)
        encode, dim, count = _torch_encoder(spec, folder, prompt, batch_size, max_length)
    if backend == "auto" and ported and timed:
        load_torch = lambda: _torch_encoder(spec, folder, prompt, batch_size, max_length)
        encode, dim, count = _timed_choice(
            str(spec), key, (encode, dim, count), load_torch, sample, batch_size
        )
    name = str(spec) if str(spec) in KNOWN_TEACHERS else folder.name
    head = None if parsed.head is None else f"dense_{dim}"
    dtype = runtime.dtype if runtime and runtime.dtype != "float32" else None
    return Teacher(
        name, str(folder), dim, prompt, model_fp, tokenizer_fp, encode,
        max_length=max_length, count_truncated=count, head=head, compute_dtype=dtype,
        document_prompt=document_prompt,
    )  # fmt: skip


def _not_ported(spec: str, blocker: str | None) -> UserError:
    """The error for a folder whose architecture our port lacks, naming the ones it has."""
    return UserError(
        f"teacher {spec!r}: its architecture is not one jasper-jax implements "
        f"(model types {', '.join(sorted(ENCODER_CONFIGS))}); fix: use --backend torch "
        "(sentence-transformers)" + (f" without {blocker}" if blocker else "")
    )


def _timed_choice(spec: str, key: str, ours, load_torch, sample, batch_size: int):
    """`auto`'s (encode, dim, count): ours or sentence-transformers', whichever this machine
    timed faster on ``sample`` (measured once, then remembered under ``key``)."""
    sides = {"jax": ours}

    def measure() -> str:
        sides["torch"] = load_torch()
        return faster(spec, sides, list(sample), batch_size)

    choice = remembered_backend(key, spec, measure)
    return sides[choice] if choice in sides else load_torch()


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
    role: str = QUERY,
) -> np.ndarray:
    """Concatenated per-teacher unit vectors of ``texts`` with the prompts of ``role``.

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
                raw = teacher.encode_as(batch, role)
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


def count_truncated(
    texts: list[str],
    teachers: Sequence[Teacher],
    batch: int = 4096,
    runs: Sequence[tuple[int, int, str]] | None = None,
) -> dict:
    """{teacher name: texts it cuts at its token limit}, by tokenising only (teachers that cannot
    tell are left out). Such a text's vector describes its first tokens only. ``runs``: the
    (start, stop, role) ranges of ``texts`` and their roles' prompts (default: all queries)."""
    counts = {}
    runs = [(0, len(texts), QUERY)] if runs is None else runs
    for teacher in teachers:
        if teacher.count_truncated is None:
            continue
        n = sum(
            teacher.count_as(texts[i : min(i + batch, stop)], role)
            for start, stop, role in runs
            for i in range(start, stop, batch)
        )
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
