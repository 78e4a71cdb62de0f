"""Where a fresh run's parameters come from (the loop's start-up order, steps 2 and 3).

With `init_from`, the previous stage's parameters (restored from its checkpoint straight into
this stage's shardings: no host copy of the tree); the rest from the task's pretrained
weights (HF); the rest at random init (sharded). Heads that neither provides are fitted in
closed form (`model.head_init = "lstsq"`, see `head_init.py`) or keep their random init.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jasper_jax import sharding
from jasper_jax.data.pair_pipeline import flatten_pairs
from jasper_jax.data.teacher_dataset import open_teacher_dataset
from jasper_jax.models.embedder import head_name
from jasper_jax.settings import Settings
from jasper_jax.train import head_init
from jasper_jax.train.checkpoint import check_shape, restore_params
from jasper_jax.train.task import Task
from jasper_jax.train.text_task import TextTask

log = logging.getLogger("jasper_jax.train")
FlatParams = dict[tuple[str, ...], Any]


def initial_params(s: Settings, task: Task, shardings: Any, mesh: Any) -> tuple[Any, bool]:
    """The new stage's params, each created on its sharding (`shardings`): the previous
    stage's (`init_from`, restored straight into these shardings), else the task's pretrained
    weights (HF), else random init; heads neither provides are fitted in closed form with
    `model.head_init = "lstsq"`. Returns (params, whether any head was fitted)."""
    flat_shardings = traverse_util.flatten_dict(shardings)
    shapes = jax.eval_shape(lambda rng: nn.meta.unbox(task.init(rng)), jax.random.key(s.seed))
    target = {
        path: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=flat_shardings[path])
        for path, x in traverse_util.flatten_dict(shapes).items()
    }
    params, source = _previous_stage(s, target)
    pretrained, hf_source = _pretrained(task, target, params)
    params.update(pretrained)
    source = " + ".join(filter(None, (source, hf_source)))
    fresh = [path for path in target if path not in params]
    params.update(_random_init(s, task, fresh, flat_shardings))
    params = {path: params[path] for path in target}  # the model's order
    new_heads = sorted({p[1] for p in fresh if p[0] == "heads"})
    # Only text tasks have targets to regress on (stage 4 keeps the student's trained heads).
    fitted = bool(new_heads) and s.model.head_init == "lstsq" and isinstance(task, TextTask)
    if fitted:
        params = _fit_heads(s, task, params, new_heads, mesh, flat_shardings)
        fresh = [p for p in fresh if p[0] != "heads"]
    names = ["/".join(p) for p in fresh]
    log.info("initialised from %s; %d tensors at random init: %s", source, len(names), names)
    return traverse_util.unflatten_dict(params), fitted


def _previous_stage(s: Settings, target: FlatParams) -> tuple[FlatParams, str]:
    """(the previous stage's params that the new stage has, restored on the new stage's
    shardings with no host copy of the tree; where they come from), or ({}, "")."""
    if not s.init_from:
        return {}, ""
    params, step = restore_params(s.init_from, traverse_util.unflatten_dict(target))
    return params, f"{s.init_from} step {step}"


def _pretrained(task: Task, target: FlatParams, loaded: FlatParams) -> tuple[FlatParams, str]:
    """(the task's pretrained weights for the paths `loaded` lacks, put on their shardings leaf
    by leaf from the host arrays the task holds (the HF encoder, stage 4's tower); source)."""
    pretrained, source = task.pretrained()
    out = {}
    for path, value in traverse_util.flatten_dict(pretrained).items():
        if path in loaded or path not in target:
            continue
        want = target[path]
        check_shape(path, value.shape, want.shape, source)
        out[path] = jax.device_put(np.asarray(value, want.dtype), want.sharding)
    return out, source


def _random_init(s: Settings, task: Task, paths: list, flat_shardings: dict) -> FlatParams:
    """Random init of `paths` only, on their shardings (XLA drops the other leaves' work, so
    a hand-off never holds a second copy of the restored params)."""
    if not paths:
        return {}

    def init(rng):
        flat = traverse_util.flatten_dict(nn.meta.unbox(task.init(rng)))
        return {path: flat[path] for path in paths}

    out_shardings = {path: flat_shardings[path] for path in paths}
    return jax.jit(init, out_shardings=out_shardings)(jax.random.key(s.seed))


def _fit_heads(
    s: Settings, task: TextTask, params: FlatParams, names: list[str], mesh, flat_shardings
) -> FlatParams:
    """Closed-form fit of the heads `names` on `model.head_init_texts` train texts, read with
    the parameters as loaded (one forward pass; see `jasper_jax.train.head_init`)."""
    # Fixed-length batches: their first epoch holds every text once (length groups leave out a
    # partial group per epoch, so the same number of grouped batches would repeat texts).
    fixed = dataclasses.replace(s, data=dataclasses.replace(s.data, length_groups=1))
    data = task.pipeline(fixed)
    # Each text once: a small dataset is not cycled to reach head_init_texts.
    texts = min(s.model.head_init_texts, len(open_teacher_dataset(s.data.train_dir)[0]))
    batches = max(1, texts // s.data.batch_size)
    keys = ("input_ids", "attention_mask", "teacher")
    # Pair batches are read as their n * m texts: every text has its teacher vector.
    texts_of = flatten_pairs if task.pairs else dict
    moments = head_init.accumulate_moments(
        task.head_features,
        traverse_util.unflatten_dict(params),
        (sharding.global_batch(texts_of(next(data)), mesh, keys) for _ in range(batches)),
        mesh,
    )
    full_name = head_name(task.teacher_dim)
    full_head = None
    if full_name not in names:  # reduce from the full head as trained so far
        full_head = tuple(
            sharding.host_value(params[("heads", full_name, leaf)]) for leaf in ("kernel", "bias")
        )
    dims = dict(zip(task.config.head_names, task.config.heads, strict=True))
    fitted = head_init.closed_form_heads(
        moments, {n: dims[n] for n in names}, task.teacher_dim, s.model.head_init_ridge, full_head
    )
    for name, leaves in fitted.items():
        for leaf, value in leaves.items():
            path = ("heads", name, leaf)
            params[path] = jax.device_put(value, flat_shardings[path])
    log.info(
        "heads %s fitted in closed form (ridge %g) on %d texts",
        names,
        s.model.head_init_ridge,
        moments.count,
    )
    return params
