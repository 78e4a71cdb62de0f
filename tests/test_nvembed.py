"""Mistral and NV-Embed(-v2), the paper's 4096-d teacher: the Mistral body against transformers'
MistralModel (causal, and bidirectional as NV-Embed runs it), NV-Embed's latent-attention layer
against a NumPy reference written from the paper (arXiv 2405.17428, section 3.2), and a tiny
NV-Embed-layout folder end to end (loading, EOS appended, instruction left out of the mean)."""

import json
import math

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from jasper_jax.errors import UnsupportedModel, UserError
from jasper_jax.models import hf_io
from jasper_jax.models.embedder import Embedder, EmbedderConfig, abstract_params
from jasper_jax.models.latent_pool import LatentAttention, LatentAttentionConfig
from jasper_jax.models.nvembed import NVEmbedConfig
from jasper_jax.models.qwen2 import MistralConfig, Qwen2Encoder
from tests.test_text_encoders import TINY_DECODER, mixed_batch, to_params, torch_pooled, unit

BODY_TOL = 1e-4  # fp32 parity with transformers (the house rule)
POOLER_TOL = 1e-5  # fp32 parity of the latent layer with its NumPy reference
INSTRUCTION = "Instruct: Given a question, retrieve passages that answer the question\nQuery: "
# Tiny latent layer: 4 heads of 32 (projections 128 wide, unlike the 64-wide tokens), 16 latents.
TINY_LATENT = dict(num_latents_value=16, num_cross_heads=4, hidden_dim=64, latent_dim=64)
TINY_LATENT["cross_dim_head"] = 32


def tiny_mistral(causal: bool, window: int | None = None):
    torch.manual_seed(11)
    cfg = transformers.MistralConfig(**TINY_DECODER, sliding_window=window)
    cfg._attn_implementation = "eager"
    model = transformers.MistralModel(cfg).eval()
    with torch.no_grad():  # norms start at 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model, MistralConfig.from_hf_dict({**cfg.to_dict(), "is_causal": causal})


def torch_hidden(model, ids: np.ndarray, mask: np.ndarray, causal: bool) -> np.ndarray:
    """transformers' last hidden state; bidirectional through a 4-D padding-only mask (what
    NV-Embed's BidirectionalMistralModel builds), which also skips any sliding window."""
    t_mask = torch.tensor(mask)
    if not causal:
        t_mask = torch.zeros(len(mask), 1, mask.shape[1], mask.shape[1]).masked_fill(
            ~t_mask[:, None, None, :].bool(), torch.finfo(torch.float32).min
        )
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=t_mask)
    return out.last_hidden_state.numpy()


@pytest.mark.parametrize(("causal", "window"), [(True, None), (True, 12), (False, 4)])
def test_mistral_body_matches_torch(causal, window):
    """Padded mixed lengths (12, 7, 1, 4 tokens). A causal window of 12 on 12 tokens hides
    nothing (exact); bidirectional ignores a window of 4, as NV-Embed does."""
    model, enc = tiny_mistral(causal, window)
    assert enc.is_causal == causal and enc.sliding_window == window and not enc.attention_bias
    ids, mask = mixed_batch(enc.vocab_size, seed=6)
    want = torch_hidden(model, ids, mask, causal)
    cfg, params = to_params(model, enc, "mean")
    body = Qwen2Encoder(enc).apply({"params": params["encoder"]}, ids, mask)
    diff = np.abs(np.asarray(body) - want)[mask.astype(bool)].max()
    pooled = Embedder(cfg).apply({"params": params}, ids, mask)["pooled"]
    pooled_diff = np.abs(np.asarray(pooled) - unit(torch_pooled(want, mask, "mean"))).max()
    print(f"mistral causal={causal} window={window}: hidden {diff:.2e}, pooled {pooled_diff:.2e}")
    assert diff < BODY_TOL and pooled_diff < BODY_TOL
    # causal and bidirectional genuinely differ, so the switch is exercised
    other = torch_hidden(model, ids, mask, not causal)
    assert np.abs(other - want)[mask.astype(bool)].max() > 1e-3


def test_causal_mistral_refuses_inputs_past_its_window():
    model, enc = tiny_mistral(True, window=8)
    ids, mask = mixed_batch(enc.vocab_size)
    _, params = to_params(model, enc)
    with pytest.raises(UserError, match="sliding attention window \\(8\\).*--max-length 8"):
        Qwen2Encoder(enc).apply({"params": params["encoder"]}, ids, mask)
    short = Qwen2Encoder(enc).apply({"params": params["encoder"]}, ids[:, :8], mask[:, :8])
    want = torch_hidden(model, ids[:, :8], mask[:, :8], True)
    assert np.abs(np.asarray(short) - want)[mask[:, :8].astype(bool)].max() < BODY_TOL


def test_mistral_folder_loads_with_the_window_as_token_limit(tmp_path):
    from jasper_jax.models.loading import load_model

    model, enc = tiny_mistral(True, window=8)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.config.encoder == enc and loaded.max_seq_length == 8
    assert loaded.text_suffix == "" and loaded.pool_prompt
    hf = enc.to_hf_dict()
    assert MistralConfig.from_hf_dict(hf) == enc and hf["architectures"] == ["MistralModel"]
    assert "attention_bias" not in hf and hf["sliding_window"] == 8


def latent_state(cfg: LatentAttentionConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random NV-Embed latent-layer tensors under their checkpoint names (torch Linear weights
    [out, in]); norms away from 1/0 so that they matter."""
    rng = np.random.RandomState(seed)
    d, inner, ff = cfg.latent_dim, cfg.num_cross_heads * cfg.cross_dim_head, 4 * cfg.latent_dim

    def linear(out_dim, in_dim):
        return rng.normal(0, 1 / math.sqrt(in_dim), (out_dim, in_dim))

    shapes = {
        "latents": rng.normal(0, 1, (cfg.num_latents_value, d)),
        "cross_attend_blocks.0.fn.to_q.weight": linear(inner, d),
        "cross_attend_blocks.0.fn.to_kv.weight": linear(2 * inner, cfg.hidden_dim),
        "cross_attend_blocks.0.fn.to_out.weight": linear(d, inner),
        "cross_attend_blocks.1.fn.net.0.weight": linear(2 * ff, d),
        "cross_attend_blocks.1.fn.net.0.bias": rng.normal(0, 0.1, 2 * ff),
        "cross_attend_blocks.1.fn.net.2.weight": linear(d, ff),
        "cross_attend_blocks.1.fn.net.2.bias": rng.normal(0, 0.1, d),
    }
    for norm in ("0.norm", "0.norm_context", "1.norm"):
        shapes[f"cross_attend_blocks.{norm}.weight"] = rng.uniform(0.5, 1.5, d)
        shapes[f"cross_attend_blocks.{norm}.bias"] = rng.normal(0, 0.1, d)
    return {f"latent_attention_model.{k}": v.astype(np.float32) for k, v in shapes.items()}


def _layer_norm(x, weight, bias, eps=1e-5):
    centred = x - x.mean(-1, keepdims=True)
    return centred / np.sqrt(np.square(centred).mean(-1, keepdims=True) + eps) * weight + bias


_erf = np.frompyfunc(math.erf, 1, 1)


def latent_reference(hidden: np.ndarray, state: dict, heads: int) -> np.ndarray:
    """The paper's latent attention in float64: each token's (normalised) state is a query;
    keys and values both come from the (normalised) trained latents; softmax(QK^T / sqrt(d))V
    per head, output projection, residual; then a GEGLU MLP with its own norm and residual."""
    w = {k.removeprefix("latent_attention_model."): v.astype(np.float64) for k, v in state.items()}
    block0, block1 = "cross_attend_blocks.0.", "cross_attend_blocks.1."
    x = hidden.astype(np.float64)
    q = _layer_norm(x, w[block0 + "norm.weight"], w[block0 + "norm.bias"])
    q = q @ w[block0 + "fn.to_q.weight"].T
    latents = _layer_norm(
        w["latents"], w[block0 + "norm_context.weight"], w[block0 + "norm_context.bias"]
    )
    k, v = np.split(latents @ w[block0 + "fn.to_kv.weight"].T, 2, axis=-1)
    batch, seq, inner = q.shape
    width = inner // heads
    scores = np.einsum(
        "blhd,nhd->bhln", q.reshape(batch, seq, heads, width), k.reshape(-1, heads, width)
    ) / math.sqrt(width)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = np.einsum("bhln,nhd->blhd", probs, v.reshape(-1, heads, width))
    x = x + attended.reshape(batch, seq, inner) @ w[block0 + "fn.to_out.weight"].T
    h = _layer_norm(x, w[block1 + "norm.weight"], w[block1 + "norm.bias"])
    h = h @ w[block1 + "fn.net.0.weight"].T + w[block1 + "fn.net.0.bias"]
    value, gates = np.split(h, 2, axis=-1)
    gelu = 0.5 * gates * (1 + _erf(gates / math.sqrt(2)).astype(np.float64))
    return x + (value * gelu) @ w[block1 + "fn.net.2.weight"].T + w[block1 + "fn.net.2.bias"]


def nvembed_pool(states: np.ndarray, pool_mask: np.ndarray) -> np.ndarray:
    """NV-Embed's output: the mean over the pool mask, normalised to unit length."""
    mean = (states * pool_mask[..., None]).sum(1) / pool_mask.sum(1, keepdims=True)
    return unit(mean)


def test_latent_attention_matches_reference():
    """Weights converted one to one from their checkpoint names; a padded batch whose pool
    mask also drops leading (instruction) positions."""
    cfg = LatentAttentionConfig(**TINY_LATENT)
    state = latent_state(cfg)
    layer = LatentAttention(cfg)
    hidden = np.random.RandomState(1).normal(0, 1, (3, 9, cfg.latent_dim)).astype(np.float32)
    abstract = jax.eval_shape(layer.init, jax.random.key(0), hidden)["params"]
    params, unused = hf_io.params_from_state_dict(
        state, nn.meta.unbox(abstract), "latent_attention_model."
    )
    assert unused == []
    ours = np.asarray(layer.apply({"params": params}, hidden))
    want = latent_reference(hidden, state, cfg.num_cross_heads)
    diff = np.abs(ours - want).max()
    pool_mask = np.zeros((3, 9), np.float32)
    pool_mask[0, 2:9], pool_mask[1, 2:5], pool_mask[2, 0:6] = 1, 1, 1
    pooled_diff = np.abs(nvembed_pool(ours, pool_mask) - nvembed_pool(want, pool_mask)).max()
    print(f"latent attention: per token {diff:.2e}, pooled {pooled_diff:.2e}")
    assert diff < POOLER_TOL and pooled_diff < POOLER_TOL
    assert np.abs(ours - hidden).max() > 0.1  # the layer does change the states


def test_nvembed_defaults_are_nv_embed_v2():
    """NV-Embed-v2's config.json names only the latent layer's model type: the defaults make
    the published model, 7.85B parameters (Mistral-7B without its LM head + latent layer)."""
    cfg = NVEmbedConfig.from_hf_dict(
        {
            "model_type": "nvembed",
            "text_config": {"model_type": "bidir_mistral"},
            "latent_attention_config": {"model_type": "latent_attention"},
        }
    )
    assert (cfg.latent.num_latents_value, cfg.latent.num_cross_heads) == (512, 8)
    assert cfg.hidden_size == cfg.latent.cross_dim_head == 4096 and cfg.mask_instruction
    assert not cfg.text.is_causal and NVEmbedConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    shapes = jax.tree.leaves(nn.meta.unbox(abstract_params(EmbedderConfig(encoder=cfg))))
    assert round(sum(math.prod(s.shape) for s in shapes) / 1e9, 2) == 7.85


@pytest.fixture(scope="module")
def nvembed_folder(tmp_path_factory):
    """A tiny NV-Embed-layout folder: config.json as NV-Embed-v2's (a `bidir_mistral` body with
    a sliding window of 8 that NV-Embed ignores), `embedding_model.*` + `latent_attention_model.*`
    safetensors, and a tokenizer that puts BOS first and pads with EOS on the right."""
    from safetensors.torch import save_file
    from tokenizers import processors

    from tests.test_tokenizer import _byte_level_bpe

    folder = tmp_path_factory.mktemp("nvembed") / "model"
    bpe = _byte_level_bpe()
    bpe.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bpe.token_to_id("<s>"))]
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(12)
    text_cfg = transformers.MistralConfig(
        **{**TINY_DECODER, "vocab_size": 512, "max_position_embeddings": 256}, sliding_window=8
    )
    body = transformers.MistralModel(text_cfg).eval()
    latent_cfg = LatentAttentionConfig(**TINY_LATENT)
    tensors = {f"embedding_model.{k}": v for k, v in body.state_dict().items()}
    tensors |= {k: torch.tensor(v) for k, v in latent_state(latent_cfg, seed=3).items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = {
        "model_type": "nvembed",
        "architectures": ["NVEmbedModel"],
        "hidden_size": 64,
        "add_eos": True,
        "add_pad_token": True,
        "is_mask_instruction": True,
        "padding_side": "right",
        "latent_attention_config": {"model_type": "latent_attention", **TINY_LATENT},
        "text_config": {**text_cfg.to_dict(), "model_type": "bidir_mistral"},
    }
    (folder / "config.json").write_text(json.dumps(config, default=str))
    return folder, body, tokenizer


def nvembed_reference(folder, body, tokenizer, texts: list[str], instruction: str) -> np.ndarray:
    """What NV-Embed's own `encode(texts, instruction)` computes: instruction + text + EOS,
    right padding, the first len(tokenize(instruction)) positions out of the mean."""
    batch = tokenizer(
        [instruction + t + tokenizer.eos_token for t in texts], padding=True, return_tensors="np"
    )
    mask = batch["attention_mask"]
    pool_mask = mask.copy().astype(np.float64)
    pool_mask[:, : len(tokenizer.tokenize(instruction)) if instruction else 0] = 0
    hidden = torch_hidden(body, batch["input_ids"], mask, causal=False)
    state = {k: v for k, v in hf_io.read_state_dict(folder).items() if "latent" in k}
    return nvembed_pool(latent_reference(hidden, state, TINY_LATENT["num_cross_heads"]), pool_mask)


TEXTS = [
    "are judo throws allowed in wrestling?",
    "",
    "how to become a radiology technician in michigan?",
    "the quick brown fox jumps over the lazy dog " * 3,
    "Zürich naïve café",
]


@pytest.mark.parametrize("instruction", [INSTRUCTION, ""])
def test_nvembed_folder_matches_nv_embed_encode(nvembed_folder, instruction):
    from jasper_jax.encode import TextEncoder
    from jasper_jax.models.loading import load_model

    folder, body, tokenizer = nvembed_folder
    loaded = load_model(folder)
    assert loaded.config.encoder.model_type == "nvembed" and loaded.config.pooling == "mean"
    assert loaded.text_suffix == "</s>" and not loaded.pool_prompt
    encoder = TextEncoder(loaded, batch_size=4)
    got = encoder.encode(TEXTS, prompt=instruction or None)
    want = nvembed_reference(folder, body, tokenizer, TEXTS, instruction)
    diff = np.abs(got - want).max()
    print(f"nvembed folder, instruction={bool(instruction)}: max abs diff {diff:.2e}")
    assert diff < POOLER_TOL
    # the EOS is appended and the instruction really is left out of the mean
    ids = encoder.text_tokenizer.tokenize(encoder._suffixed(["hi"]), 64).ids[0]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    if instruction:
        loaded.pool_prompt = True
        pooled_all = TextEncoder(loaded, batch_size=4).encode(TEXTS, prompt=instruction)
        assert np.abs(pooled_all - want).max() > 1e-3


def test_nvembed_teacher_runs_on_our_port(nvembed_folder):
    """`jasper-jax teachers --teacher <folder>:prompt=... --backend jax` loads the same way."""
    from jasper_jax.data.teachers import load_teacher

    folder, body, tokenizer = nvembed_folder
    teacher = load_teacher(f"{folder}:prompt={INSTRUCTION}", backend="jax")
    assert teacher.dim == 64 and teacher.prompt == INSTRUCTION
    want = nvembed_reference(folder, body, tokenizer, TEXTS, INSTRUCTION)
    assert np.abs(unit(teacher.encode(TEXTS)) - want).max() < POOLER_TOL


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"model_type": "llama"}, "supported architectures are .*'mistral', 'mpnet', 'nvembed'"),
        (
            {"model_type": "nvembed", "text_config": {"model_type": "qwen2"}},
            "only a Mistral body \\['bidir_mistral', 'mistral'\\]",
        ),
        (
            {
                "model_type": "nvembed",
                "text_config": {"model_type": "bidir_mistral", "hidden_size": 64},
                "latent_attention_config": {"latent_dim": 32, "hidden_dim": 32},
            },
            "must equal the decoder's hidden_size 64",
        ),
    ],
)
def test_unsupported_configs_are_one_clear_line(tmp_path, config, match):
    from jasper_jax.models.loading import encoder_config_from_folder

    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModel, match=match) as err:
        encoder_config_from_folder(tmp_path)
    assert "\n" not in str(err.value)


def test_nvembed_sharded_and_bf16_match_unsharded(nvembed_folder):
    """The teacher at scale runs sharded: on a (data 2, tensor 4) mesh of fake CPU devices the
    latent layer's projections are split over `tensor` and the vectors stay the same; bfloat16
    compute stays within cosine 0.999."""
    import jax.numpy as jnp

    from jasper_jax import sharding
    from jasper_jax.models.loading import load_model

    folder, _, tokenizer = nvembed_folder
    loaded = load_model(folder)
    texts = [t + "</s>" for t in TEXTS if t]  # a non-empty mean for every row past position 3
    batch = tokenizer(texts * 2, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int32), batch["attention_mask"].astype(np.int32)
    run = jax.jit(
        lambda m, p, i, a: m.apply({"params": p}, i, a, pool_from=3)["pooled"], static_argnums=0
    )
    plain = np.asarray(run(Embedder(loaded.config), loaded.params, ids, mask))
    mesh = sharding.make_mesh((2, 1, 4))
    shardings = sharding.param_shardings(abstract_params(loaded.config), mesh)
    latent = shardings["encoder"]["latent_attention_model"]["cross_attend_blocks_0"]["fn"]
    assert "tensor" in str(latent["to_kv"]["kernel"].spec)
    rows = sharding.batch_sharding(mesh, 2)
    sharded = run(
        Embedder(loaded.config),
        jax.device_put(loaded.params, shardings),
        jax.device_put(ids, rows),
        jax.device_put(mask, rows),
    )
    bf16 = run(Embedder(loaded.config, dtype=jnp.bfloat16), loaded.params, ids, mask)
    diff, cos = np.abs(np.asarray(sharded) - plain).max(), (np.asarray(bf16) * plain).sum(-1)
    print(f"nvembed sharded (2,1,4): max abs diff {diff:.2e}; bfloat16: min cos {cos.min():.5f}")
    assert diff < 1e-5 and cos.min() >= 0.999
