"""Stage hand-off: peak host memory (RSS) and time, old path vs new, on 8 fake CPU devices.

The previous stage (a BERT-shaped student, a few hundred MB of float32 params, Adam moments
in its checkpoint) is saved on one mesh; the next stage (one head more) starts on another.

- old path: `run_folder.load_params` (the whole state restored on the saved shardings,
  verified, pulled to the host with `jax.device_get`), then every leaf put back with
  `jax.device_put(np.asarray(...))` on the new shardings (what `train.start` did before);
- new path: `train.checkpoint.restore_params` (only the params both stages have, read
  straight into the new stage's shardings, verified on device).

Each path runs in a fresh process, so `ru_maxrss` is its own peak; the table gives it above
the process's RSS before the hand-off. On CPU the devices' buffers live in host memory too,
so both figures include the restored arrays themselves ("on devices": what every path must
hold at the end); the old path's extra is its host copy and the previous mesh's copies.

    python -m benchmarks.stage_handoff [--hidden 768] [--layers 4] [--previous-mesh 8,1,1]
        [--mesh 2,2,2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

MB = 1 << 20


def _config(hidden: int, layers: int, heads: tuple[int, ...]):
    from jasper_jax.models.bert import BertConfig
    from jasper_jax.models.embedder import EmbedderConfig

    encoder = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden,
    )
    return EmbedderConfig(encoder=encoder, pooling="mean", heads=heads)


def _shardings(config, mesh_text: str):
    """(unboxed abstract params, their shardings) of `config` on the mesh `mesh_text`."""
    import flax.linen as nn

    from jasper_jax import sharding
    from jasper_jax.models.embedder import abstract_params

    mesh = sharding.make_mesh(sharding.parse_mesh_shape(mesh_text))
    abstract = abstract_params(config)
    return nn.meta.unbox(abstract), sharding.param_shardings(abstract, mesh)


class _Data:
    """A data iterator position (what the checkpoint's "data" item stores)."""

    def get_state(self) -> bytes:
        return b'{"position": 0}'

    def set_state(self, state: bytes) -> None:
        pass


def write_previous(workdir: str, args) -> dict:
    """Saves the previous stage's state (params, Adam moments) as a real checkpoint."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jasper_jax.models.embedder import init_params
    from jasper_jax.train.checkpoint import Checkpointer

    config = _config(args.hidden, args.layers, (1024,))
    _, shardings = _shardings(config, args.previous_mesh)
    init = jax.jit(lambda rng: nn.meta.unbox(init_params(config, rng)), out_shardings=shardings)
    params = init(jax.random.key(0))
    moments = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p), out_shardings=shardings)
    mesh = jax.tree.leaves(shardings)[0].mesh  # the step count is replicated, as in training
    step = jax.device_put(
        jnp.int32(1), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    )
    state = {"step": step, "params": params, "opt_state": [moments(params), moments(params)]}
    checkpointer = Checkpointer(workdir, {"benchmark": "stage_handoff"}, keep=1)
    checkpointer.save(1, state, _Data())
    checkpointer.close()
    return {"param_mb": sum(x.nbytes for x in jax.tree.leaves(params)) / MB}


def hand_off(workdir: str, path: str, args) -> dict:
    """One hand-off into the next stage's shardings; its peak RSS, time and fingerprints."""
    import jax
    import numpy as np
    from flax import traverse_util

    from benchmarks.common import memory_mb
    from jasper_jax import fingerprint
    from jasper_jax.run_folder import load_params
    from jasper_jax.train.checkpoint import restore_params

    config = _config(args.hidden, args.layers, (1024, 256))
    shapes, shardings = _shardings(config, args.mesh)
    flat_sh = traverse_util.flatten_dict(shardings)
    target = {
        p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=flat_sh[p])
        for p, x in traverse_util.flatten_dict(shapes).items()
    }
    before, start = memory_mb(), time.perf_counter()
    if path == "old":
        previous = traverse_util.flatten_dict(load_params(workdir)[0])
        params = {
            p: jax.device_put(np.asarray(previous[p], np.float32), t.sharding)
            for p, t in target.items()
            if p in previous
        }
        del previous
    else:
        params = restore_params(workdir, traverse_util.unflatten_dict(target))[0]
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
    assert all(params[p].sharding == target[p].sharding for p in params)
    on_devices = sum(s.data.nbytes for x in params.values() for s in x.addressable_shards)
    named = {"/".join(p): x for p, x in params.items()}
    return {
        "peak_mb": peak - before,
        "seconds": seconds,
        "on_devices_mb": on_devices / MB,
        "fingerprints": fingerprint.tree_fingerprints(named),
    }


ENV = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _child(role: str, workdir: str, args) -> dict:
    env = {**os.environ, **ENV}
    command = [sys.executable, "-m", "benchmarks.stage_handoff", "--child", role, workdir]
    command += ["--hidden", str(args.hidden), "--layers", str(args.layers)]
    command += ["--previous-mesh", args.previous_mesh, "--mesh", args.mesh]
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--previous-mesh", default="8,1,1")
    parser.add_argument("--mesh", default="2,2,2")
    parser.add_argument("--child", nargs=2, metavar=("ROLE", "WORKDIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        role, workdir = args.child
        run = write_previous if role == "write" else lambda w, a: hand_off(w, role, a)
        print(json.dumps(run(workdir, args)))
        return
    os.environ.update(ENV)  # results.md names the 8 devices the children ran on
    from benchmarks.common import report

    with tempfile.TemporaryDirectory() as root:
        size = _child("write", root, args)["param_mb"]
        old, new = _child("old", root, args), _child("new", root, args)
    assert old["fingerprints"] == new["fingerprints"], "the two paths restored different params"
    rows = [
        [name, r["peak_mb"], r["on_devices_mb"], r["seconds"]]
        for name, r in (("old: load_params + device_put", old), ("new: restore_params", new))
    ]
    report(
        f"Stage hand-off {args.previous_mesh} -> {args.mesh}, 8 CPU devices, "
        f"{size:.0f} MB of params (BERT {args.hidden} x {args.layers} layers)",
        ["path", "peak RSS above start (MB)", "restored, on devices (MB)", "seconds"],
        rows,
        f"old/new peak RSS: {old['peak_mb'] / max(new['peak_mb'], 1e-9):.2f}x; both paths "
        "restore the same arrays (fingerprints equal). CPU devices keep their buffers in host "
        "memory, so both peaks include the restored arrays.",
    )


if __name__ == "__main__":
    main()
