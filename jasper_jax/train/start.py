"""Where a fresh run's parameters come from (the loop's start-up order, steps 2 and 3).

Random init (sharded) is overwritten by the task's pretrained weights (HF) and, with
`init_from`, by the previous stage's parameters; heads that neither provides are fitted in
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
from jasper_jax.errors import UserError
from jasper_jax.models.embedder import head_name
from jasper_jax.run_folder import load_params
from jasper_jax.settings import Settings
from jasper_jax.train import head_init
from jasper_jax.train.task import Task
from jasper_jax.train.text_task import TextTask

log = logging.getLogger("jasper_jax.train")
FlatParams = dict[tuple[str, ...], Any]


def initial_params(s: Settings, task: Task, shardings: Any, mesh: Any) -> tuple[Any, bool]:
    """Random params (sharded), overwritten by HF weights or the previous stage's params; heads
    neither provides are fitted in closed form with `model.head_init = "lstsq"`. Returns
    (params, whether any head was fitted)."""
    init = jax.jit(lambda rng: nn.meta.unbox(task.init(rng)), out_shardings=shardings)
    params = traverse_util.flatten_dict(init(jax.random.key(s.seed)))
    loaded, source = _loaded_params(s, task)
    flat_shardings = traverse_util.flatten_dict(shardings)
    fresh = []
    for path in params:
        if path not in loaded:
            fresh.append(path)
            continue
        if tuple(loaded[path].shape) != tuple(params[path].shape):
            raise UserError(
                f"{'/'.join(path)} has shape {loaded[path].shape} in {source} but "
                f"{params[path].shape} in this config: model.heads or the student differ"
            )
        params[path] = jax.device_put(np.asarray(loaded[path], np.float32), flat_shardings[path])
    new_heads = sorted({p[1] for p in fresh if p[0] == "heads"})
    # Only text tasks have targets to regress on (stage 4 keeps the student's trained heads).
    fitted = bool(new_heads) and s.model.head_init == "lstsq" and isinstance(task, TextTask)
    if fitted:
        params = _fit_heads(s, task, params, new_heads, mesh, flat_shardings)
        fresh = [p for p in fresh if p[0] != "heads"]
    names = ["/".join(p) for p in fresh]
    log.info("initialised from %s; %d tensors at random init: %s", source, len(names), names)
    return traverse_util.unflatten_dict(params), fitted


def _loaded_params(s: Settings, task: Task) -> tuple[FlatParams, str]:
    """(flat params to load, where they come from): the task's pretrained weights, overlaid by
    the previous stage's where both have a path (stage 4's tower comes from the task alone)."""
    pretrained, source = task.pretrained()
    loaded = traverse_util.flatten_dict(pretrained)
    if s.init_from:
        previous, step = load_params(s.init_from)
        loaded = {**loaded, **traverse_util.flatten_dict(previous)}
        source = f"{s.init_from} step {step} + {source}"
    return loaded, source


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
