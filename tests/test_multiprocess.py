"""Two local processes x 4 fake CPU devices (jax.distributed on 127.0.0.1) train like 1 device."""

import json
import sys

import numpy as np

from jasper_jax.train.loop import train_and_evaluate
from tests.local_processes import run_processes
from tests.train_fixtures import (  # noqa: F401
    read_metrics,
    tiny_config,
    tiny_overrides,
    tiny_settings,
    tiny_setup,
)


def test_two_processes_match_one_device(tiny_setup, tmp_path):  # noqa: F811
    one = train_and_evaluate(tiny_settings(tiny_setup, 3), tmp_path / "one")
    overrides = tiny_overrides(tiny_setup, 3, mesh_shape=(2, 4, 1))
    outputs = run_processes(
        lambda i, port: [
            sys.executable,
            "-m",
            "jasper_jax.cli",
            "train",
            "--config",
            "configs/embedded_default.py:3",
            "--workdir",
            str(tmp_path / "two"),
            f"--coordinator=127.0.0.1:{port}",
            "--num-processes=2",
            f"--process-id={i}",
            *overrides,
        ]
    )
    assert "process 1 of 2; 4 local / 8 global devices" in outputs[1]
    a = [m["train/loss"] for m in read_metrics(tmp_path / "one")]
    b = [m["train/loss"] for m in read_metrics(tmp_path / "two")]
    assert len(a) == len(b) == 3
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    # Held-out evaluation ran over the global mesh too, with the same result.
    key = "eval/dense_384/cosine"
    evals = [json.loads(line) for line in (tmp_path / "two/tb/metrics.jsonl").open()]
    two_cosine = [r[key] for r in evals if key in r]
    assert two_cosine, evals[-1]
    np.testing.assert_allclose(two_cosine[-1], one["eval"]["dense_384"]["cosine"], rtol=1e-5)
