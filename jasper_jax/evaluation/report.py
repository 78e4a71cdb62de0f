"""Evaluation results as markdown tables and a quality-vs-size plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _params(n: int) -> str:
    return f"{n / 1e6:.1f}M"


def default_row(model: dict) -> dict:
    """The float32 row of a model's default output at its full width."""
    return next(
        r
        for r in model["rows"]
        if r["output"] == model["default_output"] and not r["prefix"] and r["quant"] == "float32"
    )


def summary_table(result: dict) -> str:
    """One line per model: size, speed, and the default output's scores."""
    lines = [
        "| model | params | texts/s | dim | nDCG@10 | recall@1 | Spearman | NN recall@10 "
        "| cosine |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in result["models"]:
        r = default_row(m)
        lines.append(
            f"| {m['name']} ({m['default_output']}) | {_params(m['parameters']['total'])} | "
            f"{m['texts_per_second']:.0f} | {r['dim']} | {_fmt(r['ndcg_at_10'])} | "
            f"{_fmt(r['recall_at_1'])} | {_fmt(r['spearman'])} | {_fmt(r['nn_recall_at_10'])} | "
            f"{_fmt(r.get('cosine'))} |"
        )
    return "\n".join(lines)


def robustness_table(result: dict) -> str:
    """Every (model, output, dim, quantisation) row."""
    lines = [
        "| model | output | dim | quant | bytes | nDCG@10 | recall@1 | Spearman | NN recall@10 |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in result["models"]:
        for r in m["rows"]:
            dim = f"{r['dim']} (prefix)" if r["prefix"] else str(r["dim"])
            lines.append(
                f"| {m['name']} | {r['output']} | {dim} | {r['quant']} | {r['bytes']} | "
                f"{_fmt(r['ndcg_at_10'])} | {_fmt(r['recall_at_1'])} | {_fmt(r['spearman'])} | "
                f"{_fmt(r['nn_recall_at_10'])} |"
            )
    return "\n".join(lines)


def markdown_report(result: dict) -> str:
    """Both tables with a short note on what was measured."""
    task, held = result["task"], result["heldout"]
    return "\n".join(
        [
            f"Retrieval: {task['name']} ({task['queries']} queries, {task['documents']} "
            "documents, one relevant each; held-out WordNet synsets). Fidelity: "
            f"{held['texts']} held-out texts ({held['source']}) against the "
            f"{held['target_dim']}-d target of {' + '.join(held['teachers'])} (Spearman of "
            "pairwise cosines, recall@10 of each text's teacher neighbours; cosine where the "
            "dims match). texts/s: "
            f"{result['speed_texts']} texts, batch {result['batch_size']}, "
            f"{result['device']}.",
            "",
            summary_table(result),
            "",
            "Robustness: Matryoshka prefixes (first d dims, re-normalised) of every output, in "
            "float32 and binary (sign bits, Hamming ranking).",
            "",
            robustness_table(result),
        ]
    )


def plot_quality(result: dict, path: Path) -> None:
    """PNG: nDCG@10 and Spearman against bytes per vector, float (solid) and binary (dashed)."""
    # A pyplot-free Figure: no global backend or figure registry is touched.
    fig = Figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    series = [(m["name"], out) for m in result["models"] for out in _outputs(m)]
    for i, (name, output) in enumerate(series):
        model = next(m for m in result["models"] if m["name"] == name)
        for quant, style in (("float32", "-"), ("binary", "--")):
            rows = [r for r in model["rows"] if r["output"] == output and r["quant"] == quant]
            rows.sort(key=lambda r: r["bytes"])
            label = f"{name}/{output} {quant}"
            for ax, key in zip(axes, ("ndcg_at_10", "spearman"), strict=True):
                ax.plot(
                    [r["bytes"] for r in rows],
                    [r[key] for r in rows],
                    style,
                    marker="o",
                    markersize=3,
                    color=colors[i % len(colors)],
                    label=label,
                )
    for ax, title in zip(axes, ("retrieval nDCG@10", "Spearman vs teacher target"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per vector (float32: 4 x dim; binary: dim / 8)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _outputs(model: dict) -> list[str]:
    seen: list[str] = []
    for r in model["rows"]:
        if r["output"] not in seen:
            seen.append(r["output"])
    return seen
