"""The train step: a pure function `(state, batch) -> (state, metrics)`, jitted once.

A step whose loss or gradients are not finite changes nothing but the counters: parameters and
optimiser state keep their previous values, `skipped` and `bad_in_row` go up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jasper_jax.losses import LossConfig, distillation_loss
from jasper_jax.models.embedder import Embedder
from jasper_jax.train.state import Path, TrainState, merge_params, split_params

# forward(params, batch, rng) -> (student vectors per head, teacher target(s))
Forward = Callable[[Any, Mapping[str, jax.Array], jax.Array], tuple[dict, Any]]


def text_forward(model: Embedder, head_names: tuple[str, ...], dropout: bool) -> Forward:
    """Student head vectors for a text batch against the batch's concatenated teacher vectors."""

    def forward(params, batch, rng):
        out = model.apply(
            {"params": params},
            batch["input_ids"],
            batch["attention_mask"],
            heads=head_names,
            deterministic=not dropout,
            rngs={"dropout": rng},
        )
        return out, batch["teacher"]

    return forward


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_train_step(
    forward: Forward,
    loss_config: LossConfig,
    tx: optax.GradientTransformation,
    paths: frozenset[Path],
    schedule: optax.Schedule,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict]]:
    """Builds the pure step; `paths` are the trainable parameters (see `state.trainable_paths`)."""

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        trainable, frozen = split_params(state.params, paths)

        def loss_fn(trainable):
            student, teacher = forward(merge_params(trainable, frozen), batch, rng)
            return distillation_loss(student, teacher, loss_config)

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
        metrics = {
            **metrics,
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "lr": schedule(state.step),
            "skipped": new_state.skipped,
            "bad_in_row": new_state.bad_in_row,
        }
        if "attention_mask" in batch:
            metrics["tokens"] = jnp.sum(batch["attention_mask"]).astype(jnp.float32)
        return new_state, metrics

    return train_step
