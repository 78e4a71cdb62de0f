"""The train step: a pure function `(state, batch) -> (state, metrics)`, jitted once.

A step whose loss or gradients are not finite changes nothing but the counters: parameters and
optimiser state keep their previous values, `skipped` and `bad_in_row` go up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jasper_jax import sharding
from jasper_jax.chunk_loss import chunk_alignment_loss
from jasper_jax.losses import LossConfig, distillation_loss
from jasper_jax.losses.pair_loss import LOG_TEMPERATURE, PAIRS, pair_loss
from jasper_jax.models.embedder import Embedder
from jasper_jax.settings import LossSettings
from jasper_jax.train.state import Path, TrainState, merge_params, split_params

LOSS_PARAMS = "loss"  # top-level params of the objective itself (a learned temperature)
# forward(params, batch, rng) -> (student vectors per head, teacher target(s))
Forward = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[dict, Any]]


def text_forward(
    model: Embedder, head_names: tuple[str, ...], dropout: bool, chunks: bool = False
) -> Forward:
    """Student head vectors for a text batch against the batch's concatenated teacher vectors.

    With `chunks` (chunk alignment) the batch also holds `chunk_spans`, `chunk_mask` and
    `chunk_teacher`, and both sides become {"document": ..., "chunks": ...} trees (see
    `jasper_jax.chunk_loss.chunk_alignment_loss`).
    """

    def forward(params, batch, rng):
        out = model.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            heads=head_names,
            deterministic=not dropout,
            rngs={"dropout": rng},
            chunk_spans=batch["chunk_spans"] if chunks else None,
        )
        if not chunks:
            return out, batch["teacher"]
        document, chunk_vectors = out
        teacher = {
            "document": batch["teacher"],
            "chunks": batch["chunk_teacher"],
            "chunk_mask": batch["chunk_mask"],
        }
        return {"document": document, "chunks": chunk_vectors}, teacher

    return forward


def pair_forward(
    model: Embedder, head_names: tuple[str, ...], dropout: bool, learn_temperature: bool
) -> Forward:
    """Student head vectors of a pair batch ([n, m, L] tokens: query, positive, negatives),
    encoded as n * m texts, as {"pairs": {head: [n, m, d]}} against the [n, m, D] teachers;
    with `learn_temperature` also {"log_temperature": [n]} (copies of the scalar parameter
    `params["loss"]["log_temperature"]`, see `jasper_jax.losses.pair_loss`)."""

    def forward(params, batch, rng):
        n, m, length = batch["input_ids"].shape
        out = model.apply(
            {"params": {k: v for k, v in params.items() if k != LOSS_PARAMS}},
            batch["input_ids"].reshape(n * m, length),
            batch["attention_mask"].reshape(n * m, length),
            heads=head_names,
            deterministic=not dropout,
            rngs={"dropout": rng},
        )
        student = {PAIRS: {h: x.reshape(n, m, x.shape[-1]) for h, x in out.items()}}
        if learn_temperature:
            log_t = params[LOSS_PARAMS][LOG_TEMPERATURE]
            student[LOG_TEMPERATURE] = jnp.broadcast_to(log_t.astype(jnp.float32), (n,))
        return student, batch["teacher"]

    return forward


def loss_config(w: LossSettings) -> LossConfig:
    """The distillation loss's weights and knobs from the `loss` settings."""
    return LossConfig(
        cosine_weight=w.cosine,
        similarity_weight=w.similarity,
        resim_weight=w.relative_similarity,
        margin=w.margin,
        mrl_dims=tuple(w.mrl_dims) or None,
        infonce_weight=w.infonce,
        infonce_temperature=w.infonce_temperature,
        infonce_symmetric=w.infonce_symmetric,
        temperature_range=(w.min_temperature, w.max_temperature) if w.learn_temperature else None,
        gor_weight=w.gor,
        block_size=w.resim_block_size or None,
    )


def chunk_loss_config(w: LossSettings) -> LossConfig:
    """Weights of the chunk-alignment term (chunk mode: `data.max_chunks` > 0)."""
    return LossConfig(
        cosine_weight=w.chunk_cosine,
        similarity_weight=w.chunk_similarity,
        resim_weight=w.chunk_relative_similarity,
        margin=w.margin,
        block_size=w.resim_block_size or None,
    )


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _pairs(student: dict, teacher: Any) -> tuple[jax.Array, jax.Array] | None:
    """InfoNCE pairs where the batch has one target per head (stage 4: image vs its caption):
    the first (full) head's vectors against its targets; None for a shared teacher (text)."""
    if not isinstance(teacher, Mapping):
        return None
    head = next(iter(student))
    return student[head], teacher[head]


def in_batch_loss(
    loss_config: LossConfig, groups: int = 1, chunk_config: LossConfig | None = None
) -> Callable[[dict, Any], tuple]:
    """`(student heads, teacher) -> (loss, metrics)` over the global batch (`groups=1`) or as the
    mean of `groups` independent losses over consecutive row blocks: with the batch sharded over
    `groups` data-parallel devices, each block is one device's rows, which is what the authors'
    reference computes (per-GPU in-batch similarities, gradients averaged). A `chunk_config`
    adds the chunk-alignment term (outputs of `text_forward(..., chunks=True)`)."""

    def loss_of(student: dict, teacher: Any):
        if chunk_config is not None:
            return chunk_alignment_loss(student, teacher, loss_config, chunk_config)
        if PAIRS in student:
            return pair_loss(student, teacher, loss_config)
        return distillation_loss(student, teacher, loss_config, pairs=_pairs(student, teacher))

    def loss_fn(student: dict, teacher: Any):
        if groups == 1:
            return loss_of(student, teacher)
        split = lambda x: x.reshape(groups, x.shape[0] // groups, *x.shape[1:])
        losses, metrics = jax.vmap(loss_of)(
            jax.tree.map(split, student), jax.tree.map(split, teacher)
        )
        return jnp.mean(losses), jax.tree.map(jnp.mean, metrics)

    return loss_fn


def _to_chunks(tree: Any, n: int) -> Any:
    """[B, ...] -> [n, B/n, ...] with chunk k = rows k, k+n, k+2n, ...: every chunk keeps rows on
    every data-parallel device, so chunked encoding stays parallel."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(-1, n, *x.shape[1:]), 0, 1), tree)


def _from_chunks(tree: Any) -> Any:
    """Inverse of `_to_chunks`: [n, B/n, ...] -> [B, ...] in the original row order."""
    return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), tree)


def gradcache_value_and_grad(
    forward: Forward, loss_fn, trainable: Any, frozen: Any, batch: Mapping, rng, chunks: int
) -> tuple[tuple[jax.Array, dict], Any]:
    """Loss and gradients of the whole batch, holding activations of one chunk at a time.

    1. encode the batch chunk by chunk without keeping activations (a scan, not differentiated);
    2. the loss and its gradient with respect to the vectors, on the whole batch;
    3. re-encode each chunk and pull that chunk's vector gradient back to the parameters.
    Equal to `jax.value_and_grad` of the plain step when dropout is off; with dropout each chunk
    draws its own masks (the same in 1 and 3), a different but equally valid sample.
    """

    def encode(params, chunk, k):
        return forward(merge_params(params, frozen), chunk, jax.random.fold_in(rng, k))

    pieces = _to_chunks(dict(batch), chunks)
    ks = jnp.arange(chunks)
    _, (student, teacher) = jax.lax.scan(
        lambda carry, xs: (carry, encode(trainable, *xs)), None, (pieces, ks)
    )
    student, teacher = _from_chunks(student), _from_chunks(teacher)
    (loss, metrics), d_student = jax.value_and_grad(loss_fn, has_aux=True)(student, teacher)

    def pull_back(total, xs):
        chunk, k, d_chunk = xs
        _, vjp = jax.vjp(lambda p: encode(p, chunk, k)[0], trainable)
        return jax.tree.map(jnp.add, total, vjp(d_chunk)[0]), None

    zeros = jax.tree.map(jnp.zeros_like, trainable)
    grads, _ = jax.lax.scan(pull_back, zeros, (pieces, ks, _to_chunks(d_student, chunks)))
    return (loss, metrics), grads


def make_train_step(
    forward: Forward,
    loss_config: LossConfig,
    tx: optax.GradientTransformation,
    paths: frozenset[Path],
    schedule: optax.Schedule,
    *,
    loss_groups: int = 1,
    gradcache_chunks: int = 1,
    chunk_config: LossConfig | None = None,
    mesh: Mesh | None = None,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """Builds the pure step; `paths` are the trainable parameters (see `state.trainable_paths`).

    loss_groups: 1 computes the in-batch losses over the global batch; G > 1 averages G
      per-block losses (see `in_batch_loss`).
    gradcache_chunks: > 1 encodes the batch in that many chunks (see `gradcache_value_and_grad`).
    chunk_config: chunk-alignment weights, for a chunk-mode forward (see `in_batch_loss`).
    mesh: the step's mesh, ambient while it is traced (`sharding.mesh_context`) for the flash
      kernels' shard_map and the activation constraints; None: neither (auto attention then
      stays off the kernels on a host of several devices).
    """
    loss_of = in_batch_loss(loss_config, loss_groups, chunk_config)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        trainable, frozen = split_params(state.params, paths)

        if gradcache_chunks > 1:
            (loss, metrics), grads = gradcache_value_and_grad(
                forward, loss_of, trainable, frozen, batch, rng, gradcache_chunks
            )
        else:

            def loss_fn(trainable):
                return loss_of(*forward(merge_params(trainable, frozen), batch, rng))

            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, state.opt_state, trainable)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        keep = lambda new, old: jnp.where(finite, new, old)
        trainable = jax.tree.map(keep, optax.apply_updates(trainable, updates), trainable)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        bad = (~finite).astype(jnp.int32)
        new_state = state.replace(
            step=state.step + 1,
            params=merge_params(trainable, frozen),
            opt_state=opt_state,
            skipped=state.skipped + bad,
            bad_in_row=(state.bad_in_row + 1) * bad,
        )
        extra = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
        return new_state, _step_metrics({**metrics, **extra}, new_state, batch)

    return _under_mesh(train_step, mesh)


def _step_metrics(metrics: dict, new_state: TrainState, batch: Mapping) -> dict:
    """The loss terms plus the skip counters and, for token batches, the real tokens."""
    metrics = {**metrics, "skipped": new_state.skipped, "bad_in_row": new_state.bad_in_row}
    if "attention_mask" in batch:
        metrics["tokens"] = jnp.sum(batch["attention_mask"]).astype(jnp.float32)
    return metrics


def _under_mesh(fn: Callable, mesh: Mesh | None) -> Callable:
    """`fn` traced with `mesh` as the ambient mesh (unchanged for None)."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def wrapped(*args):
        with sharding.mesh_context(mesh):
            return fn(*args)

    return wrapped
