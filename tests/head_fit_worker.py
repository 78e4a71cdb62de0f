"""Fits closed-form heads on fixed random features over a mesh; run by tests/test_head_init.py,
in this process or as one of several `jax.distributed` processes.

python -m tests.head_fit_worker OUT.npz MESH [COORDINATOR NUM_PROCESSES PROCESS_ID]
"""

from __future__ import annotations

import ast
import sys

import jax
import numpy as np

ROWS, FEATURES, TARGET, BATCH = 96, 12, 20, 16


def problem() -> dict[str, np.ndarray]:
    """Features [ROWS, FEATURES] (a nonlinear map happens on device), targets, masks."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ROWS, FEATURES)).astype(np.float32)
    t = (np.tanh(x @ rng.normal(size=(FEATURES, TARGET))) + 0.1).astype(np.float32)
    mask = np.ones((ROWS, 4), np.int32)
    mask[-5:] = 0  # padding rows: they must count for nothing
    return {"features": x, "teacher": t, "attention_mask": mask}


def features_fn(params, batch):
    return jax.numpy.sin(batch["features"]) * params["scale"]


def fit(mesh_shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """Full head (20-d) and a reduced 6-d head, fitted over `mesh_shape`; this process feeds
    only its own rows of every batch."""
    from jasper_jax import sharding
    from jasper_jax.train import head_init

    mesh = sharding.make_mesh(mesh_shape)
    data = problem()
    share = BATCH // jax.process_count()
    mine = slice(jax.process_index() * share, (jax.process_index() + 1) * share)

    def batches():
        for start in range(0, ROWS, BATCH):
            out = {}
            for key, value in data.items():
                local = value[start : start + BATCH][mine]
                spec = sharding.batch_sharding(mesh, local.ndim)
                out[key] = jax.make_array_from_process_local_data(
                    spec, local, (BATCH, *local.shape[1:])
                )
            yield out

    params = {"scale": jax.numpy.float32(1.5)}
    moments = head_init.accumulate_moments(features_fn, params, batches(), mesh)
    heads = head_init.closed_form_heads(moments, {"full": TARGET, "small": 6}, TARGET, ridge=1e-3)
    return {
        "full_kernel": heads["full"]["kernel"],
        "full_bias": heads["full"]["bias"],
        "small_kernel": heads["small"]["kernel"],
        "small_bias": heads["small"]["bias"],
        "count": np.array(moments.count),
    }


def main(argv: list[str]) -> None:
    out, mesh = argv[0], ast.literal_eval(argv[1])
    if len(argv) > 2:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(argv[2], int(argv[3]), int(argv[4]))
    result = fit(mesh)
    if jax.process_index() == 0:
        np.savez(out, **result)


if __name__ == "__main__":
    main(sys.argv[1:])
