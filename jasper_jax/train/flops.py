"""Analytic model FLOPs of one train step of a text student: the numerator of MFU.

Convention (the usual MFU one, PaLM appendix B): only matrix multiplications count, 2 FLOPs per
multiply-add, over the real padded batch the step runs ([rows, length] tokens, padding
included: the hardware computes it). Counted: the encoder's weight matmuls (Q/K/V/O projections
with GQA's narrower K/V, BERT/MPNet MLP, Qwen2's gated MLP), the attention score and value
matmuls over the full length x length matrix (causal or not: the dense and blockwise paths
compute every block; the causal flash kernels skip the blocks above the diagonal, so there a
causal student's MFU is overstated by up to the attention share), late-chunking span pooling,
and every projection head. Left out: norms, softmax, activations, embedding lookups, the
optimiser, and the losses (the similarity losses are O(batch^2 x dim) per head: 0.4 GFLOP at
batch 128 x 12288 next to 1.8e14 (stage 1) to 5.3e14 (stage 3) for the 1.5B student at
128 x 512; the teacher side is precomputed).

Forward counts once. Backward counts, per weight matmul, the weight gradient (1x) where its
weight trains and the input gradient (1x) where any parameter earlier in the forward trains
(stage 1 trains only the heads: the frozen encoder runs forward only; stage 2's gradients stop at
the first trained layer); the attention core's backward (2x) where anything earlier trains.
Recomputation is not model work: remat and the gradient cache's second forward are left out,
so this figure does not change with `model.remat` or `train.gradcache_chunk` (XLA's cost
analysis, reported beside it, does: that is hardware FLOPs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

from jasper_jax.models.embedder import EmbedderConfig

Path = tuple[str, ...]
_MATMUL, _CORE, _PARAM = "matmul", "core", "param"  # op kinds (see `_Op`)


@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Model FLOPs of one step over the global batch (all chips together)."""

    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


@dataclasses.dataclass(frozen=True)
class _Op:
    """One step of the forward pass, in order.

    kind: "matmul" (has a weight: backward = dW where it trains + dX where anything earlier
    trains), "core" (attention or pooling, no weight: backward = 2x where anything earlier
    trains), "param" (a norm or embedding: no matmul FLOPs; where it trains, every later op
    passes input gradients back to it).
    flops: forward FLOPs over the whole batch. params: prefix of the op's parameter paths.
    sibling: reads the same input as the op before it (K and V beside Q, up beside gate,
    every head after the first), so that op's training does not reach back through it.
    """

    kind: str
    flops: float
    params: Path = ()
    sibling: bool = False


def _qwen2_layer(cfg: Any, prefix: Path, tokens: int, rows: int, length: int) -> list[_Op]:
    h, hd, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    attn, mlp = (*prefix, "self_attn"), (*prefix, "mlp")
    return [
        _Op(_PARAM, 0, (*prefix, "input_layernorm")),
        _Op(_MATMUL, 2.0 * tokens * h * heads * hd, (*attn, "q_proj")),
        _Op(_MATMUL, 2.0 * tokens * h * kv * hd, (*attn, "k_proj"), sibling=True),
        _Op(_MATMUL, 2.0 * tokens * h * kv * hd, (*attn, "v_proj"), sibling=True),
        _Op(_CORE, 4.0 * rows * length * length * heads * hd),
        _Op(_MATMUL, 2.0 * tokens * heads * hd * h, (*attn, "o_proj")),
        _Op(_PARAM, 0, (*prefix, "post_attention_layernorm")),
        _Op(_MATMUL, 2.0 * tokens * h * i, (*mlp, "gate_proj")),
        _Op(_MATMUL, 2.0 * tokens * h * i, (*mlp, "up_proj"), sibling=True),
        _Op(_MATMUL, 2.0 * tokens * i * h, (*mlp, "down_proj")),
    ]


def _bert_layer(cfg: Any, prefix: Path, tokens: int, rows: int, length: int) -> list[_Op]:
    """BERT (`attention/self/{query,key,value}`, `attention/output`) or MPNet
    (`attention/attn/{q,k,v,o}`, `attention/LayerNorm`) by `cfg.model_type`."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    proj = 2.0 * tokens * h * h
    if cfg.model_type == "mpnet":
        attn = (*prefix, "attention", "attn")
        qkv, out, norm = ("q", "k", "v"), (*attn, "o"), (*prefix, "attention", "LayerNorm")
    else:
        attn = (*prefix, "attention", "self")
        out = (*prefix, "attention", "output", "dense")
        qkv, norm = ("query", "key", "value"), (*prefix, "attention", "output", "LayerNorm")
    return [
        *(_Op(_MATMUL, proj, (*attn, name), sibling=n > 0) for n, name in enumerate(qkv)),
        _Op(_CORE, 4.0 * rows * length * length * h),
        _Op(_MATMUL, proj, out),
        _Op(_PARAM, 0, norm),
        _Op(_MATMUL, 2.0 * tokens * h * i, (*prefix, "intermediate", "dense")),
        _Op(_MATMUL, 2.0 * tokens * i * h, (*prefix, "output", "dense")),
        _Op(_PARAM, 0, (*prefix, "output", "LayerNorm")),
    ]


def encoder_ops(encoder: Any, rows: int, length: int) -> list[_Op] | None:
    """The encoder's forward ops in order over `rows` texts of `length` tokens, or None for
    an encoder this module does not count (NV-Embed's latent layer)."""
    tokens = rows * length
    if encoder.model_type in ("qwen2", "qwen3", "mistral"):
        first = [_Op(_PARAM, 0, ("encoder", "embed_tokens"))]
        layer, name, stack = _qwen2_layer, "layers_{}", ("encoder",)
        last = [_Op(_PARAM, 0, ("encoder", "norm"))]
    elif encoder.model_type in ("bert", "mpnet"):
        first = [_Op(_PARAM, 0, ("encoder", "embeddings"))]
        # MPNet's relative-position table feeds every layer's scores; counted as an input.
        first.append(_Op(_PARAM, 0, ("encoder", "encoder", "relative_attention_bias")))
        layer, name, stack = _bert_layer, "layer_{}", ("encoder", "encoder")
        last = []
    else:
        return None
    ops = list(first)
    for index in range(encoder.num_hidden_layers):
        ops += layer(encoder, (*stack, name.format(index)), tokens, rows, length)
    return ops + last


def _prefixes(paths: Collection[Path]) -> set[Path]:
    return {tuple(path[:n]) for path in paths for n in range(1, len(path) + 1)}


def train_step_flops(
    config: EmbedderConfig,
    trainable: Collection[Path],
    rows: int,
    length: int,
    chunks: int = 0,
) -> StepFlops | None:
    """Model FLOPs of one train step (see the module docstring for what counts).

    Args:
      config: the student.
      trainable: the trained parameter paths (`train.state.trainable_paths`).
      rows, length: the padded token batch the step encodes ([rows, length]; pair batches
        [n, m, length] are n * m rows), global over all devices.
      chunks: chunk spans per row in chunk mode (late chunking: span pooling and the heads on
        every chunk vector); 0 without.
    Returns:
      StepFlops over the global batch, or None for a student this module cannot count.
    """
    ops = encoder_ops(config.encoder, rows, length)
    if ops is None:
        return None
    hidden = config.hidden_size
    if chunks:
        ops.append(_Op(_CORE, 2.0 * rows * chunks * length * hidden))
    vectors = rows * (1 + chunks)  # the heads read every pooled (and chunk) vector
    for n, (name, dim) in enumerate(zip(config.head_names, config.heads, strict=True)):
        ops.append(_Op(_MATMUL, 2.0 * vectors * hidden * dim, ("heads", name), sibling=n > 0))
    return _forward_backward(ops, _prefixes(trainable))


def _forward_backward(ops: list[_Op], trains: set[Path]) -> StepFlops:
    forward = backward = 0.0
    upstream = False  # whether any parameter of the ops so far trains
    reaches = False  # whether one before the current op's input does
    for op in ops:
        reaches = reaches if op.sibling else upstream
        own = bool(op.params) and op.params in trains
        forward += op.flops
        if op.kind == _MATMUL:
            backward += op.flops * (own + reaches)
        elif op.kind == _CORE:
            backward += 2 * op.flops * reaches
        upstream = upstream or own
    return StepFlops(forward, backward)


def batch_flops(
    config: Any, trainable: Collection[Path], batch: Mapping[str, Any]
) -> StepFlops | None:
    """`train_step_flops` for a global batch as the loop holds it (arrays or shape structs):
    `input_ids` [rows, length] or [n, m, length], optional `chunk_spans` [rows, chunks, 2].
    None for a non-text task (stage 4's vision tower is not counted) or an unknown student."""
    if not isinstance(config, EmbedderConfig) or "input_ids" not in batch:
        return None
    shape = tuple(batch["input_ids"].shape)
    rows = 1
    for size in shape[:-1]:
        rows *= int(size)
    chunks = int(batch["chunk_spans"].shape[1]) if "chunk_spans" in batch else 0
    return train_step_flops(config, trainable, rows, int(shape[-1]), chunks)
