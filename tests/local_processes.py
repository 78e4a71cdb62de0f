"""Several local processes that form one jax.distributed run on 127.0.0.1 (4 fake CPU devices
each), as the multi-host tests start them."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable


def free_port() -> int:
    """A TCP port nothing listens on now, for the coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(
    argv: Callable[[int, int], list[str]], count: int = 2, timeout: float = 300
) -> list[str]:
    """Runs `argv(process_id, port)` for each process at once; returns their outputs (stdout
    and stderr) after asserting that every one exited 0."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    env["JAX_PLATFORMS"] = "cpu"
    port = free_port()
    procs = [
        subprocess.Popen(
            argv(i, port), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for i in range(count)
    ]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outputs
