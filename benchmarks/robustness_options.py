"""Stage-3 options for quantisation-robust vectors: GOR and Matryoshka prefixes vs the baseline.

From one demo's stage 2 (`jasper-jax demo --skip-vision --workdir runs/demo`), trains stage-3
variants of the embedded default that differ only by `loss.*` overrides (same data, seed, steps),
exports each (`jasper-jax export`), evaluates each export (`jasper-jax eval`: held-out WordNet
retrieval in float32 and binarised, fidelity Spearman, at every head and Matryoshka prefix) and
prints one comparison table, appended to `benchmarks/results.md`; the teachers' scores from the
same evaluation are the reference rows.

    python -m benchmarks.robustness_options [--workdir runs/demo] [--variants baseline,gor10]

Resumable: a variant whose eval.json exists is not redone, nor an export that exists; an
interrupted training resumes from its last checkpoint. Everything lands in
WORKDIR/robustness/<variant>{,-export,-eval,-times.json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import report, table

ROOT = Path(__file__).resolve().parents[1]
CONFIG = f"{ROOT / 'configs' / 'embedded_default.py'}:3"
MRL = "(1152,512,256,128,64)"
# Variant name -> stage-3 config overrides (on top of the demo's data and init_from).
# GOR weights: the 1152-d teacher target's own mean off-diagonal cos^2 is about 0.02, and per
# pair 200 (s - t)^2 + w s^2 is least at s = t * 200 / (200 + w): w = 10 shrinks the student's
# pairwise cosines by ~5% against the similarity loss, w = 100 by ~33% (w = 1 would be noise).
VARIANTS: dict[str, dict[str, str]] = {
    "baseline": {},
    "gor10": {"loss.gor": "10"},
    "gor100": {"loss.gor": "100"},
    "mrl": {"loss.mrl_dims": MRL},
    "gor100_mrl": {"loss.gor": "100", "loss.mrl_dims": MRL},
}
FULL_HEAD, FULL_DIM = "dense_1152", 1152
TABLE_DIMS = (1152, 512, 256, 128, 64)  # full head at full width, then its prefixes
REDUCED_HEADS = ("dense_256", "dense_128")
LOSS_TERMS = ("total", f"cos/{FULL_HEAD}", f"sim/{FULL_HEAD}", f"resim/{FULL_HEAD}", "gor")


def jasper(*args: str) -> float:
    """Runs one `jasper-jax` command from the repository root; returns its wall seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jasper_jax.cli", *args], cwd=ROOT, check=True)
    return time.perf_counter() - start


def run_variant(demo: Path, name: str, reuse_stage3: bool) -> dict[str, float]:
    """Trains (unless reused or done), exports and evaluates one variant; returns wall seconds
    per phase (kept in <variant>-times.json so that a resumed run still reports them)."""
    out = demo / "robustness"
    train_dir = demo / "stage3" if reuse_stage3 else out / name
    export, evaluation = out / f"{name}-export", out / f"{name}-eval"
    times_file = out / f"{name}-times.json"
    times = json.loads(times_file.read_text()) if times_file.exists() else {}
    if not export.exists():
        if not reuse_stage3:
            overrides = {
                "init_from": demo / "stage2",
                "data.train_dir": demo / "data" / "train",
                "data.eval_dir": demo / "data" / "validation",
                **VARIANTS[name],
            }
            flags = [f"--config.{k}={v}" for k, v in overrides.items()]
            times["train_s"] = jasper(
                "train", "--config", CONFIG, "--workdir", str(train_dir), *flags
            )
        times["export_s"] = jasper("export", "--workdir", str(train_dir), "--output", str(export))
    if not (evaluation / "eval.json").exists():
        times["eval_s"] = jasper("eval", "--model", str(export), "--output", str(evaluation))
    out.mkdir(parents=True, exist_ok=True)
    times_file.write_text(json.dumps(times, indent=2) + "\n")
    return times


def loss_terms(train_dir: Path, last: int = 5) -> dict[str, float]:
    """Unweighted train loss terms, averaged over the last `last` logged steps."""
    lines = [json.loads(x) for x in (train_dir / "tb" / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "train/total" in x][-last:]
    keys = {k for x in train for k in x}
    return {
        t: sum(x[f"train/{t}"] for x in train) / len(train)
        for t in LOSS_TERMS
        if f"train/{t}" in keys
    }


def comparison_rows(name: str, result: dict, teachers: bool = False) -> list[list[object]]:
    """Table rows of one eval.json: the student's full head at each table dim, its reduced
    heads; with `teachers`, each teacher at full width instead."""
    rows = []
    for model in result["models"]:
        if (model["kind"] == "teacher") != teachers:
            continue
        by_key = {(r["output"], r["dim"], r["quant"]): r for r in model["rows"]}
        if teachers:
            outputs = [(model["default_output"], max(r["dim"] for r in model["rows"]))]
            label = f"teacher {model['name']}"
        else:
            outputs = [(FULL_HEAD, d) for d in TABLE_DIMS] + [
                (h, int(h.split("_")[1])) for h in REDUCED_HEADS
            ]
            label = name
        for output, dim in outputs:
            f, b = by_key[(output, dim, "float32")], by_key[(output, dim, "binary")]
            shown = f"{output} prefix" if output == FULL_HEAD and dim < FULL_DIM else output
            scores = (f["ndcg_at_10"], f["recall_at_1"], b["ndcg_at_10"], b["recall_at_1"])
            ratio = b["ndcg_at_10"] / f["ndcg_at_10"]
            rows.append(
                [label, shown, dim, *(f"{x:.4f}" for x in scores), f"{ratio:.3f}"]
                + [f"{f['spearman']:.4f}", f"{b['spearman']:.4f}"]
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/demo", help="a `jasper-jax demo` workdir")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"from {list(VARIANTS)}")
    p.add_argument(
        "--reuse-demo-stage3",
        action="store_true",
        help="use WORKDIR/stage3 as the baseline instead of training it again: the same config, "
        "and training is deterministic (a fresh run reproduced its losses and eval exactly)",
    )
    args = p.parse_args()
    demo = Path(args.workdir).resolve()
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown or not (demo / "stage2").is_dir():
        sys.exit(f"unknown variants {unknown} or no {demo / 'stage2'}: run `jasper-jax demo` first")
    rows, losses = [], []
    for name in names:
        reuse = name == "baseline" and args.reuse_demo_stage3
        times = run_variant(demo, name, reuse)
        result = json.loads((demo / "robustness" / f"{name}-eval" / "eval.json").read_text())
        rows += comparison_rows(name, result)
        terms = loss_terms(demo / "stage3" if reuse else demo / "robustness" / name)
        losses.append(
            [name, *(terms.get(t, "–") for t in LOSS_TERMS)]
            + [f"{times[k]:.0f}" if k in times else "–" for k in ("train_s", "export_s", "eval_s")]
        )
    rows += comparison_rows("", result, teachers=True)
    task, held = result["task"], result["heldout"]
    note = (
        f"\nHeld-out WordNet example -> definition retrieval ({task['queries']} queries, "
        f"{task['documents']} documents); binary = sign bits ranked by Hamming distance; "
        f"Spearman of pairwise similarities vs the {held['target_dim']}-d teacher target on "
        f"{held['texts']} held-out texts. Variants: "
        + "; ".join(f"{n} {VARIANTS[n] or 'no overrides'}" for n in names)
        + ". Stage 3 from the demo's stage 2, 150 steps, batch 64.\n\nUnweighted train loss "
        "terms (mean of the last 5 logged steps) and wall seconds:\n\n"
        + table(["variant", *LOSS_TERMS, "train s", "export s", "eval s"], losses)
    )
    headers = [
        "variant",
        "output",
        "dim",
        "float nDCG@10",
        "float R@1",
        "binary nDCG@10",
        "binary R@1",
        "binary/float nDCG",
        "Spearman float",
        "Spearman binary",
    ]
    report("Quantisation-robust options, stage 3 of the embedded default", headers, rows, note)


if __name__ == "__main__":
    main()
