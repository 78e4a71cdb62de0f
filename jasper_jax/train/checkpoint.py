"""orbax checkpoints of a run: train state + per-process data-iterator state, keep N, identity.

`WORKDIR/run.json` records what run the checkpoints belong to; a workdir holding another run's
checkpoints is refused rather than mixed or overwritten. A stage hand-off reads only the params
of another workdir's latest checkpoint.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from jasper_jax.errors import UserError
from jasper_jax.paths import PathLike, as_path, write_json_atomic

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
MODEL_FILE = "model.json"  # the student's architecture, tokenizer folder, teachers
CHECKPOINT_DIR = "checkpoints"


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
                max_to_keep=keep, create=True, enable_async_checkpointing=False
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": grain.checkpoint.CheckpointHandler(),
            },
        )

    def _check_identity(self, identity: dict) -> None:
        run_file = self.workdir / RUN_FILE
        has_checkpoints = any((self.workdir / CHECKPOINT_DIR).glob("[0-9]*"))
        if run_file.exists():
            old = json.loads(run_file.read_text(encoding="utf-8"))
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
        if step in self.manager.all_steps():
            return
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(_GrainIteratorArg(data_iterator)),
            ),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
        """Restores the state (into the shardings of `abstract_state`) and the iterator."""
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(_GrainIteratorArg(data_iterator)),
                ),
            )
        except Exception as e:  # orbax raises many types for truncated or mismatched files
            raise UserError(
                f"checkpoint {self.workdir / CHECKPOINT_DIR / str(step)} cannot be restored ({e}); "
                "it is corrupt or from a different model: move it away to resume from the "
                "previous one, or use a new --workdir"
            ) from e
        return restored["state"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        self.manager.close()


def load_params(workdir: PathLike, step: int | None = None) -> tuple[Any, int]:
    """Params (host numpy tree) of another run's checkpoint: the latest, or `step`.

    Used for stage hand-off (weights only, fresh optimiser) and for export/eval.
    """
    directory = as_path(workdir) / CHECKPOINT_DIR
    if not directory.is_dir():
        raise UserError(
            f"{workdir} has no {CHECKPOINT_DIR}/ folder: run the previous stage first, or "
            "point init_from / --workdir at a finished stage's workdir"
        )
    manager = ocp.CheckpointManager(directory, item_names=("state",))
    steps = manager.all_steps()
    if not steps or (step is not None and step not in steps):
        raise UserError(
            f"{directory} has no checkpoint {step if step is not None else ''} "
            f"(available steps: {sorted(steps)})"
        )
    step = max(steps) if step is None else step
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    except Exception as e:
        raise UserError(f"checkpoint {directory / str(step)} cannot be read ({e})") from e
    finally:
        manager.close()
    return jax.device_get(restored["state"]["params"]), step
