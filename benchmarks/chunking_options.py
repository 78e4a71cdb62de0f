"""Chunk alignment trained on fixed sentence chunks vs dewey's random mix, read at several
inference chunkings.

From a `jasper-jax demo` workdir whose long-document step has run (WORKDIR/stage3 and
WORKDIR/stage3_long, trained on `sentences:32` chunks), trains the same step again on the same
documents cut by `random:MIN:MAX` (per document a size, a 30-60 % overlap and sentences or token
windows, as dewey_en_beta), then scores held-out long-document retrieval (best chunk, and the
document vector) for the stage-3 student and both chunk-aligned students with the documents cut
several ways at inference; the teacher target's best chunk (each chunk encoded alone) is the
reference. Prints one table, appended to `benchmarks/results.md`.

    python -m benchmarks.chunking_options [--workdir runs/demo] [--random random:16:64]

Resumable: the teacher data and the training resume where they stopped.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from benchmarks.common import report

INFERENCE = ("sentences:16", "sentences:32", "sentences:64", "tokens:24:8")


def teacher_best_chunk(teachers, task) -> float:
    """nDCG@10 of the teacher target's best chunk (chunks encoded alone by every teacher)."""
    from jasper_jax.evaluation.long_documents import best_chunk_scores
    from jasper_jax.evaluation.retrieval import rank_of_relevant, retrieval_metrics
    from jasper_jax.evaluation.runner import combined_target

    def encode(texts):
        return combined_target([t.encode(texts)[t.default_output] for t in teachers])

    texts = [d[a:b] for d, spans in zip(task.documents, task.spans, strict=True) for a, b in spans]
    owner = np.repeat(np.arange(len(task.spans)), [len(s) for s in task.spans])
    scores = best_chunk_scores(encode(task.queries), encode(texts), owner, len(task.documents))
    return retrieval_metrics(rank_of_relevant(scores, task.relevant))["ndcg_at_10"]


def main() -> None:
    from jasper_jax.demo.long_documents import (
        build_long_data,
        heldout_fidelity,
        long_settings,
        student_tokenizer,
    )
    from jasper_jax.errors import UserError
    from jasper_jax.evaluation.long_documents import long_document_task, student_rows
    from jasper_jax.evaluation.models import teacher_model
    from jasper_jax.evaluation.teacher_cache import default_cache_dir
    from jasper_jax.run_folder import load_any_model
    from jasper_jax.train.loop import train_and_evaluate

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/demo", help="a `jasper-jax demo` workdir")
    p.add_argument("--random", default="random:16:64", help="the random chunking to train on")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    workdir = Path(args.workdir)
    if not (workdir / "stage3_long").is_dir():
        raise SystemExit(f"{workdir}/stage3_long is missing: run `jasper-jax demo` first")
    base = long_settings(workdir, quick=False)
    name = args.random.replace(":", "_")
    out = workdir / "chunking"
    variant = long_settings(
        workdir,
        quick=False,
        **{
            "data.train_dir": out / f"data_{name}",
            "data.chunking": args.random,
            # Overlapping and small chunks: more per document than the demo's 12 slots.
            "data.max_chunks": 24,
        },
    )
    low, high = base.data.document_tokens
    tokenizer = student_tokenizer(base)

    def task_for(chunking: str):
        return long_document_task(
            tokenizer,
            min_tokens=low,
            max_tokens=high,
            max_documents=base.data.eval_texts,
            max_queries=400,
            chunking=chunking,
            seed=base.seed,
        )

    start = time.perf_counter()
    build_long_data(variant, task_for(base.data.chunking))  # the eval data is the demo's own
    result = train_and_evaluate(variant, out / name)
    if result["status"] != "finished":
        raise UserError(f"training stopped ({result['status']}); re-run to resume")
    seconds = time.perf_counter() - start
    students = {
        "stage 3": workdir / "stage3",
        f"aligned on {base.data.chunking}": workdir / "stage3_long",
        f"aligned on {args.random}": out / name,
    }
    models = {label: load_any_model(path) for label, path in students.items()}
    teachers = [teacher_model(t, cache_dir=default_cache_dir()) for t in base.teachers]
    rows, documents = [], {}
    for chunking in INFERENCE:
        task = task_for(chunking)
        chunks = sum(len(s) for s in task.spans) / len(task.spans)
        row = [chunking, f"{chunks:.1f}", f"{teacher_best_chunk(teachers, task):.4f}"]
        for label, model in models.items():
            scores = student_rows(model, task)
            row.append(f"{scores['best chunk']['ndcg_at_10']:.4f}")
            documents[label] = scores["document vector"]["ndcg_at_10"]
        rows.append(row)
    rows.append(["document vector", "1", "", *(f"{documents[k]:.4f}" for k in models)])
    head = f"dense_{max(base.model.heads)}"
    fidelity = []
    for label, path in students.items():
        fid = heldout_fidelity(base, path)
        fidelity.append(
            f"- {label}: held-out {base.data.chunking} chunk cosine "
            f"{fid[f'chunks/{head}']['cosine']:.4f}, chunk Spearman "
            f"{fid[f'chunks/{head}']['spearman']:.4f}, document Spearman "
            f"{fid[head]['spearman']:.4f}"
        )
    report(
        "Long documents: chunk alignment on fixed vs random chunks (best-chunk nDCG@10)",
        ["inference chunks", "chunks/doc", "teacher", *(f"student {k}" for k in models)],
        rows,
        f"{len(task.queries)} held-out queries over {len(task.documents)} documents of "
        f"{low}-{high} tokens; each student reads a document once. Training the {args.random} "
        f"variant (data + {base.train.steps} steps): {seconds:.0f} s.\n\n" + "\n".join(fidelity),
    )


if __name__ == "__main__":
    main()
