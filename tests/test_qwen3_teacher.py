"""A Qwen3-Embedding-style sentence-transformers folder (causal Qwen3, last-token pooling, an
end-of-text token appended, left padding, query prompt) through our whole path: loading, the
cached tokenizer, `TextEncoder` and a teacher dataset, against sentence-transformers itself. The
folder is saved by sentence-transformers 6, which keeps the pooling mode as a name and the token
limit in the tokenizer config."""

from pathlib import Path

import numpy as np
import pytest

from tests.test_tokenizer import _byte_level_bpe
from tests.text_samples import varied_texts

QUERY_PROMPT = "Instruct: Given a query, retrieve relevant passages\nQuery:"


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory) -> Path:
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import processors

    folder = tmp_path_factory.mktemp("qwen3") / "model"
    bpe = _byte_level_bpe()
    eos = bpe.token_to_id("<|endoftext|>")
    # Qwen3-Embedding's tokenizer appends <|endoftext|>, whose state the last-token pool reads
    bpe.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
    )
    tokenizer = transformers.Qwen2Tokenizer(
        tokenizer_object=bpe,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )
    torch.manual_seed(7)
    config = transformers.Qwen3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        max_position_embeddings=256,
        rope_theta=10000.0,
    )
    hf = folder / "hf"
    transformers.Qwen3Model(config).save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    body = models.Transformer(str(hf), max_seq_length=64)
    pool = models.Pooling(64, pooling_mode="lasttoken")
    st = SentenceTransformer(
        modules=[body, pool, models.Normalize()],
        prompts={"query": QUERY_PROMPT, "document": ""},
        device="cpu",
    )
    st.save(str(folder))
    return folder


def test_qwen3_embedding_folder_matches_sentence_transformers(qwen3_folder, tmp_path):
    from sentence_transformers import SentenceTransformer

    from jasper_jax.encode import TextEncoder
    from jasper_jax.models.loading import load_model

    texts = varied_texts(120)
    st = SentenceTransformer(str(qwen3_folder), device="cpu")
    loaded = load_model(qwen3_folder)
    assert loaded.config.encoder.model_type == "qwen3" and loaded.config.pooling == "last"
    assert loaded.config.encoder.is_causal
    encoder = TextEncoder(loaded, batch_size=16)
    for prompt in (None, QUERY_PROMPT):
        want = st.encode(texts, prompt=prompt, batch_size=16, normalize_embeddings=True)
        got = encoder.encode(texts, prompt=prompt)
        cos = np.sum(got * want, axis=1)
        assert cos.min() >= 0.9999, (prompt, cos.min())
    # the appended end-of-text token is in our ids too, so the pool reads the same position
    ids = encoder.text_tokenizer.tokenize(["hello"], 64).ids[0]
    assert ids[-1] == encoder.text_tokenizer.pad_token_id


def test_qwen3_teacher_dataset(qwen3_folder, tmp_path):
    from sentence_transformers import SentenceTransformer

    from jasper_jax.data.teacher_dataset import build_teacher_dataset, open_teacher_dataset

    texts = [t for t in varied_texts(41) if t.strip()]  # a build skips empty texts
    out = tmp_path / "data"
    build_teacher_dataset(texts, [str(qwen3_folder)], out, backend="jax", progress=False)
    source, meta = open_teacher_dataset(out)
    rows = sorted(source.__getitems__(list(range(len(source)))), key=lambda r: int(r["index"]))
    assert [r["text"].decode() for r in rows] == texts
    vectors = np.stack([r["teacher"] for r in rows]).astype(np.float32)
    want = SentenceTransformer(str(qwen3_folder), device="cpu").encode(
        texts, normalize_embeddings=True
    )
    assert vectors.shape == (len(texts), 64)
    assert np.sum(vectors * want, axis=1).min() >= 0.9999


@pytest.mark.parametrize(
    ("config", "want"),
    [
        ({"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}, "last"),
        ({"pooling_mode": "lasttoken"}, "last"),
        ({"pooling_mode": ["cls"]}, "cls"),
        ({"pooling_mode": "mean", "include_prompt": True}, "mean"),
        ({"pooling_mode": "max"}, None),
        ({"pooling_mode": ["mean", "cls"]}, None),
        ({"pooling_mode_mean_tokens": False}, None),
    ],
)
def test_pooling_config_both_spellings(tmp_path, config, want):
    """sentence-transformers < 6 writes boolean keys, 6 and later `pooling_mode`."""
    import json

    from jasper_jax.errors import UnsupportedModel
    from jasper_jax.models.loading import _pooling_mode

    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    modules = [{"idx": 1, "name": "1", "path": "1_Pooling", "type": "x.Pooling"}]
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    if want is None:
        with pytest.raises(UnsupportedModel, match="exactly one of"):
            _pooling_mode(tmp_path)
    else:
        assert _pooling_mode(tmp_path) == want
