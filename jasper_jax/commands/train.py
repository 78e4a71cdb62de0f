"""`jasper-jax train`: one stage from a config file, with command-line overrides."""

from __future__ import annotations

import argparse
import json
import logging
import os

import jax

from jasper_jax.config import load_settings
from jasper_jax.errors import UserError
from jasper_jax.train.loop import train_and_evaluate

log = logging.getLogger(__name__)


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="configs/NAME.py[:STAGE] or NAME[:STAGE]")
    p.add_argument("--workdir", required=True, help="checkpoints, TensorBoard logs, run.json")
    add_distributed_args(p)


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "multi-host (a TPU pod slice initialises itself; these are for CPU/GPU)"
    )
    g.add_argument("--coordinator", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def initialize_distributed(args: argparse.Namespace) -> None:
    """`jax.distributed.initialize` for pods (auto-detected) or explicit local processes."""
    if args.coordinator:
        if (
            jax.config.jax_platforms in (None, "", "cpu")
            or os.environ.get("JAX_PLATFORMS") == "cpu"
        ):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        jax.distributed.initialize()  # a multi-host TPU slice: everything comes from the metadata
    log.info(
        "process %d of %d; %d local / %d global devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )


def split_overrides(argv_rest: list[str]) -> list[str]:
    bad = [a for a in argv_rest if not a.startswith("--config.")]
    if bad:
        raise UserError(f"unrecognised arguments {bad}; overrides look like --config.optim.lr=3e-5")
    return argv_rest


def main(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, split_overrides(args.overrides))
    initialize_distributed(args)
    result = train_and_evaluate(settings, args.workdir)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in result.items()}, indent=2, default=str))
    return 0 if result["status"] == "finished" else 143
