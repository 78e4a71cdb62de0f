"""README.md for an exported model: what it is, where it came from, how to load it, its scores."""

from __future__ import annotations

import logging
from pathlib import Path

from jasper_jax.errors import UserError
from jasper_jax.evaluation.report import markdown_report
from jasper_jax.paths import read_json

log = logging.getLogger(__name__)
EVAL_JSON = Path("eval") / "eval.json"  # where `jasper-jax eval --model WORKDIR` writes

_HUB_NAMES = {
    "all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2",
    "all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "all-mpnet-base-v2": "sentence-transformers/all-mpnet-base-v2",
}
_STAGES = {
    1: "stage 1: the full-dim head only (cosine + similarity + relative-similarity losses)",
    2: "stage 2: the head and the last encoder layers",
    3: "stage 3: all parameters, plus the reduced heads (similarity losses only)",
    4: "stage 4: the vision tower, images aligned to their captions' text vectors",
}


def hub_name(folder_or_name: str) -> str:
    """A bundled teacher's hub id for a local folder or name; otherwise the folder's name."""
    lowered = str(folder_or_name).lower()
    for marker, name in _HUB_NAMES.items():
        if marker in lowered:
            return name
    return Path(str(folder_or_name)).name


def teacher_names(meta: dict) -> list[str]:
    """Teachers from model.json: dicts with "name" (teacher-dataset metadata) or plain strings."""
    out = []
    for t in meta.get("teachers") or []:
        name = t.get("name") or t.get("folder") if isinstance(t, dict) else str(t)
        dim = f" ({t['dim']}-d)" if isinstance(t, dict) and t.get("dim") else ""
        out.append(f"{hub_name(name)}{dim}")
    return out


def _front_matter(base: str, vision: bool) -> str:
    tags = ["sentence-transformers", "feature-extraction", "sentence-similarity", "jasper-jax"]
    tags += ["image-feature-extraction"] if vision else []
    lines = ["---", "library_name: sentence-transformers", f"base_model: {base}", "tags:"]
    lines += [f"- {t}" for t in tags]
    return "\n".join([*lines, "pipeline_tag: sentence-similarity", "---"])


def _heads_section(summary: dict) -> list[str]:
    dims = summary["heads"]
    default = summary["default_head"]
    return [
        "## Heads",
        "",
        f"Independent linear heads on the pooled vector: {', '.join(map(str, dims)) or 'none'}"
        f" dims (folders `2_Dense_<dim>`). `modules.json` runs `{default}`. To use another head,"
        " re-export with `--default-head dense_<dim>`, or point the Dense entry of `modules.json`"
        " at another `2_Dense_<dim>` folder (`jasper_jax.export.set_default_head(folder, 256)`).",
        "",
        *_serving_lines(summary),
        "",
    ]


def _serving_lines(summary: dict) -> list[str]:
    """How each server picks a head, and where a server computes something else."""
    dense = f"2_Dense_{min(summary['heads'])}" if summary["heads"] else "2_Dense_<dim>"
    lines = [
        "Picking a head when serving:",
        "",
        f"- Text Embeddings Inference: `--dense-path {dense}` (without it, the Dense that"
        " `modules.json` names; TEI takes the flag only when `modules.json` names one Dense, so"
        " switch a `pooled` default to a head first).",
        "- vLLM: runs the first Dense in `modules.json`; switch it with"
        " `jasper_jax.export.set_default_head(folder, dim)` (it also moves the Matryoshka"
        " fields of `config.json`), then serve the folder.",
        "- sentence-transformers: `modules.json` as well (`set_default_head`), or"
        " `SentenceTransformer(folder, truncate_dim=...)` only on a Matryoshka head.",
    ]
    matryoshka = summary.get("matryoshka")
    if matryoshka:
        widths = ", ".join(map(str, matryoshka["dims"]))
        lines.append(
            f"- `{matryoshka['head']}` was trained with Matryoshka prefixes ({widths}):"
            " `config.json` says so while it is the default head, so vLLM accepts a"
            " `dimensions` request of these widths; other heads are not cut."
        )
    if summary.get("normalize_pooled") and summary["heads"]:
        lines.append(
            "- The heads read the unit-length pooled vector (a `Normalize` before the Dense)."
            " Text Embeddings Inference and vLLM skip that Normalize and apply the Dense to the"
            " raw pooled vector, so there only the `pooled` head gives this model's vectors;"
            " serve the heads with sentence-transformers or jasper-jax (ONNX) instead."
        )
    return lines


def model_prompts(meta: dict) -> dict[str, str]:
    """A run's student prompts by role ("query", "document"); model.json of runs before roles
    existed recorded one "prompt", the query's."""
    prompts = dict(meta.get("prompts") or {})
    if not prompts and meta.get("prompt"):
        prompts = {"query": meta["prompt"]}
    return {"query": prompts.get("query", ""), "document": prompts.get("document", "")}


def _prompt_line(prompts: dict[str, str]) -> str:
    if not any(prompts.values()):
        return "- No prompts: queries and documents are encoded as they are."
    said = [f"{role}s `{text!r}`" for role, text in prompts.items() if text]
    return (
        f"- Prompts ({'; '.join(said)}) are in `config_sentence_transformers.json`: "
        "`encode_query` and `encode_document` apply them."
    )


def _usage(summary: dict) -> list[str]:
    lines = [
        "## Usage",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        "model = SentenceTransformer('PATH/TO/THIS/FOLDER')",
        "queries = model.encode_query(['how do plants make food?'])",
        "docs = model.encode_document(['Photosynthesis turns light into chemical energy.'])",
        "print(model.similarity(queries, docs))",
        "```",
        "",
        "The encoder alone (no heads) loads with `transformers.AutoModel.from_pretrained(folder)`;",
        "jasper-jax reads the folder with `jasper-jax encode --model FOLDER --head dense_<dim>`.",
        "`jasper_export.json` records the workdir and step this folder was exported from; "
        "`jasper-jax export --overwrite` replaces only folders that hold it.",
        "",
    ]
    if summary.get("vision"):
        lines += [
            "## Vision tower",
            "",
            "`vision/` holds the stage-4 SigLIP tower as a Hugging Face `SiglipVisionModel`:",
            "",
            "```python",
            "from transformers import SiglipVisionModel",
            "",
            "tower = SiglipVisionModel.from_pretrained('PATH/TO/THIS/FOLDER/vision')",
            "patches = tower(pixel_values=pixels).last_hidden_state  # [batch, patches, hidden]",
            "```",
            "",
            "`vision/preprocessor_config.json` is the training preprocessing (RGB, bicubic resize"
            " to the square image size, mean/std 0.5): "
            "`SiglipImageProcessor.from_pretrained('PATH/TO/THIS/FOLDER/vision')` gives `pixels`.",
            "Jasper feeds these patch states, adaptive-average-pooled to the text model's width, "
            "in place of the image tokens' embeddings (`vision/jasper_bridge.json`); jasper-jax "
            "runs the whole image path.",
            "",
        ]
    return lines


def _compact_section(summary: dict) -> list[str]:
    """The ONNX graphs and int8 ranges this export holds (`--onnx`, `--calibration`)."""
    lines = []
    if summary.get("onnx"):
        heads = ", ".join(f"`{h}`" for h in summary["onnx"])
        lines += [
            f"- `onnx/<head>.onnx` and `onnx/<head>_int8.onnx` for {heads}: token ids and"
            " attention mask in, the head's unit vector out (pooling, Dense and Normalize inside"
            " the graph; `onnx/onnx.json` says how they were built). Run them with onnxruntime"
            " or `jasper-jax encode --model FOLDER --backend onnx|onnx-int8`.",
        ]
    calibration = summary.get("calibration")
    if calibration:
        lines += [
            f"- `calibration.json`: per-dimension int8 ranges of every head, measured on"
            f" {calibration.get('count', '?')} texts of `{calibration.get('file', '?')}`;"
            " `jasper-jax encode --precision int8|uint8` reads them (binary and ubinary need"
            " none). Pass them as `ranges` to sentence-transformers' `quantize_embeddings` to"
            " store the same bytes.",
        ]
    return ["## ONNX and compact vectors", "", *lines, ""] if lines else []


def model_card(meta: dict, summary: dict, evaluation: dict | None) -> str:
    """Markdown model card.

    Args:
      meta: model.json of the run (+ "step").
      summary: from `st_folder.write_text_model` (+ "vision").
      evaluation: the eval.json of `jasper-jax eval` for this workdir, or None.
    """
    base = hub_name(meta.get("tokenizer_folder", ""))
    stage = int(meta.get("stage") or 0)
    teachers = teacher_names(meta) or ["(not recorded)"]
    lines = [
        _front_matter(base, bool(summary.get("vision"))),
        "",
        "# Jasper-style distilled embedding model",
        "",
        f"Distilled with [jasper-jax](https://github.com/) from {' + '.join(teachers)} "
        f"(teacher vectors L2-normalised, concatenated, normalised again) into a student "
        f"initialised from `{base}`.",
        "",
        f"- Checkpoint: stage {stage} of config `{meta.get('config', '?')}`, step "
        f"{meta.get('step', '?')}.",
        "- Stages of the recipe up to this one, each initialised from the previous:",
        *[f"  - {_STAGES[s]}" for s in sorted(_STAGES) if s <= stage],
        f"- Pooling: {summary.get('pooling', 'mean')}; max sequence length "
        f"{meta.get('max_seq_length')} tokens.",
        _prompt_line(model_prompts(meta)),
        "",
        *_heads_section(summary),
        *_usage(summary),
        *_compact_section(summary),
    ]
    if evaluation:
        lines += _evaluation_section(evaluation)
    return "\n".join(lines)


def _evaluation_section(evaluation: dict) -> list[str]:
    """The eval.json tables; an eval.json of another layout is left out (it is optional)."""
    try:
        report = markdown_report(evaluation)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        log.warning("model card without evaluation: eval.json is not as expected (%r)", e)
        return []
    return ["## Evaluation (jasper-jax eval)", "", report, ""]


def workdir_evaluation(workdir: str | Path) -> dict | None:
    """The workdir's eval.json for the model card; a damaged one is left out, not fatal."""
    path = Path(workdir) / EVAL_JSON
    if not path.is_file():
        return None
    try:
        evaluation = read_json(path)
    except UserError as e:
        log.warning("model card without evaluation: %s", e)
        return None
    return evaluation if isinstance(evaluation, dict) else None
