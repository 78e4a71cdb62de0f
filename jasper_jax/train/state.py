"""Train state, which parameters train in each stage, and the optimiser.

Only trainable parameters are differentiated and carry optimiser state, so stage 1 on a 1.5B
student holds Adam moments for the heads alone. The split is static (a set of parameter paths),
derived from the config, so the jitted step has a fixed structure.
"""

from __future__ import annotations

import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jasper_jax.settings import OptimSettings, Settings

Path = tuple[str, ...]
_LAYER = re.compile(r"^(layer|layers)_(\d+)$")


@flax.struct.dataclass
class TrainState:
    """Everything a resumed run needs besides the data iterator.

    Attributes:
      step: int32 scalar, updates applied or skipped so far.
      params: the full parameter tree (trainable and frozen).
      opt_state: optimiser state of the trainable subtree.
      rng: uint32 [2] base key; step keys are `fold_in(rng, step)`.
      skipped: int32 total of updates skipped for non-finite loss or gradients.
      bad_in_row: int32 consecutive skipped updates (0 after a good one).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    skipped: jax.Array
    bad_in_row: jax.Array


def encoder_layer_count(params: Any) -> int:
    flat = traverse_util.flatten_dict(params)
    found = {int(m.group(2)) for path in flat for p in path if (m := _LAYER.match(p))}
    return max(found) + 1 if found else 0


def is_trainable(path: Path, trainable: str, num_layers: int, last_layers: int) -> bool:
    """Whether the parameter at `path` trains under the stage's `trainable` setting.

    heads: projection heads only (stage 1). heads+last_layers: heads, the last `last_layers`
    encoder layers and Qwen2's final norm (stage 2). all: the whole student, except BERT's
    unused pooler (stage 3). vision: the vision tower only (stage 4). A learned InfoNCE
    temperature (top-level "loss") trains in every text stage.
    """
    top = path[0]
    if trainable == "vision":
        return top == "vision"
    if top == "vision":
        return False
    if top in ("heads", "loss"):  # "loss": the objective's own parameters (a temperature)
        return True
    if "pooler" in path:
        return False  # HF BERT pooler: not on the embedding path, kept for export only
    if trainable == "all":
        return True
    if trainable == "heads+last_layers":
        layers = [int(m.group(2)) for p in path if (m := _LAYER.match(p))]
        if layers:
            return layers[0] >= num_layers - last_layers
        return path[:2] == ("encoder", "norm")
    return False


def trainable_paths(params: Any, s: Settings) -> frozenset[Path]:
    num_layers = encoder_layer_count(params.get("encoder", {}))
    flat = traverse_util.flatten_dict(params)
    return frozenset(
        path
        for path in flat
        if is_trainable(path, s.trainable, num_layers, s.model.trainable_last_layers)
    )


def split_params(params: Any, paths: frozenset[Path]) -> tuple[Any, Any]:
    """(trainable, frozen) nested dicts whose union is `params`."""
    flat = traverse_util.flatten_dict(params)
    train = {p: v for p, v in flat.items() if p in paths}
    frozen = {p: v for p, v in flat.items() if p not in paths}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def merge_params(a: Any, b: Any) -> Any:
    flat = {**traverse_util.flatten_dict(a), **traverse_util.flatten_dict(b)}
    return traverse_util.unflatten_dict(flat)


def learning_rate_schedule(optim: OptimSettings, steps: int) -> optax.Schedule:
    """Linear warm-up over `warmup_fraction` of the steps, then cosine decay to 0."""
    warmup = int(round(optim.warmup_fraction * steps))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=warmup, decay_steps=max(steps, warmup + 1)
    )


def make_optimizer(s: Settings) -> optax.GradientTransformation:
    """AdamW with clipping; no weight decay on biases and norm scales (1-D parameters)."""
    o = s.optim
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(o.clip_norm),
        optax.adamw(
            learning_rate_schedule(o, s.train.steps),
            b1=o.b1,
            b2=o.b2,
            weight_decay=o.weight_decay,
            mask=decay_mask,
        ),
    )


def init_state(params: Any, paths: frozenset[Path], tx, seed: int) -> TrainState:
    trainable, _ = split_params(params, paths)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        step=zero,
        params=params,
        opt_state=tx.init(trainable),
        rng=jax.random.key_data(jax.random.key(seed)),
        skipped=zero,
        bad_in_row=zero,
    )
