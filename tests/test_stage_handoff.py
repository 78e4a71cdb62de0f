"""Stage hand-off on 8 fake devices: the previous stage's params restored straight into the new
stage's shardings on another mesh (equal values, no host copy of the tree, verified), and
asynchronous checkpoint saves (donation-safe, exact resume after SIGTERM)."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from jasper_jax import fingerprint
from jasper_jax.errors import UserError
from jasper_jax.run_folder import CHECKPOINT_DIR, INTEGRITY, load_params
from jasper_jax.train import checkpoint as ckpt
from jasper_jax.train import loop
from jasper_jax.train.start import initial_params
from tests.train_fixtures import (  # noqa: F401
    read_metrics,
    sigterm_after_steps,
    tiny_settings,
    tiny_setup,
)

PREVIOUS_MESH, NEW_MESH = (8, 1, 1), (2, 2, 2)


def _flat(params) -> dict:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


@pytest.fixture(scope="module")
def stage1(tiny_setup, tmp_path_factory):  # noqa: F811
    """Stage 1 trained 2 steps on the (8, 1, 1) mesh, checkpoints at steps 1 and 2."""
    workdir = tmp_path_factory.mktemp("handoff") / "s1"
    fields = {"train.steps": 2, "train.checkpoint_every": 1, "mesh_shape": PREVIOUS_MESH}
    result = loop.train_and_evaluate(tiny_settings(tiny_setup, 1, **fields), workdir)
    assert result["status"] == "finished"
    return workdir


class _HostBytes:
    """Counts the bytes that leave the devices through jax.device_get or np.asarray(array)."""

    def __init__(self, monkeypatch):
        self.bytes = 0
        array_type = type(jnp.zeros(1))  # jax's ArrayImpl: np.asarray(x) calls its __array__
        device_get, to_numpy = jax.device_get, array_type.__array__

        def counting_get(tree):
            self.bytes += sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree))
            return device_get(tree)

        def counting_array(array, *args, **kwargs):
            self.bytes += array.nbytes
            return to_numpy(array, *args, **kwargs)

        monkeypatch.setattr(jax, "device_get", counting_get)
        monkeypatch.setattr(array_type, "__array__", counting_array)


def _stage3_start(setup, workdir, init_from, monkeypatch=None):
    """(params, param shardings, host bytes) of a stage-3 start on NEW_MESH from `init_from`."""
    s = tiny_settings(
        setup, 3, init_from=str(init_from), mesh_shape=NEW_MESH, **{"model.head_init": "random"}
    )
    run = loop._prepare(s, workdir)
    counter = _HostBytes(monkeypatch) if monkeypatch is not None else None
    params, fitted = initial_params(s, run.task, run.shardings.params, run.mesh)
    if monkeypatch is not None:
        monkeypatch.undo()
    run.checkpointer.close()
    assert not fitted
    return params, run.shardings.params, counter.bytes if counter else None


def test_handoff_restores_on_the_new_mesh_without_a_host_copy(
    tiny_setup,  # noqa: F811
    stage1,
    tmp_path,
    monkeypatch,
):
    params, shardings, host_bytes = _stage3_start(tiny_setup, tmp_path / "s3", stage1, monkeypatch)
    previous, step = load_params(stage1)
    assert step == 2
    got, want, target = _flat(params), _flat(previous), _flat(shardings)
    restored = sorted(set(got) & set(want))
    assert any(k.startswith("encoder/") for k in restored) and "heads/dense_384/kernel" in restored
    for key in restored:  # equal values, already on the new stage's shardings
        np.testing.assert_array_equal(np.asarray(got[key]), want[key], err_msg=key)
        assert got[key].sharding == target[key], key
        assert got[key].dtype == want[key].dtype == np.float32, key
    assert got["heads/dense_384/kernel"].sharding.mesh.devices.shape == NEW_MESH
    new_heads = {k for k in got if k.startswith(("heads/dense_32/", "heads/dense_16/"))}
    assert new_heads and not new_heads & set(want)  # the reduced heads start at random init
    for key in new_heads:
        assert got[key].sharding == target[key], key
    # Only fingerprints (one uint32 per array) came to the host, not the tree.
    tree_bytes = sum(np.asarray(v).nbytes for v in want.values())
    assert host_bytes < 0.01 * tree_bytes, (host_bytes, tree_bytes)


def test_handoff_verifies_and_falls_back_past_a_damaged_record(tiny_setup, stage1, tmp_path):  # noqa: F811
    previous = tmp_path / "s1"
    shutil.copytree(stage1, previous)
    files = [p for p in (previous / CHECKPOINT_DIR / "2" / INTEGRITY).rglob("*") if p.is_file()]
    record_file = next(p for p in files if '"arrays"' in p.read_text())
    record = json.loads(record_file.read_text())
    record["arrays"]["params/heads/dense_384/kernel"] ^= 1  # as if the bytes had changed
    record_file.write_text(json.dumps(record))
    params, _, _ = _stage3_start(tiny_setup, tmp_path / "s3", previous)
    want = _flat(load_params(stage1, step=1)[0])  # step 2 fails its fingerprint: step 1 is used
    got = _flat(params)
    np.testing.assert_array_equal(
        np.asarray(got["heads/dense_384/kernel"]), want["heads/dense_384/kernel"]
    )


def test_handoff_with_another_shape_is_one_line(stage1):
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    target = {
        "heads": {
            "dense_384": {"kernel": jax.ShapeDtypeStruct((16, 384), jnp.float32, sharding=sharding)}
        }
    }
    with pytest.raises(UserError, match=r"heads/dense_384/kernel has shape \(32, 384\)"):
        ckpt.restore_params(stage1, target)


def test_async_save_returns_before_the_write_and_survives_donation(tmp_path):
    """`save` returns while the files are still being written; the state's buffers may be
    deleted (donated to the next step) at once, and the checkpoint still restores exactly."""
    mesh = jax.make_mesh((8,), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = {"w": jax.device_put(jnp.arange(8 * 2**20, dtype=jnp.float32).reshape(8, -1), sharding)}
    want, record = np.asarray(state["w"]), fingerprint.tree_fingerprints(state)
    checkpointer = ckpt.Checkpointer(tmp_path, {"run": 1}, keep=2)
    checkpointer.save(1, state, _NoData())
    in_flight = checkpointer.manager.is_saving_in_progress()
    state["w"].delete()  # what donate_argnums does to the saved state
    checkpointer.wait()
    assert in_flight
    target = {"w": jax.ShapeDtypeStruct(want.shape, want.dtype, sharding=sharding)}
    restored, step = checkpointer.restore_latest(target, _NoData())  # verifies the record
    assert step == 1 and restored["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(restored["w"]), want)
    assert fingerprint.tree_fingerprints(restored) == record
    checkpointer.close()


class _NoData:
    """A data iterator with a position to save (grain's handler stores its bytes)."""

    def __init__(self):
        self.state = b'{"position": 7}'

    def get_state(self) -> bytes:
        return self.state

    def set_state(self, state: bytes) -> None:
        self.state = state


def test_async_saves_resume_exactly_after_sigterm(tiny_setup, tmp_path):  # noqa: F811
    """SIGTERM while saves of every step are in flight: the preempted run's last save is on
    disk when it returns, and the resumed run ends with the uninterrupted run's losses."""
    fields = {
        "train.steps": 6,
        "train.checkpoint_every": 1,
        "mesh_shape": NEW_MESH,
        "model.head_init": "random",
    }
    loop.train_and_evaluate(tiny_settings(tiny_setup, 3, **fields), tmp_path / "a")
    reference = [m["train/loss"] for m in read_metrics(tmp_path / "a")]
    workdir = tmp_path / "b"

    sigterm_after_steps(workdir, 2, timeout=300)
    first = loop.train_and_evaluate(tiny_settings(tiny_setup, 3, **fields), workdir)
    assert first["status"] == "preempted" and 2 <= first["step"] < 6
    assert load_params(workdir)[1] == first["step"]  # committed before train_and_evaluate returned
    second = loop.train_and_evaluate(tiny_settings(tiny_setup, 3, **fields), workdir)
    assert second["status"] == "finished" and second["step"] == 6
    assert [m["train/loss"] for m in read_metrics(workdir)] == reference
