"""A Qwen3-Embedding-style sentence-transformers folder (causal Qwen3, last-token pooling, an
end-of-text token appended, left padding, query prompt) through our whole path: loading, the
cached tokenizer, `TextEncoder` and a teacher dataset, against sentence-transformers itself. The
folder is saved by sentence-transformers 6, which keeps the pooling mode as a name and the token
limit in the tokenizer config."""

from pathlib import Path

import numpy as np
import pytest

from tests.test_text_encoders import TINY_DECODER
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
    sizes = {**TINY_DECODER, "vocab_size": 512, "max_position_embeddings": 256}
    config = transformers.Qwen3Config(**sizes, head_dim=24)
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


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("all-MiniLM-L6-v2", ("all-MiniLM-L6-v2", None, None, None)),
        ("/m/stella:head=8192", ("/m/stella", "8192", None, None)),
        ("gs://b/m:head=dense_256:prompt_name=query", ("gs://b/m", "dense_256", "query", None)),
        ("m:prompt=Instruct: find it\nQuery: ", ("m", None, None, "Instruct: find it\nQuery: ")),
        ("m:head=24:prompt=", ("m", "24", None, "")),
    ],
)
def test_teacher_spec_options(text, want):
    from jasper_jax.data.teacher_spec import parse_teacher_spec

    got = parse_teacher_spec(text)
    assert (got.source, got.head, got.prompt_name, got.prompt) == want


@pytest.mark.parametrize(
    "text", ["m:head=", "m:head=1:head=2", "m:head=1:dims=3", "m:prompt_name="]
)
def test_teacher_spec_bad_options(text):
    from jasper_jax.data.teacher_spec import parse_teacher_spec
    from jasper_jax.errors import UserError

    with pytest.raises(UserError, match="NAME_OR_FOLDER"):
        parse_teacher_spec(text)


@pytest.fixture(scope="module")
def stella_like(qwen3_folder, tmp_path_factory) -> Path:
    """The Qwen3 folder with two Dense heads, as stella ships them: `2_Dense_16` in
    modules.json (what sentence-transformers runs) and `2_Dense_24` beside it."""
    import json
    import shutil

    import torch
    from sentence_transformers import models

    folder = tmp_path_factory.mktemp("stella") / "model"
    shutil.copytree(qwen3_folder, folder)
    torch.manual_seed(8)
    for dim in (16, 24):
        dense = models.Dense(64, dim, bias=True, activation_function=torch.nn.Identity())
        (folder / f"2_Dense_{dim}").mkdir()
        dense.save(str(folder / f"2_Dense_{dim}"))
    modules = json.loads((folder / "modules.json").read_text())
    normalize = modules.pop()
    dense_type = "sentence_transformers.base.modules.dense.Dense"
    modules += [{"idx": 2, "name": "2", "path": "2_Dense_16", "type": dense_type}]
    modules += [{**normalize, "idx": 3, "name": "3"}]
    (folder / "modules.json").write_text(json.dumps(modules))
    return folder


def test_teacher_head_and_prompt_options(stella_like):
    from sentence_transformers import SentenceTransformer, models

    from jasper_jax.data.teachers import load_teacher
    from jasper_jax.errors import UserError

    texts = varied_texts(30)
    st = SentenceTransformer(str(stella_like), device="cpu")
    assert st.get_embedding_dimension() == 16
    default = load_teacher(str(stella_like), backend="jax")
    assert default.dim == 16 and default.head is None
    np.testing.assert_allclose(
        _unit(default.encode(texts)), st.encode(texts, normalize_embeddings=True), atol=2e-5
    )

    chosen = load_teacher(f"{stella_like}:head=24:prompt_name=query")  # auto -> our port
    assert chosen.dim == 24 and chosen.head == "dense_24" and chosen.prompt == QUERY_PROMPT
    assert chosen.describe()["head"] == "dense_24" and "head" not in default.describe()
    dense24 = models.Dense.load(str(stella_like / "2_Dense_24"))
    reference = SentenceTransformer(modules=[st[0], st[1], dense24, models.Normalize()])
    want = reference.encode(texts, prompt=QUERY_PROMPT, normalize_embeddings=True)
    assert np.sum(_unit(chosen.encode(texts)) * want, axis=1).min() >= 0.9999

    with pytest.raises(UserError, match="runs on our port only"):
        load_teacher(f"{stella_like}:head=24", backend="torch")
    with pytest.raises(
        UserError, match=r"head=32 does not exist in this model; its heads: \['16', '24'\]"
    ):
        load_teacher(f"{stella_like}:head=32")
    with pytest.raises(UserError, match=r"prompt_name='passage' is not one of its prompts"):
        load_teacher(f"{stella_like}:prompt_name=passage")


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)
