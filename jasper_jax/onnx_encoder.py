"""Encoding with an export's ONNX graphs (`jasper-jax export --onnx`) on onnxruntime.

Texts are tokenised exactly as `jasper_jax.encode.TextEncoder` does (the export folder's
tokenizer, the prompt prepended, cut to max_seq_length keeping the special tokens); the graph
does the rest (encoder, pooling, head, normalisation), so no JAX, torch or transformers runs.

    enc = OnnxEncoder("runs/demo/export", int8=True)
    vectors = enc.encode(texts, prompt=enc.prompts["query"])   # [N, dim] float32 unit rows
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jasper_jax.errors import UserError
from jasper_jax.export.onnx_graph import ONNX_DIR, ONNX_META, check_onnx_packages
from jasper_jax.tokenizer import load_tokenizer


def read_onnx_meta(folder: str | Path) -> dict[str, Any]:
    """`folder/onnx/onnx.json` of an export made with `--onnx`.

    Raises:
      UserError: the folder holds no ONNX graphs (with the command that writes them).
    """
    path = Path(folder) / ONNX_DIR / ONNX_META
    if not path.is_file():
        raise UserError(
            f"{folder} holds no ONNX graphs ({ONNX_DIR}/{ONNX_META} is missing); export them "
            "with `jasper-jax export --workdir WORKDIR --output FOLDER --onnx [HEAD ...]`"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def onnx_head(meta: dict[str, Any], head: str | None) -> str:
    """`--head` (None, "pooled", "dense_<dim>" or "<dim>") -> a head with ONNX graphs."""
    if head is None:
        return meta["default_head"]
    name = f"dense_{head}" if head.isdigit() else head
    if name not in meta["heads"]:
        raise UserError(
            f"--head {head!r} has no ONNX graph in this export; exported: "
            f"{sorted(meta['heads'])} (re-export with `--onnx {name}` to add it)"
        )
    return name


class OnnxEncoder:
    """Encodes texts with one head's ONNX graph (fp32 or int8) of an export folder.

    Args:
      folder: an export folder holding `onnx/onnx.json`.
      head: None (the first head exported), "pooled", "dense_<dim>" or "<dim>".
      int8: run the dynamically quantized graph.
      batch_size: texts per run; texts are sorted by length so a batch pads little.
      threads: onnxruntime intra-op threads (0: onnxruntime's default, one per core).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        head: str | None = None,
        int8: bool = False,
        batch_size: int = 64,
        threads: int = 0,
    ):
        check_onnx_packages("--backend onnx", export=False)
        import onnxruntime as ort

        self.folder = Path(folder)
        self.meta = read_onnx_meta(folder)
        self.head = onnx_head(self.meta, head)
        record = self.meta["heads"][self.head]
        self.dim = int(record["dim"])
        self.path = self.folder / ONNX_DIR / record["int8" if int8 else "fp32"]
        self.batch_size = batch_size
        self.prompts: dict[str, str] = self.meta.get("prompts") or {}
        self.default_prompt_name: str | None = self.meta.get("default_prompt_name")
        self.text_tokenizer = load_tokenizer(self.folder)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )
        self.last_truncated = 0

    def token_limit(self, max_length: int | None = None) -> int:
        """Tokens a text is cut to (as TextEncoder.token_limit): `max_length` or the folder's
        max_seq_length, never beyond the position embeddings."""
        limit = max_length or int(self.meta["max_seq_length"])
        positions = self.meta.get("max_position_embeddings")
        return min(limit, int(positions)) if positions else limit

    def encode(
        self,
        texts: Sequence[str],
        *,
        prompt: str | None = None,
        max_length: int | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """texts -> [len(texts), dim] float32 unit vectors, row i for text i."""
        suffix = self.meta.get("text_suffix") or ""
        texts = [t + suffix for t in texts] if suffix else texts
        tok = self.text_tokenizer.tokenize(texts, self.token_limit(max_length), prompt)
        self.last_truncated = tok.truncated
        order = np.argsort([len(x) for x in tok.ids], kind="stable")
        out = np.zeros((len(texts), self.dim), np.float32)
        pad_id = self.text_tokenizer.pad_token_id or 0
        bar = tqdm(total=len(texts), unit="text", disable=not progress, desc="encode")
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            ids, mask = pad_rows([tok.ids[i] for i in rows], pad_id)
            (vectors,) = self.session.run(None, {"input_ids": ids, "attention_mask": mask})
            out[rows] = vectors
            bar.update(len(rows))
        bar.close()
        return out


def pad_rows(rows: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id rows -> (ids, mask) int64 [len(rows), longest row], right-padded."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask
