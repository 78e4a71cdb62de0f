"""The demo's stage 4: generated shapes images, captioned, aligned to the frozen stage-3 student.

1. shapes images with captions (`data/shapes.py`), train and held-out splits, captioned into
   caption datasets by the stage-3 student (`workdir/data/images/{train,validation}`);
2. stage 4 in `workdir/stage4`: a small SigLIP-shaped tower from scratch, only it trains;
3. a table: held-out image->caption recall@1 among 100 candidate captions (chance 1%), for all
   held-out images and for those with unseen (colour, shape) pairs; text-side fidelity to the
   teachers before (stage 3) and after stage 4, which must be equal.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from jasper_jax.config import load_settings
from jasper_jax.data.caption_dataset import build_caption_dataset, shapes_examples
from jasper_jax.encode import TextEncoder
from jasper_jax.errors import UserError
from jasper_jax.run_folder import load_any_model
from jasper_jax.settings import Settings
from jasper_jax.train.loop import train_and_evaluate
from jasper_jax.train.vision_task import text_fidelity

log = logging.getLogger("jasper_jax.demo")
CONFIG = "configs/embedded_default.py:4"
QUICK = {
    "data.train_images": 256,
    "data.eval_images": 100,
    "data.eval_texts": 128,
    "data.batch_size": 16,
    "train.steps": 6,
    "train.log_every": 3,
    "train.checkpoint_every": 3,
    "model.image_tokens": 8,
    "model.vision.hidden_size": 64,
    "model.vision.intermediate_size": 128,
    "model.vision.num_hidden_layers": 2,
    "model.vision.num_attention_heads": 4,
}


def stage4_settings(workdir: Path, stage3_dir: Path, quick: bool, **overrides: Any) -> Settings:
    """The embedded default's stage-4 config with the demo's data dirs (and quick budget)."""
    fields = {
        **(QUICK if quick else {}),
        "init_from": stage3_dir,
        "data.train_dir": workdir / "data" / "images" / "train",
        "data.eval_dir": workdir / "data" / "images" / "validation",
        **overrides,
    }
    text_eval = workdir / "data" / "validation"
    if (text_eval / "dataset").is_dir():
        fields["data.text_eval_dir"] = text_eval
    return load_settings(CONFIG, fields)


def build_image_data(s: Settings) -> None:
    """Caption datasets for the train and held-out shapes images (kept if already built)."""
    size = s.model.vision.image_size
    for split, count, out in (
        ("train", s.data.train_images, s.data.train_dir),
        ("validation", s.data.eval_images, s.data.eval_dir),
    ):
        log.info("captioning %d %s shapes images with %s", count, split, s.init_from)
        examples = shapes_examples(split, count, seed=s.seed, image_size=size)
        build_caption_dataset(examples, s.init_from, out, progress=False)


def text_scores_before(s: Settings) -> dict[str, dict[str, float]]:
    """The stage-3 student's text fidelity on the same held-out texts stage 4 evaluates."""
    if not s.data.text_eval_dir:
        return {}
    model = load_any_model(s.init_from)
    return text_fidelity(s, TextEncoder(model, dtype=s.dtype), model.config.head_names)


def format_table(before: dict, after: dict, seconds: float) -> str:
    """Markdown: recall@1 per head (all / unseen pairs) and text fidelity before vs after."""
    lines = [
        "| stage 4 (images) | head | held-out recall@1 among 100 captions | unseen pairs only "
        "| chance |",
        "|---|---|---|---|---|",
    ]
    for key, m in after.items():
        if key.startswith("image_to_caption/"):
            unseen = m.get("recall_at_1_unseen", float("nan"))
            lines.append(
                f"| after {seconds:.0f} s | {key.split('/', 1)[1]} | {m['recall_at_1']:.3f} | "
                f"{unseen:.3f} | {m['chance']:.3f} |"
            )
    lines += [
        "",
        "| text side (held-out texts) | head | cosine to teacher before -> after | Spearman "
        "before -> after |",
        "|---|---|---|---|",
    ]
    for key, b in before.items():
        a = after.get(key, {})
        cos = lambda m: f"{m['cosine']:.4f}" if "cosine" in m else "n/a"
        lines.append(
            f"| | {key.split('/', 1)[1]} | {cos(b)} -> {cos(a)} | "
            f"{b['spearman']:.4f} -> {a.get('spearman', float('nan')):.4f} |"
        )
    return "\n".join(lines)


def run_stage4(workdir: Path, stage3_dir: Path, quick: bool) -> dict:
    """Builds the image data, trains stage 4 in `workdir/stage4`, evaluates.

    Returns {"status", "step", "eval", "text_before", "seconds": {...}, "table": markdown}.
    """
    workdir, stage3_dir = Path(workdir), Path(stage3_dir)
    s = stage4_settings(workdir, stage3_dir, quick)
    start = time.perf_counter()
    build_image_data(s)
    data_seconds = time.perf_counter() - start
    before = text_scores_before(s)
    start = time.perf_counter()
    result = train_and_evaluate(s, workdir / "stage4")
    train_seconds = time.perf_counter() - start
    if result["status"] != "finished":
        raise UserError(f"stage 4 stopped ({result['status']}); re-run to resume")
    after = result.get("eval", {})
    return {
        **result,
        "text_before": before,
        "seconds": {"data": data_seconds, "train_and_eval": train_seconds},
        "table": format_table(before, after, train_seconds),
    }
