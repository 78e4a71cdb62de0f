"""What each stage bought: one table (markdown) and one picture (PNG) of held-out scores.

A row is (model, output, scores) with scores from `HeldOut.score`: cosine to the teacher target
(where dims match), Spearman of pairwise similarities, and held-out retrieval nDCG@10 / R@1.
Teacher rows are references; student rows follow the stages in order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: `model` (e.g. "stage 2"), `output` (a head or "pooled")."""

    model: str
    output: str
    scores: dict[str, float]
    reference: bool = False  # a teacher or the target, drawn as a horizontal line


def _cell(scores: dict[str, float], key: str, digits: int = 4) -> str:
    return f"{scores[key]:.{digits}f}" if key in scores else "n/a"


def markdown_table(rows: Sequence[Row]) -> str:
    lines = [
        "| model | output | held-out cosine to teacher target | held-out Spearman "
        "| retrieval nDCG@10 | retrieval R@1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r.scores
        lines.append(
            f"| {r.model} | {r.output} | {_cell(s, 'cosine')} | {_cell(s, 'spearman')} | "
            f"{_cell(s, 'ndcg_at_10')} | {_cell(s, 'recall_at_1', 3)} |"
        )
    return "\n".join(lines)


def plot_learning(rows: Sequence[Row], path: Path, title: str = "") -> Path:
    """Spearman and nDCG@10 of each student output over the stages (teachers as dashed
    lines); writes a PNG at `path`."""
    students = [r for r in rows if not r.reference]
    steps = list(dict.fromkeys(r.model for r in students))
    outputs = list(dict.fromkeys(r.output for r in students))
    # A pyplot-free Figure: no global backend or figure registry is touched.
    fig = Figure(figsize=(15, 4.6))
    axes = fig.subplots(1, 3)
    metrics = (("cosine", "held-out cosine to target"), ("spearman", "held-out Spearman"))
    metrics += (("ndcg_at_10", "retrieval nDCG@10"),)
    references = [r for r in rows if r.reference]
    for ax, (key, label) in zip(axes, metrics, strict=True):
        for k, output in enumerate(outputs):  # one colour per output in every panel
            points = [
                (steps.index(r.model), r.scores[key])
                for r in students
                if r.output == output and key in r.scores
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=output, color=f"C{k}")
        for k, ref in enumerate(references):
            if key not in ref.scores:
                continue
            color = f"C{k + len(outputs)}"
            ax.axhline(ref.scores[key], ls="--", lw=1, color=color)
            ax.annotate(
                ref.model,
                (len(steps) - 1, ref.scores[key]),
                fontsize=8,
                ha="right",
                va="bottom",
                color=color,
            )
        ax.set_xticks(range(len(steps)), steps, rotation=25, ha="right", fontsize=8)
        ax.set_title(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
