"""NV-Embed(-v2) (arXiv 2405.17428; the paper's 4096-d teacher): a Mistral decoder run
bidirectionally, NV-Embed's latent-attention layer on every token, then the mean over the text's
tokens and a unit-length vector.

A folder whose config.json has `"model_type": "nvembed"` holds `text_config` (the Mistral body,
model type `bidir_mistral`), `latent_attention_config`, and weights named
`embedding_model.*` (HF `MistralModel`) and `latent_attention_model.*` (`latent_pool`). Our
parameter tree is the same: `encoder/embedding_model/...`, `encoder/latent_attention_model/...`.

How NV-Embed's own `encode(texts, instruction=...)` feeds the model, which `TextEncoder` follows
for such a folder (`LoadedModel.text_suffix` and `pool_prompt`):
- each input is `instruction + text + eos_token` (the EOS string appended to every text),
  tokenized with the folder's tokenizer (BOS first), padded on the right;
- the mean leaves out the first `len(tokenizer.tokenize(instruction))` positions (the
  instruction's tokens counted without special tokens, from position 0: BOS included) when the
  config says `is_mask_instruction` with right padding; a text without instruction pools every
  token.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jasper_jax.errors import UnsupportedModel
from jasper_jax.models.attention import AttentionSettings
from jasper_jax.models.latent_pool import LatentAttention, LatentAttentionConfig
from jasper_jax.models.layers import Dtype
from jasper_jax.models.qwen2 import MistralConfig, Qwen2Encoder
from jasper_jax.paths import read_json

# `text_config` model types that are the Mistral body NV-Embed was released with.
TEXT_MODEL_TYPES = ("bidir_mistral", "mistral")


@dataclasses.dataclass(frozen=True)
class NVEmbedConfig:
    """NV-Embed's config.json: the body (`text`, always bidirectional), the latent layer, and
    whether the mean leaves the instruction's tokens out (`is_mask_instruction` with right
    padding, NV-Embed's rule)."""

    text: MistralConfig = MistralConfig(is_causal=False)
    latent: LatentAttentionConfig = LatentAttentionConfig()
    mask_instruction: bool = True

    model_type = "nvembed"

    def __post_init__(self):
        widths = {self.text.hidden_size, self.latent.latent_dim, self.latent.hidden_dim}
        if len(widths) != 1:
            raise ValueError(
                f"the latent layer's latent_dim {self.latent.latent_dim} and hidden_dim "
                f"{self.latent.hidden_dim} must equal the decoder's hidden_size "
                f"{self.text.hidden_size} (as in NV-Embed)"
            )
        if self.text.is_causal:
            raise ValueError("NV-Embed's decoder runs bidirectionally (is_causal false)")

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def max_position_embeddings(self) -> int:
        return self.text.max_position_embeddings

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> NVEmbedConfig:
        """Reads NV-Embed's config.json dict; raises UnsupportedModel for a body that is not
        Mistral."""
        text = dict(d.get("text_config") or {})
        kind = text.get("model_type")
        if kind not in TEXT_MODEL_TYPES:
            raise UnsupportedModel(
                f"NV-Embed text_config model_type {kind!r}: only a Mistral body "
                f"{list(TEXT_MODEL_TYPES)} is supported"
            )
        right = d.get("padding_side", "right") == "right"
        mask = bool(d.get("is_mask_instruction", True)) and right
        return cls(
            text=MistralConfig.from_hf_dict({**text, "is_causal": False}),
            latent=LatentAttentionConfig.from_hf_dict(d.get("latent_attention_config") or {}),
            mask_instruction=mask,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        text = {**self.text.to_hf_dict(), "model_type": "bidir_mistral"}
        text.pop("is_causal")
        return {
            "model_type": self.model_type,
            "architectures": ["NVEmbedModel"],
            "hidden_size": self.hidden_size,
            "text_config": text,
            "latent_attention_config": self.latent.to_hf_dict(),
            "is_mask_instruction": self.mask_instruction,
            "padding_side": "right",
            "add_eos": True,
        }


class NVEmbedEncoder(nn.Module):
    """Mistral body (`embedding_model`) + latent-attention layer (`latent_attention_model`).

    Call (the encoders' signature): input_ids [batch, seq] int32 right-padded, attention_mask
    [batch, seq] (1 for tokens), optional inputs_embeds [batch, seq, hidden]. Returns [batch,
    seq, hidden] per-token states after the latent layer, in `dtype`, for `Embedder`'s mean.
    """

    config: NVEmbedConfig
    dtype: Dtype = jnp.float32
    remat: bool | str = False
    attention: AttentionSettings = AttentionSettings()

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        inputs_embeds: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> jax.Array:
        body = Qwen2Encoder(
            self.config.text, self.dtype, self.remat, self.attention, name="embedding_model"
        )
        hidden = body(input_ids, attention_mask, inputs_embeds, deterministic=deterministic)
        return LatentAttention(self.config.latent, self.dtype, name="latent_attention_model")(
            hidden
        )


def eos_text(folder: Path) -> str:
    """The tokenizer's end-of-sequence token as text ("</s>"), which NV-Embed appends to every
    input, from `tokenizer_config.json` or `special_tokens_map.json`.

    Raises:
      UnsupportedModel: neither file names one.
    """
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        token = read_json(path).get("eos_token") if path.exists() else None
        if isinstance(token, dict):  # {"content": "</s>", ...}
            token = token.get("content")
        if isinstance(token, str) and token:
            return token
    raise UnsupportedModel(
        f"{folder} names no eos_token in tokenizer_config.json or special_tokens_map.json; "
        "NV-Embed appends it to every text (add the tokenizer files saved with the model)"
    )


def instruction_length(tokenizer: Any, prompt: str) -> int:
    """NV-Embed's count of instruction positions the mean leaves out:
    `len(tokenizer.tokenize(prompt))`, the prompt's tokens without special tokens.

    tokenizer: a `jasper_jax.tokenizer.Tokenizer` (its Rust backend, else transformers').
    """
    if tokenizer.backend is not None:
        return len(tokenizer.backend.encode(prompt, add_special_tokens=False).ids)
    return len(tokenizer.hf.tokenize(prompt))
