"""Encoding one slice of a teacher dataset: by one process, or by a group sharing one mesh.

A multi-host run (``jax.distributed``; a TPU slice, or ``--coordinator`` processes) puts every
process's devices in one mesh, so a teacher too big for one host is sharded over all of them and
every batch is computed by the whole group. The group then encodes the slice's blocks together,
in the same order (SPMD programs must match), and block k is written by process
``k % process_count``: each process writes its own rows of the one dataset. Process 0 (the lead)
alone checks and prepares the output folder, marks the slice done and combines the dataset; the
others wait for it at barriers. The output folder must be shared by the group (NFS, a gcsfuse
mount): :meth:`Group.check_shared` says so in one line before any work.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import secrets
from collections.abc import Callable

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from jasper_jax.data import chunk_vectors
from jasper_jax.data.dataset_build import atomic_file, block_path, write_atomically
from jasper_jax.data.teacher_plan import DTYPES, role_runs, slice_blocks, slice_marker
from jasper_jax.data.teachers import compute_teacher_vectors
from jasper_jax.errors import UserError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Group:
    """The processes that encode a slice together: this one is ``index`` of ``count``."""

    index: int = 0
    count: int = 1

    @classmethod
    def current(cls) -> Group:
        """The group of this jax runtime (one process unless ``jax.distributed`` is up)."""
        return cls(jax.process_index(), jax.process_count())

    @property
    def lead(self) -> bool:
        return self.index == 0

    def writes(self, block: int) -> bool:
        """Whether this process writes the slice's ``block``-th block."""
        return block % self.count == self.index

    def agree(self, value: np.ndarray) -> np.ndarray:
        """The lead's ``value`` on every process (same shape and dtype everywhere)."""
        if self.count == 1:
            return value
        return np.asarray(multihost_utils.broadcast_one_to_all(value))

    def barrier(self, name: str) -> None:
        """Waits until every process of the group reaches the barrier ``name``."""
        if self.count > 1:
            multihost_utils.sync_global_devices(f"jasper-jax-teachers:{name}")

    def lead_first(self, step: Callable[[], int]) -> int:
        """Runs ``step`` on the lead only and hands its int result to every process; an error
        there is raised on the lead and, as one line pointing at it, on the others (instead of
        leaving them waiting at the next collective)."""
        result, error = -1, None
        if self.lead:
            try:
                result = step()
            except BaseException as err:  # noqa: BLE001 - re-raised below, after telling peers
                error = err
        result = int(self.agree(np.int32(result)))
        if error is not None:
            raise error
        if result < 0:
            raise UserError(
                "process 0 of this multi-process teacher run stopped with an error; fix: read "
                "process 0's output and rerun every process"
            )
        return result

    def check_shared(self, folder: pathlib.Path) -> None:
        """UserError on every process unless each one sees the lead's files in ``folder``."""
        if self.count == 1:
            return
        token = int(self.agree(np.int64(secrets.randbits(62))))
        probe = folder / f".group-{token}.probe"
        if self.lead:
            write_atomically(probe, b"shared\n")
        self.barrier(f"probe-{token}")
        seen = np.asarray(multihost_utils.process_allgather(np.int32(probe.exists())))
        self.barrier(f"probed-{token}")
        if self.lead:
            probe.unlink(missing_ok=True)
        if not seen.all():
            blind = np.flatnonzero(seen == 0).tolist()
            raise UserError(
                f"processes {blind} do not see files process 0 wrote in {str(folder)!r}: the "
                "output folder is not shared by the processes of this run; fix: give --output "
                "a folder every host mounts (NFS, a gcsfuse mount of a bucket)"
            )


def encode_slice(parts, plan, texts, teachers, index, progress, chunker, group: Group) -> None:
    """Encodes the blocks of slice ``index`` not yet on disk, then marks the slice done.

    Every process of ``group`` computes every block (one SPMD program); block k of the to-do
    list is saved by ``group.writes(k)``, each file atomically, vectors [rows, D] in the plan's
    storage dtype (and the chunk payload first in chunk mode: the .npy marks a block done).
    A block of a pair dataset is encoded in runs of one role, each with that role's prompts.
    """
    marker = slice_marker(parts, index, plan["num_shards"])
    if group.agree(np.int32(marker.exists())):  # the lead's view: every process does the same
        return
    blocks = slice_blocks(plan, index)
    missing = [not block_path(parts, *b).exists() for b in blocks]
    missing = group.agree(np.array(missing, np.int32)).astype(bool)
    todo = [block for block, needed in zip(blocks, missing, strict=True) if needed]
    dtype = DTYPES[plan["identity"]["dtype"]]
    total = sum(b - a for a, b in todo) * len(teachers)
    show = progress and group.lead
    with tqdm.tqdm(total=total, unit="text", disable=not show, smoothing=0.05) as bar:
        for k, (start, stop) in enumerate(todo):
            vectors = np.concatenate(
                [
                    compute_teacher_vectors(texts[a:b], teachers, bar=bar, role=role)
                    for a, b, role in role_runs(plan["identity"], start, stop)
                ]
            )
            payload = None
            if chunker is not None:
                payload = chunk_vectors.encode_chunks(
                    texts[start:stop], chunker(start, stop), teachers, bar
                )
            if group.writes(k):
                _save_block(block_path(parts, start, stop), vectors.astype(dtype), payload, dtype)
                if group.count > 1:
                    log.info("process %d wrote rows %d-%d", group.index, start, stop)
    group.barrier(f"slice-{index}-encoded")  # every block is on disk
    if group.lead:
        write_atomically(marker, b"done\n")
    group.barrier(f"slice-{index}-marked")


def _save_block(path: pathlib.Path, vectors: np.ndarray, payload, dtype) -> None:
    """One block's files; the chunk payload first, since the .npy marks the block complete."""
    if payload is not None:
        with atomic_file(chunk_vectors.payload_path(path)) as f:
            chunk_vectors.save_payload(f, payload, dtype)
    with atomic_file(path) as f:
        np.save(f, vectors)
