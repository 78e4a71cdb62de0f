"""Stage 3 of the embedded default three ways on the same pair data: distillation only,
contrastive only (InfoNCE), both (issue 18; jina-embeddings-v5's finding is that both win).

From one demo's stage 2 (`jasper-jax demo --skip-vision --workdir runs/demo`) and its held-out
set, builds a pair teacher dataset of `--pairs` WordNet train pairs (usage example -> its
synset's gloss, one hard negative: a neighbouring synset's gloss), trains stage 3 on it once per
variant (same stage 2, data, seed, steps, batch; only `loss.*` differs), and scores every head on
the demo's held-out set: retrieval nDCG@10 / R@1 in float32 and binarised (sign bits, Hamming),
fidelity (cosine to the teacher target, Spearman of pairwise similarities). Each difference
between variants gets a 95% paired-bootstrap interval over the held-out queries. The stage-2
start, the demo's own stage 3 (distillation on single texts) and the teachers are reference
rows. Prints the tables, appends them to `benchmarks/results.md`, and writes
WORKDIR/contrastive/{results.json,results.png}.

    python -m benchmarks.contrastive_options [--workdir runs/demo] [--pairs 4800]

Resumable: a finished variant is not trained again (an interrupted one resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import report, table

# Variant -> overrides of the embedded default's `pairs` recipe (stage 3 on pair data,
# distillation + InfoNCE with a learned temperature): "both" is that recipe as it is.
DISTILL_OFF = {"loss.cosine": 0.0, "loss.similarity": 0.0, "loss.relative_similarity": 0.0}
VARIANTS: dict[str, dict] = {
    "distill": {"loss.infonce": 0.0},
    "contrastive": DISTILL_OFF,
    "both": {},
}
# (a, b): a - b is bootstrapped on every head and quantisation.
DIFFERENCES = (("both", "distill"), ("contrastive", "distill"), ("both", "contrastive"))
HEADS = ("dense_1152", "dense_256", "dense_128")
QUANTS = ("float", "binary")


def build_pairs(out: Path, n: int, teachers: tuple[str, ...]) -> Path:
    from jasper_jax.data.pair_dataset import build_pair_dataset
    from jasper_jax.data.pairs import read_pairs

    pairs = read_pairs("embedded", split="train", negatives=1).spread(n)
    build_pair_dataset(pairs, list(teachers), out / "pairs")
    return out / "pairs"


def train_variant(demo: Path, out: Path, name: str, pairs_dir: Path, steps: int) -> float:
    """Trains one variant (resuming an interrupted run); returns its wall seconds."""
    from jasper_jax.demo.main import stage_settings
    from jasper_jax.train.loop import train_and_evaluate

    overrides = {
        "init_from": str(demo / "stage2"),
        "data.train_dir": str(pairs_dir),
        "data.eval_dir": "",
        "train.steps": steps,
        **VARIANTS[name],
    }
    start = time.perf_counter()
    result = train_and_evaluate(stage_settings("pairs", overrides), out / name)
    if result["status"] != "finished":
        sys.exit(f"{name}: training stopped ({result['status']}); re-run to resume")
    return time.perf_counter() - start


def score_model(model, heldout, heads, max_length: int) -> dict:
    """Per head: fidelity and float retrieval (`HeldOut.score`), binary retrieval, and the
    per-query nDCG@10 gains of both (for the bootstrap); role prompts as `encode_heldout`."""
    from jasper_jax.encode import TextEncoder
    from jasper_jax.evaluation.heldout import encode_heldout

    vectors = encode_heldout(TextEncoder(model, batch_size=64), heldout, heads, max_length)
    return {head: score_vectors(heldout, v) for head, v in vectors.items()}


def score_vectors(heldout, vectors: np.ndarray) -> dict:
    from jasper_jax.evaluation import retrieval
    from jasper_jax.vectors import unit_rows

    vectors = unit_rows(vectors)
    scores = heldout.score(vectors)
    q, d = vectors[heldout.query_rows], vectors[heldout.document_rows]
    for quant in QUANTS:
        ranks = retrieval.query_ranks(q, d, heldout.relevant, binary=quant == "binary")
        scores[f"{quant}_gains"] = retrieval.ndcg_gains(ranks).tolist()
        scores[f"{quant}_ndcg_at_10"] = float(np.mean(scores[f"{quant}_gains"]))
        scores[f"{quant}_recall_at_1"] = float(np.mean(ranks == 1))
    return scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/demo", help="a `jasper-jax demo` workdir")
    p.add_argument("--pairs", type=int, default=0, help="WordNet train pairs (0: data.train_pairs)")
    p.add_argument("--steps", type=int, default=150, help="stage-3 steps of every variant")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"from {list(VARIANTS)}")
    args = p.parse_args()
    demo = Path(args.workdir).resolve()
    names = [n for n in args.variants.split(",") if n]
    if set(names) - set(VARIANTS) or not (demo / "stage2").is_dir():
        sys.exit(f"unknown variants in {names} or no {demo / 'stage2'}: run the demo first")
    from jasper_jax.demo.main import load_heldout, retrieval_task, stage_settings
    from jasper_jax.run_folder import load_workdir_model

    s = stage_settings("pairs", {})
    out = demo / "contrastive"
    heldout = load_heldout(demo / "data" / "validation", s, retrieval_task(quick=False))
    began = time.perf_counter()
    args.pairs = args.pairs or s.data.train_pairs
    pairs_dir = build_pairs(out, args.pairs, s.teachers)
    seconds = {"teacher pass": time.perf_counter() - began}
    results = {}
    for name in names:
        seconds[name] = train_variant(demo, out, name, pairs_dir, args.steps)
        results[name] = score_model(
            load_workdir_model(out / name)[0], heldout, HEADS, s.data.max_length
        )
    references = {
        "stage 2 (start)": demo / "stage2",
        "demo stage 3 (single texts)": demo / "stage3",
    }
    for label, workdir in references.items():
        if workdir.is_dir():
            model = load_workdir_model(workdir)[0]
            results[label] = score_model(model, heldout, model.config.head_names, s.data.max_length)
    teachers = {
        name: {"embedding": score_vectors(heldout, heldout.stored[:, a:b])}
        for name, (a, b) in heldout.teacher_slices.items()
    }
    teachers["teacher target"] = {"embedding": score_vectors(heldout, heldout.stored)}
    summary = summarize(results, teachers, names, seconds, args)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, out / "results.png")


def summarize(results: dict, teachers: dict, names: list[str], seconds: dict, args) -> dict:
    """Prints and records the score table, the bootstrap table and the times."""
    rows = []
    for label, by_head in {**results, **teachers}.items():
        for head, sc in by_head.items():
            cosine = sc.get("cosine")
            rows.append(
                [label, head]
                + [f"{sc[f'{q}_{m}']:.4f}" for q in QUANTS for m in ("ndcg_at_10", "recall_at_1")]
                + [f"{cosine:.4f}" if cosine is not None else "n/a", f"{sc['spearman']:.4f}"]
            )
    diffs = []
    for a, b in DIFFERENCES:
        if a in results and b in results:
            for head in HEADS:
                for quant in QUANTS:
                    d, low, high = bootstrap(results[a][head], results[b][head], quant)
                    diffs.append(
                        [f"{a} - {b}", head, quant, f"{d:+.4f}", f"[{low:+.4f}, {high:+.4f}]"]
                    )
    headers = ["model", "output", "float nDCG@10", "float R@1", "binary nDCG@10", "binary R@1"]
    headers += ["cosine to target", "Spearman"]
    note = (
        f"\nHeld-out WordNet example -> definition retrieval (1000 queries over the demo's "
        f"definitions); fidelity on the demo's 1000 held-out texts. Stage 3 from the demo's "
        f"stage 2, {args.steps} steps of 64 pairs ({args.pairs} WordNet train pairs, one hard "
        "negative each: 3 texts a pair, every text with its teacher vector), lr 5e-5; "
        "variants: " + "; ".join(f"{n}: {VARIANTS[n]}" for n in names) + ".\n\n"
        "nDCG@10 differences, 95% paired bootstrap over the queries (2000 resamples):\n\n"
        + table(["difference", "head", "quant", "nDCG@10", "95% interval"], diffs)
        + "\n\nWall seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
    )
    report(
        "Distillation vs contrastive vs both, stage 3 of the embedded default", headers, rows, note
    )
    strip = lambda sc: {k: v for k, v in sc.items() if not k.endswith("_gains")}
    return {
        "scores": {
            m: {h: strip(sc) for h, sc in by.items()} for m, by in {**results, **teachers}.items()
        },
        "differences": diffs,
        "seconds": seconds,
        "pairs": args.pairs,
        "steps": args.steps,
    }


def bootstrap(a: dict, b: dict, quant: str) -> tuple[float, float, float]:
    from jasper_jax.evaluation.retrieval import paired_bootstrap

    return paired_bootstrap(np.array(a[f"{quant}_gains"]), np.array(b[f"{quant}_gains"]))


def plot(summary: dict, path: Path) -> None:
    """Float and binary nDCG@10 per variant and head, teachers as lines."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4))
    for k, quant in enumerate(QUANTS):
        ax = fig.add_subplot(1, 2, k + 1)
        models = [m for m in summary["scores"] if "dense_1152" in summary["scores"][m]]
        width = 0.8 / len(HEADS)
        for j, head in enumerate(HEADS):
            values = [
                summary["scores"][m].get(head, {}).get(f"{quant}_ndcg_at_10", 0) for m in models
            ]
            ax.bar(np.arange(len(models)) + j * width, values, width, label=head)
        for sc in summary["scores"].values():
            if "embedding" in sc:
                ax.axhline(sc["embedding"][f"{quant}_ndcg_at_10"], ls=":", lw=1, color="gray")
        ax.set_xticks(np.arange(len(models)) + width, models, rotation=30, ha="right", fontsize=7)
        ax.set_title(f"{quant} nDCG@10 (dotted: teachers)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
