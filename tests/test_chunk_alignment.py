"""Chunk alignment: span pooling vs an explicit per-span reference, the loss vs NumPy, training
in chunk mode (plain and gradient cache), one-pass chunk encoding and its CLI."""

import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from jasper_jax.chunk_loss import chunk_alignment_loss
from jasper_jax.config import to_settings
from jasper_jax.data.eval_records import load_eval_chunks
from jasper_jax.encode import TextEncoder
from jasper_jax.encode_chunks import ChunkEncoder
from jasper_jax.errors import UserError
from jasper_jax.losses import LossConfig
from jasper_jax.models.embedder import Embedder, EmbedderConfig, init_params
from jasper_jax.models.qwen2 import Qwen2Config
from jasper_jax.run_folder import load_any_model
from jasper_jax.train.loop import train_and_evaluate
from jasper_jax.train.state import merge_params, split_params
from jasper_jax.train.step import gradcache_value_and_grad, in_batch_loss, text_forward
from tests.test_text_encoders import mixed_batch, tiny_bert, to_params
from tests.train_fixtures import make_tiny_student, read_metrics, tiny_config, tiny_settings

# Row lengths 12, 7, 1, 4 (mixed_batch); spans reach into padding and include empty ones.
SPANS = np.array(
    [
        [[1, 5], [5, 11], [11, 12]],
        [[0, 3], [3, 10], [6, 6]],
        [[0, 1], [0, 0], [0, 0]],
        [[2, 9], [1, 3], [0, 4]],
    ],
    np.int32,
)


def _with_heads(cfg, encoder_params, seed=0):
    params = nn.meta.unbox(init_params(cfg, jax.random.key(seed)))
    return {**params, "encoder": encoder_params["encoder"]}


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def test_chunk_vectors_equal_explicit_per_span_means_of_the_torch_states():
    torch_model, encoder_cfg = tiny_bert()
    cfg, encoder_params = to_params(torch_model, encoder_cfg, heads=(10,))
    params = _with_heads(cfg, encoder_params)
    ids, mask = mixed_batch(encoder_cfg.vocab_size)
    document, chunks = Embedder(cfg).apply({"params": params}, ids, mask, chunk_spans=SPANS)
    with torch.no_grad():
        states = torch_model(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
        ).last_hidden_state.numpy()
    kernel = np.asarray(params["heads"]["dense_10"]["kernel"])
    bias = np.asarray(params["heads"]["dense_10"]["bias"])
    for row in range(len(ids)):
        length = int(mask[row].sum())
        for c, (start, end) in enumerate(SPANS[row]):
            tokens = states[row, start : min(end, length)]  # padding is never part of a chunk
            if not len(tokens):  # an empty span pools to zeros (it is masked in the losses)
                assert not np.asarray(chunks["pooled"][row, c]).any()
                continue
            pooled = tokens.mean(0)
            want = {"pooled": _unit(pooled), "dense_10": _unit(pooled @ kernel + bias)}
            for head, vector in want.items():
                got = np.asarray(chunks[head][row, c])
                np.testing.assert_allclose(got, vector, atol=1e-4, err_msg=str((row, c, head)))
    # The document vector is the usual mean pooling of the same pass.
    plain = Embedder(cfg).apply({"params": params}, ids, mask)
    for head in plain:
        np.testing.assert_allclose(document[head], plain[head], atol=1e-6)


def test_padding_never_leaks_into_a_chunk():
    torch_model, encoder_cfg = tiny_bert()
    cfg, encoder_params = to_params(torch_model, encoder_cfg, heads=(10,))
    params = _with_heads(cfg, encoder_params)
    ids, mask = mixed_batch(encoder_cfg.vocab_size)
    run = lambda i, m: Embedder(cfg).apply({"params": params}, i, m, chunk_spans=SPANS)[1]
    base = run(ids, mask)
    # Longer padding holding random ids, with spans that reach into it: same chunk vectors.
    rng = np.random.default_rng(3)
    wide_ids = rng.integers(1, encoder_cfg.vocab_size, (4, 20)).astype(np.int32)
    wide_ids[:, :12] = np.where(mask, ids, wide_ids[:, :12])
    wide_mask = np.zeros((4, 20), np.int32)
    wide_mask[:, :12] = mask
    wide = run(wide_ids, wide_mask)
    for head in base:
        np.testing.assert_allclose(wide[head], base[head], atol=1e-5)


def test_without_attention_context_a_chunk_equals_encoding_it_alone():
    """A 0-layer bidirectional Qwen2 (embeddings + final norm: no attention context) gives each
    chunk exactly the vector of that chunk encoded on its own; 2 layers mix in the context."""
    pieces = [[5, 9, 13], [21, 8], [3, 3, 30, 17]]
    ids = np.array([sum(pieces, [])], np.int32)
    mask = np.ones_like(ids)
    bounds = np.cumsum([0, *map(len, pieces)])
    spans = np.stack([bounds[:-1], bounds[1:]], 1)[None].astype(np.int32)
    for layers, same in ((0, True), (2, False)):
        encoder = Qwen2Config(
            vocab_size=40,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        cfg = EmbedderConfig(encoder=encoder, heads=(6,))
        params = nn.meta.unbox(init_params(cfg, jax.random.key(1)))
        model = Embedder(cfg)
        _, chunks = model.apply({"params": params}, ids, mask, chunk_spans=spans)
        for c, piece in enumerate(pieces):
            alone = model.apply(
                {"params": params}, np.array([piece], np.int32), np.ones((1, len(piece)), np.int32)
            )
            close = np.allclose(chunks["dense_6"][0, c], alone["dense_6"][0], atol=1e-5)
            assert close == same, (layers, c)


def _numpy_chunk_loss(student, teacher, doc_cfg, chunk_cfg):
    def cos(s, t, m):
        s, t = _unit(s), _unit(t)
        return np.sum(m * (1 - np.sum(s * t, -1))) / max(m.sum(), 1)

    def sim(s, t, m):
        w = m[:, None] * m[None, :]
        d = _unit(s) @ _unit(s).T - _unit(t) @ _unit(t).T
        return np.sum(w * d**2) / max(w.sum(), 1)

    ones = np.ones(len(teacher["document"]))
    doc = doc_cfg.cosine_weight * cos(student["document"]["h"], teacher["document"], ones)
    doc += doc_cfg.similarity_weight * sim(student["document"]["h"], teacher["document"], ones)
    flat = lambda x: x.reshape(-1, x.shape[-1])
    m = teacher["chunk_mask"].reshape(-1).astype(np.float64)
    s, t = flat(student["chunks"]["h"]), flat(teacher["chunks"])
    chunk = chunk_cfg.cosine_weight * cos(s, t, m) + chunk_cfg.similarity_weight * sim(s, t, m)
    return doc + chunk


def test_chunk_loss_equals_numpy_formula():
    rng = np.random.default_rng(0)
    student = {
        "document": {"h": rng.normal(size=(4, 8))},
        "chunks": {"h": rng.normal(size=(4, 3, 8))},
    }
    teacher = {
        "document": rng.normal(size=(4, 8)),
        "chunks": rng.normal(size=(4, 3, 8)),
        "chunk_mask": np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]]),
    }
    doc_cfg = LossConfig(cosine_weight=3.0, similarity_weight=50.0, resim_weight=0.0)
    chunk_cfg = LossConfig(cosine_weight=2.0, similarity_weight=70.0, resim_weight=0.0)
    to_jax = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
    total, metrics = chunk_alignment_loss(to_jax(student), to_jax(teacher), doc_cfg, chunk_cfg)
    want = _numpy_chunk_loss(student, teacher, doc_cfg, chunk_cfg)
    np.testing.assert_allclose(total, want, rtol=1e-5)
    assert float(metrics["chunks"]) == 6
    assert {"cos/h", "sim/h", "chunk_cos/h", "chunk_sim/h"} <= set(metrics)
    # Masked chunks do not matter: change them, same loss.
    teacher["chunks"][3] = 100.0
    student["chunks"]["h"][0, 2] = -7.0
    again, _ = chunk_alignment_loss(to_jax(student), to_jax(teacher), doc_cfg, chunk_cfg)
    np.testing.assert_allclose(again, total, rtol=1e-6)


def test_gradcache_equals_plain_in_chunk_mode():
    torch_model, encoder_cfg = tiny_bert()
    cfg, encoder_params = to_params(torch_model, encoder_cfg, heads=(10, 4))
    cfg = EmbedderConfig(encoder=cfg.encoder, heads=(10, 4), default_head="dense_10")
    params = _with_heads(cfg, encoder_params)
    ids, mask = mixed_batch(encoder_cfg.vocab_size)
    rng = np.random.default_rng(1)
    batch = {
        "input_ids": jnp.asarray(np.tile(ids, (2, 1))),
        "attention_mask": jnp.asarray(np.tile(mask, (2, 1))),
        "teacher": jnp.asarray(rng.normal(size=(8, 10)), jnp.float32),
        "chunk_spans": jnp.asarray(np.tile(SPANS, (2, 1, 1))),
        "chunk_mask": jnp.asarray(np.tile(SPANS[..., 1] > SPANS[..., 0], (2, 1)).astype(np.int32)),
        "chunk_teacher": jnp.asarray(rng.normal(size=(8, 3, 10)), jnp.float32),
    }
    forward = text_forward(Embedder(cfg), cfg.head_names, dropout=False, chunks=True)
    loss_fn = in_batch_loss(LossConfig(), chunk_config=LossConfig(resim_weight=0.0))
    paths = frozenset(
        k for k in traverse_util.flatten_dict(params) if k[0] == "heads" or "layer_1" in k
    )
    trainable, frozen = split_params(params, paths)
    key = jax.random.key(0)
    plain = lambda p: loss_fn(*forward(merge_params(p, frozen), batch, key))
    (want, _), want_grads = jax.value_and_grad(plain, has_aux=True)(trainable)
    (got, metrics), grads = gradcache_value_and_grad(
        forward, loss_fn, trainable, frozen, batch, key, 4
    )
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert "chunk_cos/dense_10" in metrics and "chunk_sim/dense_4" in metrics
    scale = max(float(jnp.abs(w).max()) for w in jax.tree.leaves(want_grads))
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * scale)


def wide_fake_teacher():
    """A deterministic 384-d stand-in teacher (the tiny student's head is 384-d)."""
    from jasper_jax.data.teachers import Teacher
    from tests.test_teacher_dataset import fake_vector

    def encode(texts):
        return np.stack([np.tile(fake_vector(t), 64) for t in texts])

    return Teacher("wide-fake", "wide-fake", 384, None, "model", "tokenizer", encode)


ONE_BATCH = 8  # train documents: every training step sees the same batch of all of them


@pytest.fixture(scope="module")
def chunk_setup(tmp_path_factory):
    """A tiny BERT student and chunk-mode teacher datasets of documents of consecutive corpus
    texts, with a 384-d stand-in teacher: "train" holds exactly ONE_BATCH documents (each at
    most 46 student tokens), "validation" the held-out ones."""
    from jasper_jax.data.chunking import documents_from_texts
    from jasper_jax.data.corpus import load_corpus
    from jasper_jax.data.teacher_assets import teacher_folder
    from jasper_jax.data.teacher_dataset import build_teacher_dataset

    teacher = wide_fake_teacher()
    root = tmp_path_factory.mktemp("chunk_setup")
    out = {"student": make_tiny_student(root / "student")}
    for split, n, keep in (("train", 60, ONE_BATCH), ("validation", 120, None)):
        texts = load_corpus("embedded", split=split)[:n]
        docs = documents_from_texts(texts, lambda t: len(t.split()) + 2, 20, 50)[:keep]
        out[split] = root / split
        build_teacher_dataset(
            docs,
            [teacher],
            out[split],
            progress=False,
            chunking="sentences:16",
            chunk_tokenizer=teacher_folder("all-MiniLM-L6-v2"),
        )
    return out


MAX_CHUNKS = 2  # some train documents have more: those chunks are dropped


@pytest.fixture(scope="module")
def chunk_run(chunk_setup, tmp_path_factory):
    """Stage 3 in chunk mode, 4 steps on the one-batch train set; {"config", "workdir",
    "result"}."""
    overrides = {
        "data.max_chunks": MAX_CHUNKS,
        "data.max_length": 48,
        "data.eval_texts": 16,
        "train.steps": 4,
        "optim.lr": 1e-3,
    }
    s = tiny_settings(chunk_setup, 3, **overrides)
    workdir = tmp_path_factory.mktemp("chunk_run") / "run"
    return {"config": s, "workdir": workdir, "result": train_and_evaluate(s, workdir)}


def test_chunk_mode_training_lowers_the_loss_on_the_batch_it_trains_on(chunk_setup, chunk_run):
    """The train set is one batch, so every step's loss is measured on the same documents:
    training lowers the total and the chunk terms (the closed-form head starts with the 8
    document vectors fitted exactly, so the drop is the chunk alignment's). Dropped chunks (all
    documents fit max_length) are exactly those beyond max_chunks."""
    assert chunk_run["result"]["status"] == "finished"
    records = read_metrics(chunk_run["workdir"])
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    first, last = records[0], records[-1]
    for name in ("train/loss", "train/chunk_total", "train/chunk_sim/dense_32"):
        assert last[name] < first[name], (name, first[name], last[name])
    _, spans, _ = load_eval_chunks(chunk_setup["train"])
    counts = np.array([len(s) for s in spans])
    assert len(counts) == ONE_BATCH and counts.max() > MAX_CHUNKS
    beyond = np.maximum(counts - MAX_CHUNKS, 0).sum() / counts.sum()
    assert last["train/dropped_chunks"] == pytest.approx(beyond, abs=1e-9)


def test_chunk_fidelity_is_a_recount_from_the_saved_model(chunk_setup, chunk_run):
    """The reported "chunks/<head>" cosine equals the mean cosine of the saved model's chunk
    vectors (one pass per held-out document) to the stand-in teacher's vector of each chunk's
    own text, computed here afresh."""
    scores, c = chunk_run["result"]["eval"], chunk_run["config"]
    encoder = TextEncoder(load_any_model(chunk_run["workdir"]), batch_size=4)
    documents, spans, _ = load_eval_chunks(chunk_setup["validation"], limit=16)
    got = ChunkEncoder(encoder).encode(documents, spans=spans, max_length=c.data.max_length)
    texts = [documents[i][a:b] for i, (a, b) in zip(got.owner, got.spans, strict=True)]
    assert len(texts) > 16  # several chunks per document
    teacher = _unit(wide_fake_teacher().encode(texts))
    want = np.mean(np.sum(got.chunks["dense_384"] * teacher, axis=1))
    assert scores["chunks/dense_384"]["cosine"] == pytest.approx(want, abs=1e-5)
    # The reduced heads have no teacher of their size: rank metrics only, as for documents.
    assert "cosine" not in scores["chunks/dense_16"] and "spearman" in scores["chunks/dense_16"]


def test_chunk_mode_on_plain_teacher_data_is_refused(chunk_setup, tmp_path):
    from jasper_jax.data.teacher_dataset import build_teacher_dataset

    plain = tmp_path / "plain"
    build_teacher_dataset([f"text {i}." for i in range(20)], [wide_fake_teacher()], plain)
    c = tiny_config({**chunk_setup, "train": plain}, 3, **{"data.max_chunks": 4})
    with pytest.raises(UserError, match="no chunk vectors"):
        train_and_evaluate(to_settings(c), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_config_rejects_bad_chunk_settings(chunk_setup):
    with pytest.raises(UserError, match="data.max_chunks"):
        tiny_config(chunk_setup, 3, **{"data.max_chunks": -1})
    with pytest.raises(UserError, match="loss.chunk_cosine"):
        tiny_config(chunk_setup, 3, **{"loss.chunk_cosine": -1.0})


def test_chunk_encoder_one_pass(chunk_setup):
    from jasper_jax.models.loading import load_model

    model = load_model(chunk_setup["student"])
    encoder = TextEncoder(model, batch_size=4)
    docs = ["A cat sat. A dog ran. Birds flew high above the hills.", "Short one.", "x " * 80]
    result = ChunkEncoder(encoder).encode(docs, chunking="sentences:4", max_length=32)
    np.testing.assert_allclose(result.documents["pooled"], encoder.encode(docs, max_length=32),
                               atol=1e-5)  # fmt: skip
    assert result.chunks["pooled"].shape == (len(result.owner), 32)
    assert result.dropped > 0  # the 80-token document's later chunks are cut at 32 tokens
    assert list(result.owner) == sorted(result.owner) and set(result.owner) == {0, 1, 2}
    texts = [docs[i][a:b] for i, (a, b) in zip(result.owner, result.spans, strict=True)]
    assert texts[:3] == ["A cat sat.", "A dog ran.", "Birds flew high above"]
    np.testing.assert_allclose(np.linalg.norm(result.chunks["pooled"], axis=1), 1, atol=1e-5)
    with pytest.raises(UserError, match="outside"):
        ChunkEncoder(encoder).encode(["abc"], spans=[[(0, 9)]])


def test_encode_cli_writes_chunks(chunk_setup, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(
        json.dumps({"text": "First part here. Second part there.", "chunks": [[0, 16], [17, 35]]})
        + "\n"
        + json.dumps({"text": "Only one.", "chunks": [[0, 9]]})
        + "\n"
    )
    out = tmp_path / "v.npy"
    cmd = [sys.executable, "-m", "jasper_jax.cli", "encode", "--model", str(chunk_setup["student"])]
    done = subprocess.run(
        [*cmd, "--input", str(docs), "--output", str(out), "--chunks", "given"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert np.load(out).shape == (2, 32) and np.load(f"{out}.chunks.npy").shape == (3, 32)
    rows = [json.loads(line) for line in Path(f"{out}.chunks.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["First part here.", "Second part there.", "Only one."]
    docs.write_text(json.dumps({"text": "abc", "chunks": [[2, 1]]}) + "\n")
    bad = subprocess.run(
        [*cmd, "--input", str(docs), "--output", str(tmp_path / "b.npy"), "--chunks", "given"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "chunk span [2, 1]" in bad.stderr
    assert not (tmp_path / "b.npy").exists()
