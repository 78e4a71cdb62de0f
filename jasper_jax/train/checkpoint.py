"""orbax checkpoints of a run: train state + per-process data-iterator state, keep N, identity.

`WORKDIR/run.json` records what run the checkpoints belong to; a workdir holding another run's
checkpoints is refused rather than mixed or overwritten. The folder's format, and reading the
params of a checkpoint (encode, export), live in `jasper_jax.run_folder`; a stage hand-off
restores the previous stage's params straight into the new stage's shardings
(`restore_params`, no host copy of the tree).

Saves are asynchronous: `save` returns once the state is copied off the devices and its
fingerprints are taken; the files are written in the background. `wait` (the loop calls it
before it returns or raises) and `close` block until the last save is committed.

Integrity: each checkpoint holds, besides "state" and "data", an "integrity" item with the
fingerprint of every state array (`run_folder.integrity_record`), computed on device at save.
Every restore recomputes and compares them. A checkpoint that fails (damaged bytes, unreadable
files) is moved aside to `checkpoints/damaged-STEP-TIME` with a warning, and the previous one is
used; with none left the run stops with one line. Checkpoints written before integrity items
existed restore unverified, with a warning.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils

from jasper_jax.errors import UserError, one_line
from jasper_jax.paths import PathLike, as_path, read_json, write_json_atomic
from jasper_jax.run_folder import (
    CHECKPOINT_DIR,
    INTEGRITY,
    RUN_FILE,
    DamagedCheckpoint,
    first_verified,
    integrity_record,
    verify,
)

log = logging.getLogger(__name__)
DAMAGED_PREFIX = "damaged-"


def _differences(old: dict, new: dict) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


class _GrainIteratorArg:
    """Adapts our iterator to grain's orbax handler (which restarts prefetch after restore)."""

    def __init__(self, iterator: Any):
        self.iterator = iterator

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state) -> None:
        self.iterator.set_state(state)

    def start_prefetch(self) -> None:
        pass


class Checkpointer:
    """Periodic saves of one run in `workdir/checkpoints`, keeping the newest `keep`."""

    def __init__(self, workdir: PathLike, identity: dict, keep: int):
        self.workdir = as_path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._check_identity(identity)
        self.manager = ocp.CheckpointManager(
            self.workdir / CHECKPOINT_DIR,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep,
                create=True,
                # Saves write in a background thread once the arrays are on the host
                # (`save` returns then, so the next step may donate them); `wait` and `close`
                # block until the last one is committed.
                enable_async_checkpointing=True,
                # Safe: the caller holds the workdir lock, so no live save owns them.
                cleanup_tmp_directories=True,
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
                INTEGRITY: ocp.JsonCheckpointHandler(),
            },
        )

    def _check_identity(self, identity: dict) -> None:
        run_file = self.workdir / RUN_FILE
        has_checkpoints = any((self.workdir / CHECKPOINT_DIR).glob("[0-9]*"))
        if run_file.exists():
            old = read_json(
                run_file,
                "the run record was damaged; restore it, or use a new --workdir "
                "(nothing was changed)",
            )
            diff = _differences(old, identity)
            if diff and has_checkpoints:
                raise UserError(
                    f"workdir {self.workdir} holds checkpoints of another run ({'; '.join(diff)}); "
                    "use a new --workdir (nothing was changed)"
                )
        elif has_checkpoints:
            raise UserError(
                f"workdir {self.workdir} holds checkpoints but no {RUN_FILE}: not a jasper-jax "
                "run of this config; use a new --workdir (nothing was changed)"
            )
        if jax.process_index() == 0:
            write_json_atomic(run_file, identity)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any) -> None:
        """Starts saving `state` and the iterator's position as checkpoint `step` (no-op when
        it exists); the integrity record is computed on device now, from the same arrays."""
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(_GrainIteratorArg(data_iterator)),
                **{INTEGRITY: ocp.args.JsonSave(integrity_record(state))},
            ),
            force=True,
        )

    def wait(self) -> None:
        """Blocks until every save started so far is committed (before exit or a report)."""
        self.manager.wait_until_finished()

    def restore_latest(self, abstract_state: Any, data_iterator: Any) -> tuple[Any, int] | None:
        """(state, step) of the newest checkpoint that restores and verifies, or None when
        there is none. Damaged ones on the way are moved aside with a warning.

        Raises:
          UserError: checkpoints exist but every one is damaged (or from another model).
        """
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self._restore_verified(step, abstract_state, data_iterator), step
            except DamagedCheckpoint as e:
                damaged.append(f"step {step}: {e}")
                self._set_aside(step, str(e))
        if damaged:
            raise UserError(
                f"no good checkpoint in {self.workdir / CHECKPOINT_DIR} ({'; '.join(damaged)}); "
                "they were moved to damaged-* folders there; restore them from a backup, or "
                "use a new --workdir to start over"
            )
        return None

    def _restore_verified(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(_GrainIteratorArg(data_iterator)),
                ),
            )
        except Exception as e:  # orbax raises many types for truncated or mismatched files
            raise DamagedCheckpoint(f"cannot be restored: {one_line(e)}") from e
        verify(self.manager, step, restored["state"])
        return restored["state"]

    def _set_aside(self, step: int, reason: str) -> None:
        """Moves a damaged checkpoint out of orbax's sight (a later save may reuse its step)."""
        source = self.workdir / CHECKPOINT_DIR / str(step)
        target = source.parent / f"{DAMAGED_PREFIX}{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            source.rename(target)
        log.warning("checkpoint %s is damaged (%s); moved to %s", source, reason, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.close()


def restore_params(
    workdir: PathLike, target: Any, step: int | None = None
) -> tuple[dict[tuple[str, ...], jax.Array], int]:
    """(flat params {path: array}, step) of a workdir's checkpoint (the latest that verifies,
    or exactly `step`), restored straight into `target`'s shardings: each process reads only
    the shards its devices hold, and no full tree passes through host memory (stage hand-off).

    target: the new stage's params, a nested dict of `jax.ShapeDtypeStruct` with `sharding`.
    Only paths both the checkpoint and `target` hold are restored (a new stage's heads or
    tower are not in the checkpoint; a previous stage's extra params are left on disk); each
    is verified against its recorded fingerprint, then cast to the target's dtype.

    Raises:
      UserError: as `load_params`, or a path both hold has another shape in the checkpoint.
    """
    flat = traverse_util.flatten_dict(target)
    read = functools.partial(_restore_into, target=flat, workdir=workdir)
    return first_verified(workdir, step, read, ocp.PyTreeCheckpointHandler())


def _restore_into(manager: ocp.CheckpointManager, step: int, target: dict, workdir) -> dict:
    """The part of checkpoint `step`'s params that `target` (flat) names, on its shardings."""
    try:
        stored = traverse_util.flatten_dict(manager.item_metadata(step)["state"].tree["params"])
    except Exception as e:  # a missing or damaged metadata file
        raise DamagedCheckpoint(f"its metadata cannot be read: {one_line(e)}") from e
    common = {}
    for path, want in target.items():
        if path not in stored:
            continue
        check_shape(path, stored[path].shape, want.shape, f"{workdir} step {step}")
        # The stored dtype first, so the fingerprints compare the bytes as written.
        common[path] = jax.ShapeDtypeStruct(want.shape, stored[path].dtype, sharding=want.sharding)
    if not common:
        return {}
    item = {"params": traverse_util.unflatten_dict(common)}
    args = ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,  # the checkpoint's other arrays (optimiser, old heads) stay unread
    )
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=args))["state"]
    except Exception as e:  # orbax raises many types for truncated or damaged files
        raise DamagedCheckpoint(f"cannot be read: {one_line(e)}") from e
    verify(manager, step, restored, partial=True)
    out = traverse_util.flatten_dict(restored["params"])
    return {path: _as_dtype(x, target[path]) for path, x in out.items()}


def check_shape(path: tuple[str, ...], have: tuple, want: tuple, source: str) -> None:
    """Refuses a loaded parameter whose shape is not this config's (`source`: where it came
    from, e.g. the previous stage's workdir and step, or the pretrained model)."""
    if tuple(have) != tuple(want):
        raise UserError(
            f"{'/'.join(path)} has shape {tuple(have)} in {source} but {tuple(want)} in this "
            "config: model.heads or the student differ"
        )


def _as_dtype(x: jax.Array, want: jax.ShapeDtypeStruct) -> jax.Array:
    """`x` in `want`'s dtype, cast on device where it lives."""
    if x.dtype == want.dtype:
        return x
    return jax.jit(lambda a: a.astype(want.dtype), out_shardings=want.sharding)(x)
