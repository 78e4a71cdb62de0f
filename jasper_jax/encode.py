"""Batch text encoding with a loaded model: tokenise, bucket by length, run sharded, unsort.

Texts are sorted by token count and padded to a few bucket lengths (`bucket_length`) so a whole
corpus compiles a handful of programs; every batch has the same row count (short batches are
padded with empty rows), sharded over the mesh's (data, fsdp) axes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jasper_jax import sharding
from jasper_jax.errors import UserError
from jasper_jax.models.attention import AttentionSettings
from jasper_jax.models.embedder import POOLED, Embedder, EmbedderConfig, abstract_params
from jasper_jax.models.loading import LoadedModel, first_non_finite
from jasper_jax.models.nvembed import instruction_length
from jasper_jax.tokenizer import Tokenizer, load_tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_finite(vectors: np.ndarray, what: str, line_of: str | None = None) -> None:
    """Refuses output rows holding NaN/inf, before anything is written.

    Args:
      vectors: [N, dim] rows.
      what: names them in the message ("vectors", "chunk vectors").
      line_of: the input file whose line i+1 gave row i, to name the first bad line.
    Raises:
      UserError: how many rows, the first one, and the likely cause with its fix.
    """
    bad = ~np.isfinite(vectors).reshape(len(vectors), -1).all(axis=1)
    if not bad.any():
        return
    first = int(np.argmax(bad))
    where = f"row {first}" + (f", line {first + 1} of {line_of}" if line_of else "")
    raise UserError(
        f"{int(bad.sum())} of {len(vectors)} {what} are not finite (NaN/inf; first: {where}); "
        "likely a corrupt checkpoint, or an overflow in bfloat16 (try --dtype float32); "
        "nothing was written"
    )


def check_finite_model(params: Any, model: str) -> None:
    """Refuses weights holding NaN/inf, which give NaN for every input (fails before compute)."""
    bad = first_non_finite(params)
    if bad is not None:
        raise UserError(
            f"model {model} holds NaN/inf in parameter {bad} (a corrupt checkpoint or a "
            "diverged run); use another checkpoint or model (nothing was written)"
        )


def bucket_length(n: int, max_length: int, granularity: int = 8) -> int:
    """The padded length of a batch whose longest row has `n` tokens, capped at `max_length`.

    Multiples of `granularity` up to 8 x granularity tokens, then four steps per doubling
    (80, 96, 112, 128, 160, ...): a row is padded by under a quarter of its length, and a corpus
    up to 512 tokens compiles at most 20 programs. (Powers of two wasted 40% of the work on
    short texts: a 17-token batch ran at 32.)
    """
    step = granularity
    while step * 8 < n:
        step *= 2
    return min(-(-n // step) * step, max_length)


def resolve_head(config: EmbedderConfig, head: str | None) -> str:
    """Maps a user's `--head` (None, "pooled", "dense_256" or "256") to an output name."""
    if head is None:
        return config.default_head or POOLED
    if head.isdigit():
        head = f"dense_{head}"
    if head not in (POOLED, *config.head_names):
        raise UserError(
            f"--head {head!r} does not exist in this model; available: "
            f"{[POOLED, *config.head_names]}"
        )
    return head


class TextEncoder:
    """Encodes texts into L2-normalised float32 vectors with one loaded model.

    Args:
      model: from `jasper_jax.models.loading.load_model`.
      dtype: compute dtype, "float32" or "bfloat16" (parameters stay float32).
      mesh: device mesh; defaults to data parallelism over all devices.
      batch_size: rows per step, rounded up to a multiple of the mesh's batch axes.
      tokenizer: None: the model folder's (`jasper_jax.tokenizer.load_tokenizer`).
      attention: the encoder's attention implementation (e.g. blockwise for long texts in
        bounded memory); None: the default ("auto").
      sharded_weights: lay the weights out by `sharding.INFERENCE_AXIS_RULES` (over every
        device, for teachers too big for one) instead of the training rules; with a bfloat16
        `dtype` the weights are then also stored in bfloat16 (half the memory).
    """

    def __init__(
        self,
        model: LoadedModel,
        *,
        dtype: str = "float32",
        mesh: jax.sharding.Mesh | None = None,
        batch_size: int = 64,
        tokenizer: Tokenizer | None = None,
        attention: AttentionSettings | None = None,
        sharded_weights: bool = False,
    ):
        if dtype not in DTYPES:
            raise UserError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
        self.model = model
        self.mesh = mesh or sharding.make_mesh((-1, 1, 1))
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.batch_size = -(-batch_size // shards) * shards
        self.module = Embedder(
            model.config, dtype=DTYPES[dtype], attention=attention or AttentionSettings()
        )
        self.text_tokenizer = tokenizer or load_tokenizer(model.folder)
        abstract = abstract_params(model.config)
        shardings = sharding.param_shardings(abstract, self.mesh, inference=sharded_weights)
        stored = DTYPES[dtype] if sharded_weights and dtype != "float32" else None
        self.params = sharding.place(model.params, shardings, stored)
        self._in_sharding = sharding.batch_sharding(self.mesh, 2)
        self._fns: dict[str, Any] = {}
        self.last_truncated = 0  # texts the last encode() cut at max_length

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer of the model (imported on first use: offsets for chunks)."""
        return self.text_tokenizer.hf

    def _fn(self, heads: tuple[str, ...]):
        if heads not in self._fns:

            def run(params, ids, mask, pool_from):
                with sharding.mesh_context(self.mesh):  # flash shard_map, activation constraints
                    return self.module.apply(
                        {"params": params}, ids, mask, heads=heads, pool_from=pool_from
                    )

            # Replicated outputs: every process (multi-host eval) can read the whole batch.
            self._fns[heads] = jax.jit(run, out_shardings=sharding.replicated(self.mesh))
        return self._fns[heads]

    def encode(self, texts: Sequence[str], *, head: str | None = None, **kwargs) -> np.ndarray:
        """texts -> [len(texts), dim] float32 unit vectors, row i for text i.

        kwargs: prompt, max_length, progress (see `encode_heads`).
        """
        head = resolve_head(self.model.config, head)
        return self.encode_heads(texts, heads=(head,), **kwargs)[head]

    def encode_heads(
        self,
        texts: Sequence[str],
        *,
        heads: Sequence[str],
        prompt: str | None = None,
        max_length: int | None = None,
        progress: bool = False,
    ) -> dict[str, np.ndarray]:
        """texts -> {head: [len(texts), dim] float32 unit vectors}, one encoder pass per batch."""
        heads = tuple(resolve_head(self.model.config, h) for h in heads)
        max_length = self.token_limit(max_length)
        tok = self.text_tokenizer.tokenize(self._suffixed(texts), max_length, prompt)
        self.last_truncated = tok.truncated
        pool_from = np.int32(self._prompt_positions(prompt))
        order = np.argsort([len(x) for x in tok.ids], kind="stable")
        out: dict[str, np.ndarray] = {}
        bar = tqdm(total=len(texts), unit="text", disable=not progress, desc="encode")
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            ids, mask = self.pad([tok.ids[i] for i in rows], max_length)
            for name, vecs in self._fn(heads)(self.params, ids, mask, pool_from).items():
                vecs = np.asarray(vecs)[: len(rows)]
                out.setdefault(name, np.zeros((len(texts), vecs.shape[-1]), np.float32))[rows] = (
                    vecs
                )
            bar.update(len(rows))
        bar.close()
        return out

    def token_limit(self, max_length: int | None = None) -> int:
        """Tokens a text is cut to: `max_length` (default: the model's max_seq_length), never
        beyond the position embeddings."""
        return min(max_length or self.model.max_seq_length, position_limit(self.model))

    def count_truncated(
        self, texts: Sequence[str], prompt: str | None = None, max_length: int | None = None
    ) -> int:
        """How many of `texts` an `encode` with these arguments would cut (tokenising only)."""
        limit = self.token_limit(max_length)
        return self.text_tokenizer.tokenize(self._suffixed(texts), limit, prompt).truncated

    def _suffixed(self, texts: Sequence[str]) -> Sequence[str]:
        """texts with the model's `text_suffix` (NV-Embed: its EOS) appended."""
        suffix = self.model.text_suffix
        return [t + suffix for t in texts] if suffix else texts

    def _prompt_positions(self, prompt: str | None) -> int:
        """Leading positions the mean leaves out: NV-Embed's instruction count for a model that
        pools without its prompt (`LoadedModel.pool_prompt`), else 0."""
        if not prompt or self.model.pool_prompt:
            return 0
        return instruction_length(self.text_tokenizer, prompt)

    def pad(self, rows: list[list[int]], max_length: int) -> tuple[jax.Array, jax.Array]:
        """Token id rows -> (ids, mask) int32 [batch_size, bucket length], sharded over the
        mesh's batch axes; rows past `len(rows)` are empty padding."""
        length = bucket_length(max(len(r) for r in rows), max_length)
        pad_id = self.text_tokenizer.pad_token_id or 0
        ids = np.full((self.batch_size, length), pad_id, np.int32)
        mask = np.zeros((self.batch_size, length), np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1

        # Every process holds the same full batch; each places the rows of its own devices.
        def put(x: np.ndarray) -> jax.Array:
            return jax.make_array_from_callback(x.shape, self._in_sharding, lambda i: x[i])

        return put(ids), put(mask)


def position_limit(model: LoadedModel) -> int:
    """Tokens the encoder's position embeddings reach (2**30 when the config names no limit)."""
    return getattr(model.config.encoder, "max_position_embeddings", 1 << 30)
