"""Run a jasper-jax model (exported folder or workdir) under the `mteb` benchmark.

`MtebEncoder` implements mteb's encoder interface on our JAX encoder: `encode(sentences, *,
task_name, prompt_type, **kwargs) -> np.ndarray [N, dim]` (mteb 1.x), and also the 2.x call
`encode(inputs, *, task_metadata, hf_split, hf_subset, prompt_type)` where `inputs` yields
batches `{"text": [...]}`. Prompts are chosen like mteb's sentence-transformers wrapper, first
match wins: "<task>-<query|passage>", "<task>", "<task type>-<query|passage>", "<task type>",
"<query|passage>" (with "document" accepted for "passage"). mteb itself is imported only by
`run_mteb`; install it with `pip install mteb` (it downloads the task datasets).

    python -m jasper_jax.evaluation.mteb_adapter --model OUT --tasks STSBenchmark,SciFact \
        --output results/mteb
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jasper_jax.encode import TextEncoder
from jasper_jax.errors import UserError
from jasper_jax.run_folder import load_any_model

PASSAGE_ALIASES = ("passage", "document")


def _prompt_type_name(prompt_type: Any) -> str | None:
    """mteb's PromptType enum (a str subclass), its value, or None -> "query"/"passage"/None."""
    if prompt_type is None:
        return None
    value = str(getattr(prompt_type, "value", prompt_type)).lower()
    return "passage" if value in PASSAGE_ALIASES else value


def _texts(inputs: Any) -> list[str]:
    """mteb 1.x passes a sequence of strings; 2.x a DataLoader of {"text": [...]} batches."""
    if isinstance(inputs, str):
        return [inputs]
    items = list(inputs)
    if items and isinstance(items[0], Mapping):
        return [str(t) for batch in items for t in batch["text"]]
    return [str(t) for t in items]


class MtebEncoder:
    """mteb encoder over a jasper-jax `TextEncoder`.

    Args:
      encoder: a `jasper_jax.encode.TextEncoder` (anything with `encode(texts, head, prompt)`).
      head: the output to evaluate (None: the model's default head).
      prompts: name -> prompt text (see module docstring); defaults to the model's own
        query/document prompts.
      model_name: reported to mteb in result folders.
    """

    def __init__(
        self,
        encoder: Any,
        *,
        head: str | None = None,
        prompts: Mapping[str, str] | None = None,
        model_name: str = "jasper-jax",
    ):
        self.encoder = encoder
        self.head = head
        own = dict(getattr(getattr(encoder, "model", None), "prompts", None) or {})
        if "document" in own and "passage" not in own:
            own["passage"] = own.pop("document")
        self.prompts = dict(prompts) if prompts is not None else own
        self.model_name = model_name

    @classmethod
    def from_path(cls, path: str | Path, *, head: str | None = None, **kwargs: Any) -> MtebEncoder:
        """An exported folder or a workdir (latest checkpoint)."""
        model = load_any_model(path)
        return cls(TextEncoder(model), head=head, model_name=Path(path).name, **kwargs)

    def select_prompt(
        self, task_name: str | None, prompt_type: Any = None, task_type: str | None = None
    ) -> str | None:
        """The prompt for one call, in mteb's order of precedence; None when nothing matches."""
        kind = _prompt_type_name(prompt_type)
        candidates = []
        for name in (task_name, task_type):
            if name:
                candidates += [f"{name}-{kind}"] if kind else []
                candidates.append(name)
        candidates += [kind] if kind else []
        for key in candidates:
            if key in self.prompts:
                return self.prompts[key] or None
        return None

    def encode(
        self,
        sentences: Any,
        *,
        task_name: str | None = None,
        prompt_type: Any = None,
        task_metadata: Any = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """sentences (strings, or mteb 2.x batches) -> [N, dim] float32 unit rows.

        kwargs mteb passes (batch_size, show_progress_bar, hf_split, hf_subset, ...) are
        accepted and ignored: batching is the encoder's own.
        """
        del kwargs
        task_type = None
        if task_metadata is not None:
            task_name = task_name or getattr(task_metadata, "name", None)
            task_type = getattr(task_metadata, "type", None)
        texts = _texts(sentences)
        prompt = self.select_prompt(task_name, prompt_type, task_type)
        if not texts:
            return np.zeros((0, 0), np.float32)
        return np.asarray(self.encoder.encode(texts, head=self.head, prompt=prompt), np.float32)

    def similarity(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity matrix [Na, Nb] (rows are already unit length)."""
        return np.asarray(a, np.float32) @ np.asarray(b, np.float32).T

    def similarity_pairwise(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Row-wise cosine [N]."""
        return np.sum(np.asarray(a, np.float32) * np.asarray(b, np.float32), axis=1)


def run_mteb(model: MtebEncoder, tasks: Sequence[str], output: str | Path) -> Any:
    """Runs mteb tasks by name (mteb 2.x `mteb.evaluate`, else 1.x `MTEB(...).run`)."""
    try:
        import mteb  # optional dependency: only this function needs it
    except ImportError as e:
        raise UserError("mteb is not installed; pip install mteb (it downloads the tasks)") from e
    selected = mteb.get_tasks(tasks=list(tasks))
    if hasattr(mteb, "evaluate"):
        return mteb.evaluate(model, selected)
    return mteb.MTEB(tasks=selected).run(model, output_folder=str(output))


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Evaluate a jasper-jax model on MTEB tasks")
    p.add_argument("--model", required=True, help="exported folder or training workdir")
    p.add_argument("--tasks", required=True, help="comma-separated mteb task names")
    p.add_argument("--head", default=None, help="'pooled', 'dense_<dim>' or '<dim>'")
    p.add_argument("--output", default="results/mteb")
    args = p.parse_args(list(argv) if argv is not None else None)
    try:
        encoder = MtebEncoder.from_path(args.model, head=args.head)
        run_mteb(encoder, [t for t in args.tasks.split(",") if t], args.output)
    except UserError as e:
        print(f"jasper-jax mteb: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
