"""ONNX graphs of an export folder: token ids -> one head's L2-normalised vector, fp32 and int8.

    OUT/onnx/<head>.onnx        input_ids, attention_mask [batch, seq] int64 -> sentence_embedding
                                [batch, dim] float32 (encoder, pooling, [Normalize], Dense,
                                Normalize all inside the graph)
    OUT/onnx/<head>_int8.onnx   the same after onnxruntime dynamic int8 quantization
    OUT/onnx/onnx.json          heads, dims, pooling, max_seq_length, prompts, opset, int8 recipe

Generic ONNX exports of sentence-transformers models stop at the transformer's token states
(the Pooling / Dense / Normalize modules are left out), so a user of such a graph must rebuild
them; here they are part of the graph. The graph is traced from the folder just written (loaded
with transformers, the same weights sentence-transformers reads) by `torch.onnx.export`'s
default torch.export-based (dynamo) exporter, with dynamic batch and sequence axes.

Int8: weights of the encoder's MatMuls are quantized per output channel to signed 7-bit range
(`reduce_range`); activations are quantized per batch at run time. Plain 8-bit u8s8 products
can saturate the 16-bit intermediate sums of x86 kernels without VNNI (vpmaddubsw), which gives
wrapped or zero vectors on some CPUs; 7-bit weights cannot saturate. The embedding lookups
(Gather), the feed-forward output projections (their input has outliers) and the output head
stay fp32 (`fp32_nodes`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jasper_jax.encode import resolve_head
from jasper_jax.errors import UserError
from jasper_jax.models.embedder import POOLED
from jasper_jax.models.loading import LoadedModel

log = logging.getLogger(__name__)

ONNX_DIR = "onnx"
ONNX_META = "onnx.json"
OPSET = 18
INT8_SETTINGS: dict[str, Any] = {
    "method": "onnxruntime.quantization.quantize_dynamic",
    "weight_type": "QInt8",
    "per_channel": True,
    "reduce_range": True,
    "op_types_to_quantize": ["MatMul"],
    "fp32_kept": "embedding lookups, attention score products, each layer's feed-forward "
    "output projection, the output head (Dense)",
}
_EXTRA = "pip install 'jasper-jax[onnx]'"


def check_onnx_packages(what: str, export: bool = True) -> None:
    """Refuses early when a package of the onnx extra is missing: onnxruntime (to run), and to
    export also torch, onnx and onnxscript (torch.onnx's exporter)."""
    missing = []
    for name in ("torch", "onnx", "onnxscript", "onnxruntime") if export else ("onnxruntime",):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"{what} needs {', '.join(missing)}; install them with `{_EXTRA}`")


def resolve_onnx_heads(
    model: LoadedModel, requested: Sequence[str], default_head: str
) -> list[str]:
    """`--onnx [HEAD ...]` -> head names (no names: the export's default head); an unknown head
    raises UserError before anything is written."""
    names = []
    for h in requested:
        try:
            names.append(resolve_head(model.config, h))
        except UserError:
            available = [POOLED, *model.config.head_names]
            raise UserError(
                f"--onnx {h!r}: this model has no such head; choose from {available} (or give "
                "no HEAD for the default head)"
            ) from None
    return list(dict.fromkeys(names or [default_head]))


def graph_file(head: str, int8: bool) -> str:
    return f"{head}_int8.onnx" if int8 else f"{head}.onnx"


def head_module(folder: Path, head: str, pooling: str, normalize_pooled: bool):
    """The torch module of one head: (input_ids, attention_mask) [B, L] -> [B, dim] unit rows.

    Encoder from `folder` (transformers, eager attention: a plain graph every runtime reads),
    our pooling, the Normalize the heads read when `normalize_pooled`, the head's Dense
    (`2_Dense_<dim>`, torch Linear layout), and the final L2 normalisation.
    """
    import torch
    import transformers
    from safetensors.torch import load_file

    encoder = transformers.AutoModel.from_pretrained(
        str(folder), attn_implementation="eager", dtype=torch.float32
    ).eval()
    dense = None
    if head != POOLED:
        state = load_file(str(folder / f"2_Dense_{head.removeprefix('dense_')}/model.safetensors"))
        out_dim, in_dim = state["linear.weight"].shape
        dense = torch.nn.Linear(in_dim, out_dim)
        dense.load_state_dict({"weight": state["linear.weight"], "bias": state["linear.bias"]})

    class HeadGraph(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = encoder
            self.head = dense

        def forward(self, input_ids, attention_mask):
            hidden = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [B, L, 1]
            if pooling == "mean":
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            elif pooling == "cls":
                pooled = hidden[:, 0]
            else:  # last: each row's last real token (right padding)
                last = (attention_mask.sum(1) - 1).clamp(min=0)
                pooled = hidden[torch.arange(hidden.shape[0]), last]
            if self.head is not None:
                if normalize_pooled:
                    pooled = torch.nn.functional.normalize(pooled, dim=-1, eps=1e-12)
                pooled = self.head(pooled)
            return torch.nn.functional.normalize(pooled, dim=-1, eps=1e-12)

    return HeadGraph().eval()


def export_graph(module: Any, path: Path) -> None:
    """Traces `module` to `path` with dynamic batch and sequence axes (torch.export-based)."""
    import torch

    ids = torch.ones((2, 8), dtype=torch.int64)
    mask = torch.ones((2, 8), dtype=torch.int64)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    axes = {0: batch, 1: seq}
    with torch.no_grad():
        program = torch.onnx.export(
            module,
            (ids, mask),
            dynamo=True,
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            dynamic_shapes={"input_ids": axes, "attention_mask": axes},
            opset_version=OPSET,
            external_data=False,
        )
    program.save(str(path), external_data=False)


def fp32_nodes(path: Path, intermediate_size: int) -> list[str]:
    """Names of the nodes int8 leaves in fp32: the output head (reads `head.*` weights) and
    each layer's feed-forward output projection (weight [intermediate, hidden]).

    The projection reads GELU/SwiGLU activations whose few large outliers set the scale of the
    per-tensor dynamic quantization of its input, crushing every other value: quantizing it
    cost the demo's stage-3 student most of its int8 error (min cosine to fp32 0.972 -> 0.987
    with it kept fp32, over 2,000 held-out texts).
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    head = {i.name for i in model.graph.initializer if i.name.startswith("head.")}
    ffn_out = {
        i.name
        for i in model.graph.initializer
        if len(i.dims) == 2 and i.dims[0] == intermediate_size and i.dims[0] != i.dims[1]
    }
    nodes = [n.name for n in model.graph.node if head & set(n.input)]
    # The quantizer first splits a Gemm into `<name>_MatMul` + Add: exclude that name too.
    nodes += [f"{name}_MatMul" for name in nodes]
    return nodes + [
        n.name for n in model.graph.node if n.op_type == "MatMul" and ffn_out & set(n.input)
    ]


def quantize_int8(fp32: Path, int8: Path, intermediate_size: int) -> None:
    """Dynamic int8 quantization of `fp32` into `int8` with INT8_SETTINGS."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32),
        str(int8),
        weight_type=QuantType.QInt8,
        per_channel=INT8_SETTINGS["per_channel"],
        reduce_range=INT8_SETTINGS["reduce_range"],
        op_types_to_quantize=INT8_SETTINGS["op_types_to_quantize"],
        nodes_to_exclude=fp32_nodes(fp32, intermediate_size),
        extra_options={"MatMulConstBOnly": True},
    )


def write_onnx(folder: Path, model: LoadedModel, heads: Sequence[str], summary: dict) -> list[str]:
    """Writes `folder/onnx/` (fp32 + int8 graph per head, and onnx.json) for the export folder
    `folder` (already holding the encoder, heads and tokenizer); returns the heads written."""
    out = folder / ONNX_DIR
    out.mkdir()
    cfg = model.config
    records = {}
    for head in heads:
        module = head_module(folder, head, cfg.pooling, cfg.normalize_pooled)
        export_graph(module, out / graph_file(head, False))
        intermediate = int(cfg.encoder.intermediate_size)
        quantize_int8(out / graph_file(head, False), out / graph_file(head, True), intermediate)
        dim = cfg.hidden_size if head == POOLED else int(head.removeprefix("dense_"))
        records[head] = {
            "dim": dim,
            "fp32": graph_file(head, False),
            "int8": graph_file(head, True),
        }
        log.info("wrote ONNX graphs of head %s (%d-d) to %s", head, dim, out)
    st = json.loads((folder / "config_sentence_transformers.json").read_text(encoding="utf-8"))
    bert = json.loads((folder / "sentence_bert_config.json").read_text(encoding="utf-8"))
    meta = {
        "format": 1,
        "heads": records,
        "default_head": heads[0],
        "pooling": cfg.pooling,
        "normalize_pooled": cfg.normalize_pooled,
        "max_seq_length": bert["max_seq_length"],
        "max_position_embeddings": getattr(cfg.encoder, "max_position_embeddings", None),
        "prompts": st["prompts"],
        "default_prompt_name": st.get("default_prompt_name"),
        "text_suffix": model.text_suffix,
        "inputs": {"input_ids": "int64 [batch, seq]", "attention_mask": "int64 [batch, seq]"},
        "output": "sentence_embedding: float32 [batch, dim], L2-normalised",
        "opset": OPSET,
        "int8": INT8_SETTINGS,
        "default_export_head": summary.get("default_head"),
    }
    (out / ONNX_META).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    return list(records)
