"""`jasper-jax demo`: the embedded default end to end (`jasper_jax.demo.main`), then a table of
what each stage bought. Re-running the same command resumes: finished datasets and stages are
kept."""

from __future__ import annotations

import argparse
from pathlib import Path

from jasper_jax.demo.main import run_demo
from jasper_jax.locks import FolderLock


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", default="runs/demo", help="where data, checkpoints, results go")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a tiny budget for a smoke run (~2 min)")
    size.add_argument(
        "--large",
        action="store_true",
        help="36k train texts, 1300 steps over stages 2-3 (under an hour on 2 CPU cores)",
    )
    p.add_argument("--skip-vision", action="store_true", help="leave out stage 4 (images)")
    p.add_argument(
        "--skip-long", action="store_true", help="leave out the long-document (chunk) step"
    )


def main(args: argparse.Namespace) -> int:
    # One demo per workdir; its stages and teacher builds lock their own sub-folders too.
    with FolderLock(args.workdir, "demo"):
        return run_demo(
            Path(args.workdir),
            quick=args.quick,
            large=args.large,
            long=not args.skip_long,
            vision=not args.skip_vision,
        )
