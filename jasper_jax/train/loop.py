"""One train loop for every stage: `train_and_evaluate(config, workdir)`.

Start-up order:
  1. this workdir's own latest checkpoint: full state and data-iterator state (resume);
  2. else `config.init_from`: params of the previous stage's latest checkpoint (fresh optimiser);
     parameters it lacks (new heads) keep their random init and are logged;
  3. else the encoder from the HF folder `config.model.init_hf`, heads at random init.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import signal
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from jax.experimental import multihost_utils

from jasper_jax import sharding
from jasper_jax.errors import UserError
from jasper_jax.locks import FolderLock, remove_leftovers
from jasper_jax.models.loading import LoadedModel
from jasper_jax.paths import TMP_PREFIX, PathLike, as_path, canonical
from jasper_jax.run_folder import CHECKPOINT_DIR, write_model_json
from jasper_jax.settings import Settings
from jasper_jax.train import checkpoint as ckpt
from jasper_jax.train import state as st
from jasper_jax.train.flops import batch_flops
from jasper_jax.train.reporting import MetricWriter, Progress, step_cost
from jasper_jax.train.start import initial_params
from jasper_jax.train.step import chunk_loss_config, loss_config, make_train_step
from jasper_jax.train.task import Task, make_task

log = logging.getLogger("jasper_jax.train")


class TrainingStopped(UserError):
    """Training stopped early on purpose (non-finite streak); the message says why."""


def run_identity(s: Settings, task: Task) -> dict:
    return {
        "config": s.name,
        "stage": s.stage,
        "heads": list(s.model.heads),
        "train_data": canonical(s.data.train_dir),
        "seed": s.seed,
        **task.identity(),
    }


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
    s: Settings,
    workdir: PathLike,
    evaluator: Callable[[LoadedModel, Any], dict] | None = None,
) -> dict[str, Any]:
    """Trains one stage in `workdir`; returns {"status", "step", "eval": {...}}.

    s: the stage's settings (`jasper_jax.config.load_settings` / `to_settings`).
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
        return _train_and_evaluate(s, workdir, evaluator)


@dataclasses.dataclass
class _Run:
    """What one stage's loop works with, built once before the first step."""

    task: Task
    mesh: Any
    shards: int  # data-parallel devices (data x fsdp)
    tx: Any
    paths: frozenset
    data: Any  # the input pipeline (a checkpointable iterator)
    abstract_state: st.TrainState  # shapes and dtypes of every state leaf
    shardings: st.TrainState  # of every state leaf
    checkpointer: ckpt.Checkpointer


def _train_and_evaluate(s: Settings, workdir, evaluator) -> dict[str, Any]:
    run = _prepare(s, workdir)
    try:
        return _stage(s, workdir, evaluator, run)
    finally:
        run.checkpointer.close()  # waits for an asynchronous save still being written


def _stage(s: Settings, workdir, evaluator, run: _Run) -> dict[str, Any]:
    """Start state, steps and the final evaluation of a prepared stage."""
    state, start, start_scores = _start_state(s, run, workdir, evaluator)
    if s.train.steps == 0 and run.checkpointer.latest_step() is None:
        # A fit-only stage (closed-form heads, no gradient steps): its result is the start.
        run.checkpointer.save(0, state, run.data)
    result = _run(s, workdir, _jitted_step(s, run), state, run, start)
    if start_scores is not None:
        result["start_scores"] = start_scores
    if result["status"] == "finished":
        params = result.pop("state").params
        result["eval"] = run.task.evaluate(s, params, run.mesh)
        if evaluator is not None and start_scores is not None and result["step"] == 0:
            result["scores"] = start_scores  # a fit-only stage ends where it started
        elif evaluator is not None:
            result["scores"] = evaluator(run.task.loaded_model(s, params), run.mesh)
        MetricWriter(workdir / "tb").scalars(
            result["step"], {f"eval/{k}": v for k, v in _flatten(result["eval"]).items()}
        )
    result.pop("state", None)
    return result


def _mesh(s: Settings) -> tuple[Any, int]:
    """(the mesh, its data-parallel size), checked against the batch and gradient-cache sizes."""
    mesh = sharding.make_mesh(tuple(s.mesh_shape))
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if s.data.batch_size % shards or s.data.batch_size % jax.process_count():
        raise UserError(
            f"config field data.batch_size: {s.data.batch_size} must divide evenly over the "
            f"{shards} data-parallel devices and {jax.process_count()} processes"
        )
    chunk = s.train.gradcache_chunk or s.data.batch_size
    if chunk % shards:
        raise UserError(
            f"config field train.gradcache_chunk: {chunk} rows must divide evenly over the "
            f"{shards} data-parallel devices"
        )
    return mesh, shards


def _prepare(s: Settings, workdir) -> _Run:
    """Mesh, task, optimiser, data and state shardings (shape first: nothing allocated), the
    checkpointer, and `model.json`."""
    mesh, shards = _mesh(s)
    task = make_task(s)
    abstract = jax.eval_shape(task.init, jax.random.key(0))
    checkpointer = ckpt.Checkpointer(workdir, run_identity(s, task), s.train.keep_checkpoints)
    if jax.process_index() == 0:
        write_model_json(workdir, task.describe(s))
    tx = st.make_optimizer(s)
    paths = st.trainable_paths(nn.meta.unbox(abstract), s)
    abstract_state = jax.eval_shape(
        functools.partial(st.init_state, paths=paths, tx=tx, seed=s.seed), nn.meta.unbox(abstract)
    )
    param_shardings = sharding.param_shardings(abstract, mesh)
    shardings = _state_shardings(abstract_state, param_shardings, tx, paths, mesh)
    data = task.pipeline(s)
    return _Run(task, mesh, shards, tx, paths, data, abstract_state, shardings, checkpointer)


def _start_state(s: Settings, run: _Run, workdir, evaluator) -> tuple[Any, int, dict | None]:
    """(state, first step, held-out scores of fitted heads or None): this workdir's latest
    good checkpoint (resume), else fresh parameters (`start.initial_params`)."""
    target = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        run.abstract_state,
        run.shardings,
    )
    restored = run.checkpointer.restore_latest(target, run.data)
    if restored is not None:
        log.info("resumed from %s at step %d (verified)", workdir / CHECKPOINT_DIR, restored[1])
        return restored[0], restored[1], None
    params, fitted = initial_params(s, run.task, run.shardings.params, run.mesh)
    state = jax.jit(
        functools.partial(st.init_state, paths=run.paths, tx=run.tx, seed=s.seed),
        out_shardings=run.shardings,
    )(params)
    start_scores = None
    if evaluator is not None and fitted:
        start_scores = evaluator(run.task.loaded_model(s, state.params), run.mesh)
    return state, 0, start_scores


def _jitted_step(s: Settings, run: _Run):
    chunk = s.train.gradcache_chunk or s.data.batch_size
    train_step = make_train_step(
        run.task.forward(s),
        loss_config(s.loss),
        run.tx,
        run.paths,
        st.learning_rate_schedule(s.optim, s.train.steps),
        loss_groups=run.shards if s.loss.in_batch == "per_device" else 1,
        gradcache_chunks=s.data.batch_size // chunk,
        chunk_config=chunk_loss_config(s.loss) if s.data.max_chunks else None,
        mesh=run.mesh,  # flash kernels under shard_map, activation constraints
    )
    return jax.jit(
        train_step,
        in_shardings=(run.shardings, None),
        out_shardings=(run.shardings, None),
        donate_argnums=0,
    )


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


def _run(s: Settings, workdir, step_fn, state, run: _Run, start: int) -> dict[str, Any]:
    """Steps `start`..`train.steps`: logs, checkpoints, stops on preemption or a non-finite
    streak. Returns {"status", "step", "state", "batch_lengths"}."""
    data, checkpointer, mesh, keys = run.data, run.checkpointer, run.mesh, run.task.batch_keys
    writer = MetricWriter(workdir / "tb")
    preemption = _Preemption()
    label = f"{s.name} stage {s.stage}"
    progress, status, step = Progress(label, s.train.steps, start), "finished", start
    # Compiled ahead of time once per batch shape: one for fixed-length batches, one per
    # length with data.length_groups; any other shape change is an error.
    compiled: dict[tuple, Any] = {}
    try:
        for step in range(start, s.train.steps):
            batch = sharding.global_batch(next(data), mesh, keys)
            shape = tuple(batch["input_ids"].shape) if "input_ids" in batch else ()
            if shape not in compiled:
                began = time.perf_counter()
                fn = step_fn.lower(state, batch).compile()
                # Analytic model FLOPs (MFU) beside XLA's count of the compiled program.
                model = batch_flops(getattr(run.task, "config", None), run.paths, batch)
                compiled[shape] = (fn, step_cost(fn, model and model.total, s.model.remat))
                progress.exclude(time.perf_counter() - began)  # rates count steps only
            fn, cost = compiled[shape]
            state, metrics = fn(state, batch)
            done = step + 1
            progress.add_step(float(metrics["tokens"]), cost)
            if int(metrics["bad_in_row"]) >= s.train.max_nonfinite_in_row:
                raise TrainingStopped(
                    f"{label}: {s.train.max_nonfinite_in_row} updates in a row had a non-finite "
                    f"loss or gradient (last at step {done}); stopped without saving. "
                    + _saved_note(checkpointer, workdir)
                    + " Check the teacher vectors for NaN, lower optim.lr, or use dtype=float32"
                )
            if done % s.train.log_every == 0 or done == s.train.steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                values.update(_data_counters(data))
                values.update(progress.report(done, values))
                writer.scalars(done, {f"train/{k}": v for k, v in values.items()})
            stop = preemption.requested or checkpointer.reached_preemption(done)
            if stop or done % s.train.checkpoint_every == 0 or done == s.train.steps:
                checkpointer.save(done, state, data)
            if stop:
                log.warning(
                    "%s: preempted; saved step %d, re-run the command to resume", label, done
                )
                status, step = "preempted", done
                break
        else:
            step = s.train.steps
    finally:
        # The last (asynchronous) save is on disk before the loop reports or raises: a
        # preempted process may be killed right after it returns.
        checkpointer.wait()
        preemption.restore()
        writer.close()
    # Token lengths the step was compiled for (one program each; data.length_groups).
    lengths = sorted(shape[-1] for shape in compiled if len(shape) >= 2)
    return {"status": status, "step": step, "state": state, "batch_lengths": lengths}


def _saved_note(checkpointer: ckpt.Checkpointer, workdir) -> str:
    """What a stopped run leaves: its newest checkpoint (each one was verified when it was
    written or restored), or nothing."""
    latest = checkpointer.latest_step()
    if latest is None:
        return "No checkpoint of this stage exists yet."
    return (
        f"The newest checkpoint, step {latest} in {workdir / CHECKPOINT_DIR}, is kept "
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
