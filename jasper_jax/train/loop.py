"""One train loop for every stage: `train_and_evaluate(config, workdir)`.

Start-up order:
  1. this workdir's own latest checkpoint: full state and data-iterator state (resume);
  2. else `config.init_from`: params of the previous stage's latest checkpoint (fresh optimiser);
     parameters it lacks (new heads) keep their random init and are logged;
  3. else the encoder from the HF folder `config.model.init_hf`, heads at random init.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax import traverse_util
from jax.experimental import multihost_utils

from jasper_jax import sharding
from jasper_jax.data.teacher_dataset import open_teacher_dataset
from jasper_jax.errors import UserError
from jasper_jax.locks import FolderLock, remove_leftovers
from jasper_jax.losses import LossConfig
from jasper_jax.models.embedder import head_name
from jasper_jax.models.loading import LoadedModel
from jasper_jax.paths import TMP_PREFIX, PathLike, as_path, canonical, write_json_atomic
from jasper_jax.train import checkpoint as ckpt
from jasper_jax.train import head_init
from jasper_jax.train import state as st
from jasper_jax.train.reporting import MetricWriter, Progress, step_flops
from jasper_jax.train.setup import Task, TextTask, make_task
from jasper_jax.train.step import make_train_step

log = logging.getLogger("jasper_jax.train")


class TrainingStopped(UserError):
    """Training stopped early on purpose (non-finite streak); the message says why."""


def loss_config(c: ml_collections.ConfigDict) -> LossConfig:
    return LossConfig(
        cosine_weight=c.loss.cosine,
        similarity_weight=c.loss.similarity,
        resim_weight=c.loss.relative_similarity,
        margin=c.loss.margin,
        mrl_dims=tuple(c.loss.mrl_dims) or None,
        infonce_weight=c.loss.infonce,
        infonce_temperature=c.loss.infonce_temperature,
        infonce_symmetric=True,
        gor_weight=c.loss.gor,
        block_size=c.loss.resim_block_size or None,
    )


def chunk_loss_config(c: ml_collections.ConfigDict) -> LossConfig | None:
    """Weights of the chunk-alignment term; None when chunk mode is off (data.max_chunks 0)."""
    if not c.data.max_chunks:
        return None
    return LossConfig(
        cosine_weight=c.loss.chunk_cosine,
        similarity_weight=c.loss.chunk_similarity,
        resim_weight=c.loss.chunk_relative_similarity,
        margin=c.loss.margin,
        block_size=c.loss.resim_block_size or None,
    )


def run_identity(c: ml_collections.ConfigDict, task: Task) -> dict:
    return {
        "config": c.name,
        "stage": c.stage,
        "heads": list(c.model.heads),
        "train_data": canonical(c.data.train_dir),
        "seed": c.seed,
        **task.identity(),
    }


def _initial_params(c, task: Task, shardings, mesh) -> tuple[Any, bool]:
    """Random params (sharded), overwritten by HF weights or the previous stage's params; heads
    neither provides are fitted in closed form with `model.head_init = "lstsq"`. Returns
    (params, whether any head was fitted)."""
    init = jax.jit(lambda rng: nn.meta.unbox(task.init(rng)), out_shardings=shardings)
    params = traverse_util.flatten_dict(init(jax.random.key(c.seed)))
    pretrained, source = task.pretrained()
    loaded = traverse_util.flatten_dict(pretrained)
    if c.init_from:
        previous, step = ckpt.load_params(c.init_from)
        # The previous stage wins where both have a path; what it lacks (stage 4's vision
        # tower) still comes from the task's pretrained weights.
        loaded = {**loaded, **traverse_util.flatten_dict(previous)}
        source = f"{c.init_from} step {step} + {source}"
    flat_shardings = traverse_util.flatten_dict(shardings)
    fresh = []
    for path in params:
        if path in loaded:
            if tuple(loaded[path].shape) != tuple(params[path].shape):
                raise UserError(
                    f"{'/'.join(path)} has shape {loaded[path].shape} in {source} but "
                    f"{params[path].shape} in this config: model.heads or the student differ"
                )
            params[path] = jax.device_put(
                np.asarray(loaded[path], np.float32), flat_shardings[path]
            )
        else:
            fresh.append(path)
    new_heads = sorted({p[1] for p in fresh if p[0] == "heads"})
    # Only text tasks have targets to regress on (stage 4 keeps the student's trained heads).
    fitted = bool(new_heads) and c.model.head_init == "lstsq" and isinstance(task, TextTask)
    if fitted:
        params = _fit_heads(c, task, params, new_heads, mesh, flat_shardings)
        fresh = [p for p in fresh if p[0] != "heads"]
    names = ["/".join(p) for p in fresh]
    log.info("initialised from %s; %d tensors at random init: %s", source, len(names), names)
    return traverse_util.unflatten_dict(params), fitted


def _fit_heads(c, task: Task, params: dict, names: list[str], mesh, flat_shardings) -> dict:
    """Closed-form fit of the heads `names` on `model.head_init_texts` train texts, read with
    the parameters as loaded (one forward pass; see `jasper_jax.train.head_init`)."""
    # Fixed-length batches: their first epoch holds every text once (length groups leave out a
    # partial group per epoch, so the same number of grouped batches would repeat texts).
    fit = c.copy_and_resolve_references()
    fit.data.length_groups = 1
    data = task.pipeline(fit)
    # Each text once: a small dataset is not cycled to reach head_init_texts.
    texts = min(c.model.head_init_texts, len(open_teacher_dataset(c.data.train_dir)[0]))
    batches = max(1, texts // c.data.batch_size)
    keys = ("input_ids", "attention_mask", "teacher")
    moments = head_init.accumulate_moments(
        task.head_features,
        traverse_util.unflatten_dict(params),
        (_global_batch(next(data), mesh, keys) for _ in range(batches)),
        mesh,
    )
    full_name = head_name(task.teacher_dim)
    full_head = None
    if full_name not in names:  # reduce from the full head as trained so far
        full_head = tuple(
            _host_value(params[("heads", full_name, leaf)]) for leaf in ("kernel", "bias")
        )
    dims = dict(zip(task.config.head_names, task.config.heads, strict=True))
    fitted = head_init.closed_form_heads(
        moments, {n: dims[n] for n in names}, task.teacher_dim, c.model.head_init_ridge, full_head
    )
    for name, leaves in fitted.items():
        for leaf, value in leaves.items():
            params[("heads", name, leaf)] = jax.device_put(
                value, flat_shardings[("heads", name, leaf)]
            )
    log.info(
        "heads %s fitted in closed form (ridge %g) on %d texts",
        names,
        c.model.head_init_ridge,
        moments.count,
    )
    return params


def _host_value(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-host, sharded) array, on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _global_batch(batch: dict, mesh, keys: tuple[str, ...]) -> dict:
    """Per-process numpy batch -> global jax arrays sharded over (data, fsdp)."""
    out = {}
    for name in keys:
        local = batch[name]
        spec = sharding.batch_sharding(mesh, local.ndim)
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        out[name] = jax.make_array_from_process_local_data(spec, local, global_shape)
    return out


class _Preemption:
    """SIGTERM (TPU preemption, `kill`) sets a flag; the loop saves and stops at a step edge."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM received: saving a checkpoint at the end of this step")
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(
    c: ml_collections.ConfigDict,
    workdir: PathLike,
    evaluator: Callable[[LoadedModel, Any], dict] | None = None,
) -> dict[str, Any]:
    """Trains one stage in `workdir`; returns {"status", "step", "eval": {...}}.

    evaluator: an extra held-out evaluation `(model, mesh) -> scores` of a text stage (the
    demo's fidelity + retrieval table), run on the final parameters ("scores") and, when a
    fresh run fitted heads in closed form, on the starting ones ("start_scores").

    Raises:
      UserError: a bad config for this mesh, another live process training in `workdir`, a
        workdir of another run, no good checkpoint to resume from, a non-finite streak.
    """
    workdir = as_path(workdir)
    # One writer per workdir: process 0 holds the lock for the run (the others share it).
    lock = FolderLock(workdir, "train") if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        if jax.process_index() == 0:
            remove_leftovers(workdir, [TMP_PREFIX + "*"])
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("workdir locked")
        return _train_and_evaluate(c, workdir, evaluator)


def _train_and_evaluate(c, workdir, evaluator) -> dict[str, Any]:
    mesh = sharding.make_mesh(tuple(c.mesh_shape))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if c.data.batch_size % shards or c.data.batch_size % jax.process_count():
        raise UserError(
            f"config field data.batch_size: {c.data.batch_size} must divide evenly over the "
            f"{shards} data-parallel devices and {jax.process_count()} processes"
        )
    chunk = c.train.gradcache_chunk or c.data.batch_size
    if chunk % shards:
        raise UserError(
            f"config field train.gradcache_chunk: {chunk} rows must divide evenly over the "
            f"{shards} data-parallel devices"
        )
    task = make_task(c)
    abstract = jax.eval_shape(task.init, jax.random.key(0))
    param_shardings = sharding.param_shardings(abstract, mesh)
    checkpointer = ckpt.Checkpointer(workdir, run_identity(c, task), c.train.keep_checkpoints)
    if jax.process_index() == 0:
        write_json_atomic(workdir / ckpt.MODEL_FILE, task.describe(c))

    tx = st.make_optimizer(c)
    schedule = st.learning_rate_schedule(c.optim, c.train.steps)
    paths = st.trainable_paths(nn.meta.unbox(abstract), c)
    data = task.pipeline(c)
    abstract_state = jax.eval_shape(
        functools.partial(st.init_state, paths=paths, tx=tx, seed=c.seed), nn.meta.unbox(abstract)
    )
    state_shardings = _state_shardings(abstract_state, param_shardings, tx, paths, mesh)

    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state,
        state_shardings,
    )
    restored, start_scores = checkpointer.restore_latest(target, data), None
    if restored is not None:
        state, start = restored
        log.info("resumed from %s at step %d (verified)", workdir / ckpt.CHECKPOINT_DIR, start)
    else:
        params, fitted = _initial_params(c, task, param_shardings, mesh)
        state = jax.jit(
            functools.partial(st.init_state, paths=paths, tx=tx, seed=c.seed),
            out_shardings=state_shardings,
        )(params)
        start = 0
        if evaluator is not None and fitted:
            start_scores = evaluator(task.loaded_model(c, state.params), mesh)
    train_step = make_train_step(
        task.forward(c),
        loss_config(c),
        tx,
        paths,
        schedule,
        loss_groups=shards if c.loss.in_batch == "per_device" else 1,
        gradcache_chunks=c.data.batch_size // chunk,
        chunk_config=chunk_loss_config(c),
    )
    step_fn = jax.jit(
        train_step,
        in_shardings=(state_shardings, None),
        out_shardings=(state_shardings, None),
        donate_argnums=0,
    )
    if c.train.steps == 0 and checkpointer.latest_step() is None:
        # A fit-only stage (closed-form heads, no gradient steps): its result is the start.
        checkpointer.save(0, state, data)
    result = _run(c, workdir, step_fn, state, data, checkpointer, mesh, start, task.batch_keys)
    if start_scores is not None:
        result["start_scores"] = start_scores
    if result["status"] == "finished":
        params = result.pop("state").params
        result["eval"] = task.evaluate(c, params, mesh)
        if evaluator is not None and start_scores is not None and result["step"] == 0:
            result["scores"] = start_scores  # a fit-only stage ends where it started
        elif evaluator is not None:
            result["scores"] = evaluator(task.loaded_model(c, params), mesh)
        MetricWriter(workdir / "tb").scalars(
            result["step"], {f"eval/{k}": v for k, v in _flatten(result["eval"]).items()}
        )
    result.pop("state", None)
    checkpointer.close()
    return result


def _state_shardings(abstract_state, param_shardings, tx, paths, mesh):
    """Shardings of the whole state: params as the rules say; optimiser state as XLA propagates
    from the trainable params (Adam moments follow their parameter); scalars replicated."""
    trainable_sh, _ = st.split_params(param_shardings, paths)
    trainable_abs, _ = st.split_params(abstract_state.params, paths)
    arg = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), trainable_abs, trainable_sh
    )
    opt_sh = jax.jit(tx.init).lower(arg).compile().output_shardings
    rep = sharding.replicated(mesh)
    # Leaves not derived from a parameter (Adam's step count) come back on one device.
    on_mesh = set(mesh.devices.flat)
    opt_sh = jax.tree.map(lambda s: s if s.device_set == on_mesh else rep, opt_sh)
    return st.TrainState(
        step=rep, params=param_shardings, opt_state=opt_sh, rng=rep, skipped=rep, bad_in_row=rep
    )


def _run(c, workdir, step_fn, state, data, checkpointer, mesh, start, keys) -> dict[str, Any]:
    writer = MetricWriter(workdir / "tb")
    preemption = _Preemption()
    label = f"{c.name} stage {c.stage}"
    progress, status, step = Progress(label, c.train.steps, start), "finished", start
    # Compiled ahead of time once per batch shape: one for fixed-length batches, one per
    # length with data.length_groups; any other shape change is an error.
    compiled: dict[tuple, Any] = {}
    try:
        for step in range(start, c.train.steps):
            batch = _global_batch(next(data), mesh, keys)
            shape = tuple(batch["input_ids"].shape) if "input_ids" in batch else ()
            if shape not in compiled:
                began = time.perf_counter()
                fn = step_fn.lower(state, batch).compile()
                compiled[shape] = (fn, step_flops(fn))
                progress.exclude(time.perf_counter() - began)  # rates count steps only
            fn, flops = compiled[shape]
            state, metrics = fn(state, batch)
            done = step + 1
            progress.add_step(float(metrics["tokens"]), flops)
            if int(metrics["bad_in_row"]) >= c.train.max_nonfinite_in_row:
                raise TrainingStopped(
                    f"{label}: {c.train.max_nonfinite_in_row} updates in a row had a non-finite "
                    f"loss or gradient (last at step {done}); stopped without saving. "
                    + _saved_note(checkpointer, workdir)
                    + " Check the teacher vectors for NaN, lower optim.lr, or use dtype=float32"
                )
            if done % c.train.log_every == 0 or done == c.train.steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                values.update(_data_counters(data))
                values.update(progress.report(done, values))
                writer.scalars(done, {f"train/{k}": v for k, v in values.items()})
            stop = preemption.requested or checkpointer.reached_preemption(done)
            if stop or done % c.train.checkpoint_every == 0 or done == c.train.steps:
                checkpointer.save(done, state, data)
            if stop:
                log.warning(
                    "%s: preempted; saved step %d, re-run the command to resume", label, done
                )
                status, step = "preempted", done
                break
        else:
            step = c.train.steps
    finally:
        preemption.restore()
        writer.close()
    # Token lengths the step was compiled for (one program each; data.length_groups).
    lengths = sorted(shape[1] for shape in compiled if len(shape) == 2)
    return {"status": status, "step": step, "state": state, "batch_lengths": lengths}


def _saved_note(checkpointer: ckpt.Checkpointer, workdir) -> str:
    """What a stopped run leaves: its newest checkpoint (each one was verified when it was
    written or restored), or nothing."""
    latest = checkpointer.latest_step()
    if latest is None:
        return "No checkpoint of this stage exists yet."
    return (
        f"The newest checkpoint, step {latest} in {workdir / ckpt.CHECKPOINT_DIR}, is kept "
        "(fingerprints recorded at save; a resume verifies them)."
    )


def _data_counters(data) -> dict[str, float]:
    """Fractions of texts cut at data.max_length and, in chunk mode, of chunks left out (cut
    or over data.max_chunks), since this run started: logged so silent truncation shows."""
    out = {}
    if getattr(data, "texts_seen", 0):
        out["truncated_texts"] = data.truncated_texts / data.texts_seen
    if getattr(data, "chunks_seen", 0):
        out["dropped_chunks"] = data.chunks_dropped / data.chunks_seen
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
