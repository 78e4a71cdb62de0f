"""Stage 4 as a `Task`: a SigLIP tower learns to put images where the frozen student puts their
captions (PAPER 2.4: every head, cosine + similarity + relative similarity, image vs
stop_grad(caption vector), averaged over heads).

Start-up (the loop's order): this workdir's checkpoint (resume) > `init_from`, the stage-3
workdir, whose params give "encoder" and "heads" but no "vision" > `pretrained()`: the same
student params plus, when `model.vision.init_hf` names a local HF SigLIP folder, the tower's
weights; otherwise the tower starts at random init. The loop merges the two sources, the
previous stage's params winning where both have a path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jasper_jax.data.caption_dataset import load_caption_eval
from jasper_jax.data.eval_records import load_eval_arrays
from jasper_jax.data.image_pipeline import make_image_pipeline, target_key
from jasper_jax.encode import TextEncoder
from jasper_jax.encode_images import ImageEncoder
from jasper_jax.errors import UserError
from jasper_jax.fidelity import fidelity_metrics
from jasper_jax.models.loading import LoadedModel
from jasper_jax.models.multimodal import MultimodalConfig, MultimodalEmbedder, init_params
from jasper_jax.models.siglip import SiglipVisionConfig
from jasper_jax.models.siglip_hf import load_siglip_folder
from jasper_jax.run_folder import embedder_config_to_dict, is_workdir, load_workdir_model
from jasper_jax.settings import Settings
from jasper_jax.train.text_task import attention_settings

RETRIEVAL_GROUP = 100  # recall@1 among this many candidate captions (chance 1%)
VISION_FIELDS = (
    "image_size",
    "patch_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def vision_config(s: Settings) -> tuple[SiglipVisionConfig, dict | None]:
    """(tower config, HF params or None): from `model.vision.init_hf` when set, else the fields."""
    v = s.model.vision
    if v.init_hf:
        config, params = load_siglip_folder(Path(v.init_hf).expanduser())
        params.pop("head", None)  # the bridge reads patch tokens; the pooling head is unused
        return dataclasses.replace(config, vision_use_head=False), params
    fields = {name: int(getattr(v, name)) for name in VISION_FIELDS}
    return SiglipVisionConfig(**fields, vision_use_head=False), None


def word_embedding_std(encoder_params: dict) -> float | None:
    """Std of the student's token-embedding table (BERT `word_embeddings`, Qwen2
    `embed_tokens`), or None when it has neither."""
    for path, value in traverse_util.flatten_dict(encoder_params).items():
        if any(name in ("word_embeddings", "embed_tokens") for name in path):
            return float(np.std(np.asarray(value, np.float32)))
    return None


def recall_at_1(
    image_vectors: np.ndarray, caption_vectors: np.ndarray, captions: Sequence[str], group: int
) -> np.ndarray:
    """Per image, whether its nearest caption among its group's is its own (or the same text).

    Images and captions are split into consecutive groups of `group` (the remainder dropped);
    within a group every image ranks the group's captions by dot product (unit vectors).
    Returns bool [num_groups * group].
    """
    n = (len(captions) // group) * group
    hits = []
    for start in range(0, n, group):
        sims = image_vectors[start : start + group] @ caption_vectors[start : start + group].T
        best = np.argmax(sims, axis=1)
        texts = captions[start : start + group]
        hits.extend(texts[b] == texts[i] for i, b in enumerate(best))
    return np.array(hits, dtype=bool)


@dataclasses.dataclass
class VisionTask:
    """Stage 4: images in, student head vectors vs the frozen student's caption vectors."""

    config: MultimodalConfig
    text: LoadedModel  # the frozen stage-3 student
    text_meta: dict  # its model.json
    vision_params: dict | None
    model: nn.Module
    batch_keys: tuple[str, ...]

    @classmethod
    def from_settings(cls, s: Settings) -> VisionTask:
        if not s.init_from or not is_workdir(s.init_from):
            raise UserError(
                f"config field init_from: {s.init_from!r} is not a training workdir; stage 4 "
                "starts from the frozen stage-3 student: set --config.init_from=STAGE3_WORKDIR"
            )
        if not s.data.train_dir:
            raise UserError("config field data.train_dir is empty: point it at a caption dataset")
        text, meta = load_workdir_model(s.init_from)
        heads = tuple(int(d) for d in s.model.heads)
        if heads != tuple(text.config.heads):
            raise UserError(
                f"config field model.heads {heads} differs from the heads of {s.init_from} "
                f"{tuple(text.config.heads)}; stage 4 keeps the student's heads"
            )
        vision, vision_params = vision_config(s)
        config = MultimodalConfig(text.config, vision, int(s.model.image_tokens))
        model = MultimodalEmbedder(
            config, dtype=jnp.dtype(s.dtype), remat=s.model.remat, attention=attention_settings(s)
        )
        keys = ("pixels", "attention_mask", *(target_key(h) for h in text.config.head_names))
        return cls(config, text, meta, vision_params, model, keys)

    def init(self, rng: jax.Array) -> Any:
        return init_params(self.config, rng)

    def pretrained(self) -> tuple[dict, str]:
        params = {k: self.text.params[k] for k in ("encoder", "heads")}
        source = "the stage-3 student"
        if self.vision_params is not None:
            params["vision"] = self.vision_params
            source += " + HF SigLIP weights"
        elif (scale := word_embedding_std(self.text.params["encoder"])) is not None:
            # A tower from scratch starts its output at the scale of the student's word
            # embeddings (the inputs the student knows), not LayerNorm's unit scale.
            width = self.config.vision.hidden_size
            params["vision"] = {"post_layernorm": {"scale": np.full(width, scale, np.float32)}}
            source += f" + post_layernorm scale {scale:.3g} (word-embedding std)"
        return params, source

    def describe(self, s: Settings) -> dict:
        """model.json: the student's entries (so text encoding works as for stage 3) plus the
        tower and the bridge, read by `encode_images.load_image_model`."""
        return {
            **self.text_meta,
            "embedder": embedder_config_to_dict(self.config.text),
            "vision": self.config.vision.to_hf_dict(),
            "image_tokens": self.config.image_tokens,
            "text_from": str(Path(s.init_from).resolve()),
            "stage": s.stage,
            "config": s.name,
        }

    def identity(self) -> dict:
        v = self.config.vision
        return {
            "student": self.config.text.encoder.model_type,
            "hidden": self.config.text.hidden_size,
            "vision": f"{v.num_hidden_layers}x{v.hidden_size} {v.image_size}px/{v.patch_size}",
            "image_tokens": self.config.image_tokens,
        }

    def pipeline(self, s: Settings):
        return make_image_pipeline(
            s.data.train_dir,
            batch_size=s.data.batch_size,
            image_size=self.config.vision.image_size,
            image_tokens=self.config.image_tokens,
            heads=self.config.text.head_names,
            seed=s.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            worker_count=s.data.worker_count,
        )

    def forward(self, s: Settings):
        """(params, batch, rng) -> (image vectors per head, caption vectors per head).

        The batch's attention_mask (all ones) only counts image tokens for tokens/s.
        """
        model, heads, dropout = self.model, self.config.text.head_names, s.model.dropout

        def forward(params, batch, rng):
            images = model.apply(
                {"params": params},
                batch["pixels"],
                heads=heads,
                deterministic=not dropout,
                rngs={"dropout": rng},
                method=MultimodalEmbedder.embed_images,
            )
            return images, {h: batch[target_key(h)] for h in heads}

        return forward

    def evaluate(self, s: Settings, params, mesh) -> dict[str, dict[str, float]]:
        """Held-out image->caption recall@1 among 100 captions per head (also per tag), and the
        text side: caption vectors vs the stored stage-3 ones, fidelity on `data.text_eval_dir`."""
        results: dict[str, dict[str, float]] = {}
        text_params = {k: params[k] for k in ("encoder", "heads")}
        text_model = dataclasses.replace(self.text, params=text_params)
        text_encoder = TextEncoder(text_model, dtype=s.dtype, mesh=mesh)
        heads = self.config.text.head_names
        if s.data.eval_dir:
            data = load_caption_eval(s.data.eval_dir, limit=s.data.eval_images)
            encoder = ImageEncoder(self.config, params, dtype=s.dtype, mesh=mesh)
            images = encoder.encode_heads(data["images"], heads=heads)
            captions = text_encoder.encode_heads(data["captions"], heads=heads)
            tags = np.array(data["tags"])
            for head in heads:
                hits = recall_at_1(images[head], captions[head], data["captions"], RETRIEVAL_GROUP)
                scores = {
                    "recall_at_1": float(hits.mean()),
                    "chance": 1.0 / RETRIEVAL_GROUP,
                    "mean_cosine_to_caption": float(
                        np.mean(np.sum(images[head] * captions[head], 1))
                    ),
                    # 1.0 when the text side did not move from stage 3
                    "caption_min_cosine_to_stage3": float(
                        np.min(np.sum(captions[head] * data["targets"][head], 1))
                    ),
                }
                for tag in sorted(set(tags[: len(hits)]) - {""}):
                    scores[f"recall_at_1_{tag}"] = float(hits[tags[: len(hits)] == tag].mean())
                results[f"image_to_caption/{head}"] = scores
        if s.data.text_eval_dir:
            results.update(text_fidelity(s, text_encoder, heads))
        return results


def text_fidelity(s: Settings, encoder, heads: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per head `text/<head>`: fidelity of the student's text vectors to `data.text_eval_dir`."""
    texts, teacher, _ = load_eval_arrays(s.data.text_eval_dir, limit=s.data.eval_texts)
    vectors = encoder.encode_heads(texts, heads=heads, prompt=s.data.document_prompt or None)
    return {f"text/{name}": fidelity_metrics(v, teacher) for name, v in vectors.items()}
