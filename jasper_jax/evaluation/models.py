"""The models an evaluation compares: the student (exported folder or workdir) and its teachers.

Each exposes the same small surface: named outputs (a student's heads and pooled vector; a
teacher's one embedding), `encode(texts, prompt) -> {output: [N, dim] unit rows}` in one pass,
a default output, and parameter counts.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from jasper_jax.data.teachers import load_teacher
from jasper_jax.encode import TextEncoder, check_finite_model
from jasper_jax.errors import UserError
from jasper_jax.evaluation.teacher_cache import cached_encode
from jasper_jax.models.embedder import POOLED
from jasper_jax.models.loading import load_model
from jasper_jax.run_folder import is_workdir, load_workdir_model
from jasper_jax.vectors import unit_rows

TEACHER_OUTPUT = "embedding"


@dataclasses.dataclass
class EvalModel:
    """One model under evaluation.

    Attributes:
      name: label in tables; kind: "student" or "teacher".
      outputs: output names, the default first.
      encode_fn: (texts, prompt, outputs) -> {output: [N, dim] float32 unit rows}.
      parameters: {"total": n, ...} counts of float parameters (encoder + the default head).
      query_prompt: text prepended to retrieval queries.
      document_prompt: text prepended to documents and the fidelity texts (default none).
      timed_fn: what `texts_per_second` times, when `encode_fn` may read a cache (default:
        `encode_fn`).
    """

    name: str
    kind: str
    outputs: list[str]
    encode_fn: Callable[[Sequence[str], str | None, Sequence[str]], dict[str, np.ndarray]]
    parameters: dict[str, int]
    query_prompt: str | None = None
    source: str = ""
    timed_fn: Callable[[Sequence[str], str | None, Sequence[str]], dict] | None = None
    document_prompt: str | None = None

    @property
    def default_output(self) -> str:
        return self.outputs[0]

    def encode(
        self, texts: Sequence[str], prompt: str | None = None, outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """texts -> {output: [len(texts), dim] float32 unit rows} for `outputs` (default: all).

        Raises:
          UserError: some rows are NaN/inf (no score of such a model means anything).
        """
        encoded = self.encode_fn(list(texts), prompt, list(outputs or self.outputs))
        for output, rows in encoded.items():
            check_finite_rows(rows, f"{self.kind} {self.name} ({self.source}), output {output}")
        return encoded

    def texts_per_second(self, texts: Sequence[str]) -> float:
        """Throughput of the default output on `texts` (texts/s), after one warm-up pass that
        compiles (JAX) or allocates (torch)."""
        run = self.timed_fn or self.encode_fn
        run(list(texts), None, [self.default_output])
        start = time.perf_counter()
        run(list(texts), None, [self.default_output])
        return len(texts) / max(time.perf_counter() - start, 1e-9)


def check_finite_rows(rows: np.ndarray, model: str) -> None:
    """Refuses to score vectors holding NaN/inf, naming the model and what to try."""
    bad = ~np.isfinite(np.asarray(rows)).reshape(len(rows), -1).all(axis=1)
    if bad.any():
        raise UserError(
            f"{model} gives non-finite vectors (NaN/inf) for {int(bad.sum())} of {len(rows)} "
            f"texts (first: {int(np.argmax(bad))}); its checkpoint is likely corrupt: evaluate "
            "another checkpoint or model (nothing was scored)"
        )


def count_tree(tree: Any) -> int:
    """Number of scalars in a nested dict of arrays."""
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def folder_parameter_count(folder: Path) -> int:
    """Scalars in a folder's safetensors files (headers only; position-id buffers excluded)."""
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if not key.endswith("position_ids"):
                    total += int(np.prod(handle.get_slice(key).get_shape()))
    return total


def student_model(path: str | Path, name: str = "student", batch_size: int = 64) -> EvalModel:
    """A jasper-jax workdir (latest checkpoint) or an exported / HF folder we can run.

    Raises UserError for a path that is neither, naming what was looked for.
    """
    path = Path(path)
    if is_workdir(path):
        model = load_workdir_model(path)[0]
    elif (path / "config.json").is_file():
        model = load_model(path)
    else:
        raise UserError(
            f"--model {path} is neither a model folder (config.json, as written by `jasper-jax "
            "export` or Hugging Face) nor a jasper-jax workdir (model.json + checkpoints/); "
            "pass one of those"
        )
    check_finite_model(model.params, str(path))  # before teachers and texts are encoded
    encoder = TextEncoder(model, batch_size=batch_size)
    cfg = model.config
    default = cfg.default_head or (f"dense_{max(cfg.heads)}" if cfg.heads else POOLED)
    outputs = [default, *[h for h in (*cfg.head_names, POOLED) if h != default]]

    def encode(texts, prompt, wanted):
        return encoder.encode_heads(texts, heads=wanted, prompt=prompt)

    heads = model.params.get("heads", {})
    parameters = {
        "encoder": count_tree(model.params["encoder"]),
        **{h: count_tree(heads[h]) for h in heads},
    }
    parameters["total"] = parameters["encoder"] + parameters.get(default, 0)
    query, document = (model.prompts.get(role) or None for role in ("query", "document"))
    return EvalModel(
        name, "student", outputs, encode, parameters, query, str(path), document_prompt=document
    )


def teacher_model(spec: str, batch_size: int = 64, cache_dir: Path | None = None) -> EvalModel:
    """A teacher by bundled name or sentence-transformers folder (run as it is used to build the
    teacher vectors: our Flax port where supported, else sentence-transformers).

    cache_dir: where its encodings are kept between evaluations (`teacher_cache`); None: none.
    """
    teacher = load_teacher(spec, batch_size=batch_size)
    identity = {k: v for k, v in teacher.describe().items() if k != "folder"}  # content, not place

    def run(texts, prompt, wanted):
        del wanted  # a teacher has one output
        texts = [prompt + t for t in texts] if prompt else texts
        return {TEACHER_OUTPUT: unit_rows(teacher.encode(texts))}

    def encode(texts, prompt, wanted):
        rows = cached_encode(
            cache_dir, identity, prompt, texts, lambda t: run(t, prompt, wanted)[TEACHER_OUTPUT]
        )
        return {TEACHER_OUTPUT: rows}

    count = folder_parameter_count(Path(teacher.folder))
    return EvalModel(
        teacher.name,
        "teacher",
        [TEACHER_OUTPUT],
        encode,
        {"total": count},
        None,
        teacher.folder,
        timed_fn=run,
    )
