"""`jasper-jax export`: a workdir's checkpoint -> a Hugging Face / sentence-transformers folder."""

from __future__ import annotations

import argparse

from jasper_jax.calibration import CalibrationTexts
from jasper_jax.commands.encode_io import read_texts
from jasper_jax.export import export_workdir


def add_args(p: argparse.ArgumentParser) -> None:
    """The flags of `jasper-jax export`."""
    p.add_argument("--workdir", required=True, help="a `jasper-jax train` workdir")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    p.add_argument("--output", required=True, help="folder to create (written atomically)")
    p.add_argument(
        "--default-head",
        default=None,
        help="head modules.json runs: 'dense_<dim>', '<dim>' or 'pooled' (default: the "
        "full teacher-dim head)",
    )
    p.add_argument("--max-seq-length", type=int, default=None, help="default: the training one")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a previous export at --output (a folder holding jasper_export.json; "
        "never the workdir, the current folder or a parent of them)",
    )
    p.add_argument(
        "--onnx",
        nargs="*",
        default=None,
        metavar="HEAD",
        help="also write OUT/onnx/<head>.onnx and <head>_int8.onnx: token ids -> that head's "
        "unit vector (pooling, Dense, Normalize inside); no HEAD: the default head "
        "(needs `pip install 'jasper-jax[onnx]'`)",
    )
    p.add_argument(
        "--calibration",
        default=None,
        metavar="TEXTS",
        help="UTF-8 file, one text per line (e.g. a sample of the corpus you will store): "
        "write OUT/calibration.json, every output's per-dimension min/max on these texts "
        "(document prompt), which `encode --precision int8|uint8` uses",
    )


def main(args: argparse.Namespace) -> int:
    """Exports, then prints one line: step, output, heads, default head, vision tower."""
    calibration = None
    if args.calibration:
        calibration = CalibrationTexts.from_file(args.calibration, read_texts(args.calibration))
    summary = export_workdir(
        args.workdir,
        args.output,
        step=args.step,
        default_head=args.default_head,
        overwrite=args.overwrite,
        max_seq_length=args.max_seq_length,
        onnx_heads=args.onnx,
        calibration=calibration,
    )
    heads = ", ".join(f"2_Dense_{d}" for d in summary["heads"]) or "none"
    print(
        f"exported step {summary['step']} to {summary['output']} (heads: {heads}; default: "
        f"{summary['default_head']}{'; vision/ tower' if summary['vision'] else ''})"
    )
    if summary.get("onnx"):
        onnx_heads = ", ".join(summary["onnx"])
        print(f"ONNX graphs (fp32, int8) of {onnx_heads} in {summary['output']}/onnx")
    if summary.get("calibration"):
        count = summary["calibration"]["count"]
        print(f"int8 calibration ranges ({count} texts) in {summary['output']}/calibration.json")
    return 0
