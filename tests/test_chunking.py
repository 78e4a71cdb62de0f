"""Chunking, chunk-mode teacher datasets and the chunk pipeline (character -> token spans)."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from jasper_jax.data.chunking import (
    ChunkingConfig,
    chunk_texts,
    documents_from_texts,
    plain_tokenizer,
    sentence_spans,
    token_spans,
)
from jasper_jax.data.eval_records import load_eval_chunks
from jasper_jax.data.pipeline import make_text_pipeline
from jasper_jax.data.teacher_assets import teacher_folder
from jasper_jax.data.teacher_dataset import build_teacher_dataset, open_teacher_dataset
from jasper_jax.errors import UserError
from tests.test_teacher_dataset import fake_teacher, fake_vector, unit

DOCS = [
    "The cat sat on the mat. It was happy! Then a dog came along and barked loudly at the cat, "
    "which ran away up a tall tree.",
    "Stocks fell sharply today.\nInvestors worried about inflation. The bank said nothing.",
    "One line without an end",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(teacher_folder("all-MiniLM-L6-v2")))


@pytest.fixture(scope="module")
def backend(tokenizer):
    return plain_tokenizer(tokenizer)


def n_tokens(backend, text):
    return len(backend.encode(text, add_special_tokens=False).ids)


def test_sentence_spans_cover_sentences_without_whitespace():
    text = "  First one.  Second?\n\nThird!  last bit "
    pieces = [text[a:b] for a, b in sentence_spans(text)]
    assert pieces == ["First one.", "Second?", "Third!", "last bit"]


SPECS = ["sentences:12", "sentences:5", "sentences:12:6", "tokens:8", "tokens:8:3", "random:3:9"]


@pytest.mark.parametrize("spec", SPECS)
def test_chunks_respect_size_and_cover_every_token(backend, spec):
    all_spans = chunk_texts(DOCS, backend, ChunkingConfig.parse(spec))
    for text, spans in zip(DOCS, all_spans, strict=True):
        config = ChunkingConfig.parse(spec).for_document(text)
        assert all(n_tokens(backend, text[a:b]) <= config.size for a, b in spans), spans
        assert all(0 <= a < b <= len(text) for a, b in spans)
        starts = [a for a, _ in spans]
        assert starts == sorted(starts)
        offsets = backend.encode(text, add_special_tokens=False).offsets
        covered = {i for i, (s, _) in enumerate(offsets) for a, b in spans if a <= s < b}
        assert covered == set(range(len(offsets)))  # no token falls between chunks
        shared = [
            len({i for i, (s, _) in enumerate(offsets) if a1 <= s < b1 and a2 <= s < b2})
            for (a1, b1), (a2, b2) in zip(spans, spans[1:], strict=False)
        ]
        if config.mode == "tokens":
            assert all(n == config.overlap for n in shared), shared
        else:  # sentence chunks share at most `overlap` tokens (none without overlap)
            assert all(n <= config.overlap for n in shared), shared


def test_sentences_mode_keeps_sentences_whole_when_they_fit(backend):
    spans = chunk_texts([DOCS[1]], backend, ChunkingConfig("sentences", 64))[0]
    assert [DOCS[1][a:b] for a, b in spans] == [DOCS[1]]
    spans = chunk_texts([DOCS[1]], backend, ChunkingConfig("sentences", 7))[0]
    assert [DOCS[1][a:b] for a, b in spans] == [
        "Stocks fell sharply today.",
        "Investors worried about inflation.",
        "The bank said nothing.",
    ]


def test_sentence_overlap_repeats_whole_trailing_sentences(backend):
    text = " ".join(f"Sentence number {w} is here." for w in "abcdefgh")
    sentences = [text[a:b] for a, b in sentence_spans(text)]
    per = n_tokens(backend, sentences[0])  # every sentence has the same token count

    def chunks(size, overlap=0):
        config = ChunkingConfig("sentences", size, overlap)
        return [text[a:b] for a, b in chunk_texts([text], backend, config)[0]]

    plain = chunks(3 * per)
    assert plain == [" ".join(sentences[i : i + 3]) for i in (0, 3, 6)]
    # Each chunk after the first starts with the last sentence of the one before.
    expected = [" ".join(sentences[i : i + 3]) for i in (0, 2, 4)] + [" ".join(sentences[6:])]
    assert chunks(3 * per, per) == expected
    assert chunks(3 * per, per - 1) == plain  # less than one sentence carries nothing back


def test_random_chunking_draws_per_document_and_is_reproducible(backend):
    from jasper_jax.data.corpus import load_corpus

    texts = load_corpus("embedded")[:3000]
    docs = documents_from_texts(texts, lambda t: n_tokens(backend, t), 60, 160)[:150]
    config = ChunkingConfig.parse("random:16:48")
    assert config.spec() == "random:16:48"
    drawn = [config.for_document(d) for d in docs]
    assert all(16 <= c.size <= 48 for c in drawn)
    assert all(0.3 * c.size - 1 <= c.overlap <= 0.6 * c.size + 1 for c in drawn)
    assert len({c.size for c in drawn}) > 10  # sizes vary between documents
    assert 80 < sum(c.mode == "sentences" for c in drawn) < 135  # 70 % of 150 expected
    spans = chunk_texts(docs, backend, config)
    assert spans == chunk_texts(docs, backend, config)  # same text, same chunks
    assert chunk_texts(docs[5:7][::-1], backend, config) == spans[5:7][::-1]  # not order-bound
    for doc, c, doc_spans in zip(docs, drawn, spans, strict=True):
        assert doc_spans == chunk_texts([doc], backend, c)[0]


BAD_SPECS = ["words:5", "tokens:0", "sentences:8:8", "tokens:4:4", "x", "random:8", "random:9:4"]


@pytest.mark.parametrize("spec", [*BAD_SPECS, "random:0:4", "random:4:8:2", "tokens:4:1:1"])
def test_bad_chunking_specs_are_refused(spec):
    with pytest.raises(UserError, match="chunk"):
        ChunkingConfig.parse(spec)


def test_token_spans_find_the_chunk_tokens_with_a_prompt_and_truncation(tokenizer, backend):
    text = DOCS[0]
    spans = np.array(chunk_texts([text], backend, ChunkingConfig("sentences", 6))[0])
    prompt = "query: "
    enc = tokenizer(prompt + text, truncation=True, max_length=20, return_offsets_mapping=True,
                    return_special_tokens_mask=True)  # fmt: skip
    real = 1 - np.array(enc["special_tokens_mask"])
    token_ranges, kept = token_spans(spans, enc["offset_mapping"], real, shift=len(prompt))
    ids = enc["input_ids"]
    assert kept[:2].all() and not kept[-1]  # later chunks do not fit in 20 tokens
    for (a, b), (s, e), k in zip(spans, token_ranges, kept, strict=True):
        if k:
            assert tokenizer.decode(ids[s:e]) == tokenizer.decode(
                tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
            )
    # A chunk cut in the middle by max_length is dropped, not kept half.
    last_kept_end = max(b for (_, b), k in zip(spans, kept, strict=True) if k)
    cut_in = [a < last_kept_end + 40 and not k for (a, _), k in zip(spans, kept, strict=True)]
    assert any(cut_in)


def test_documents_from_consecutive_texts_have_lengths_in_range(backend):
    texts = [f"sentence number {i} talks about thing {i % 7}" for i in range(200)]
    docs = documents_from_texts(texts, lambda t: n_tokens(backend, t), 40, 80, seed=1)
    assert " ".join(docs).count("sentence number") == 200  # every text kept, in order
    lengths = [n_tokens(backend, d) for d in docs]
    assert max(lengths) <= 80 and min(lengths[:-1]) >= 40 - 12
    spans = sentence_spans(docs[0])
    assert docs[0][spans[0][0] : spans[0][1]] == "sentence number 0 talks about thing 0."


@pytest.fixture(scope="module")
def chunk_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("chunks") / "ds"
    folder = teacher_folder("all-MiniLM-L6-v2")
    docs = documents_from_texts(
        [f"text {i} is about topic {i % 5} and more." for i in range(120)],
        lambda t: len(t.split()),
        20,
        60,
    )
    build_teacher_dataset(
        docs,
        [fake_teacher()],
        out,
        progress=False,
        chunking="sentences:12",
        chunk_tokenizer=folder,
        chunk_size=4,
    )
    return out, docs, folder


def test_chunk_vectors_are_each_chunk_encoded_alone(chunk_dataset):
    out, docs, _ = chunk_dataset
    source, meta = open_teacher_dataset(out)
    assert meta["chunks"]["chunking"] == "sentences:12"
    assert len(source) == len(docs)
    total = 0
    for i in range(len(source)):
        record = source[i]
        text = record["text"].decode()
        assert text == docs[int(record["index"])]
        np.testing.assert_allclose(record["teacher"], unit(fake_vector(text)), atol=1e-6)
        for (a, b), vector in zip(record["chunk_spans"], record["chunk_teacher"], strict=True):
            np.testing.assert_allclose(vector, unit(fake_vector(text[a:b])), atol=1e-6)
        total += len(record["chunk_spans"])
    assert meta["chunks"]["count"] == total
    documents, spans, vectors = load_eval_chunks(out)
    assert documents == docs and sum(map(len, spans)) == len(vectors) == total


def test_chunk_pipeline_batches(chunk_dataset, tokenizer):
    out, _, folder = chunk_dataset
    # Chunk mode keeps fixed-length batches even where length groups are asked for.
    it = make_text_pipeline(
        out, folder, batch_size=4, max_length=24, seed=0, max_chunks=3, length_groups=4
    )
    for _ in range(3):
        batch = next(it)
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (4, 24)
        assert batch["chunk_spans"].shape == (4, 3, 2)
        assert batch["chunk_teacher"].shape == (4, 3, 6)
        mask = batch["chunk_mask"].astype(bool)
        norms = np.linalg.norm(batch["chunk_teacher"], axis=-1)
        np.testing.assert_allclose(norms[mask], 1.0, atol=1e-5)
        assert (norms[~mask] == 0).all() and (batch["chunk_spans"][~mask] == 0).all()
        start, end = batch["chunk_spans"][..., 0], batch["chunk_spans"][..., 1]
        lengths = batch["attention_mask"].sum(1, keepdims=True).repeat(3, axis=1)
        assert (start[mask] >= 1).all() and (end[mask] <= lengths[mask] - 1).all()  # no CLS/SEP
    # Documents of ~20-60 words in 24 tokens: chunks beyond the cut or the 3 slots are counted.
    assert 0 < it.chunks_dropped < it.chunks_seen
    assert it.truncated_texts > 0


def test_chunk_mode_needs_a_chunk_dataset(tmp_path):
    out = tmp_path / "plain"
    build_teacher_dataset(["a b c.", "d e f."], [fake_teacher()], out, progress=False)
    folder = teacher_folder("all-MiniLM-L6-v2")
    with pytest.raises(UserError, match="no chunk vectors.*--chunks"):
        make_text_pipeline(out, folder, batch_size=2, max_length=8, seed=0, max_chunks=4)


def test_given_spans_are_checked(tmp_path):
    texts = ["abc def", "ghi"]
    with pytest.raises(UserError, match=r"text 0: chunk span \[4, 20\].*outside"):
        build_teacher_dataset(
            texts, [fake_teacher()], tmp_path / "a", chunk_spans=[[(0, 3), (4, 20)], [(0, 3)]]
        )
    with pytest.raises(UserError, match="1 lists for 2 non-empty texts"):
        build_teacher_dataset(texts, [fake_teacher()], tmp_path / "b", chunk_spans=[[(0, 3)]])
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_nan_chunk_vector_rejects_its_document(tmp_path):
    texts = ["good one. fine two.", "good three. bad NaN! here."]
    spans = [sentence_spans(t) for t in texts]
    build_teacher_dataset(texts, [fake_teacher()], tmp_path / "ds", chunk_spans=spans)
    source, meta = open_teacher_dataset(tmp_path / "ds")
    assert len(source) == 1 and meta["rejected"]["count"] == 1
    assert source[0]["text"].decode() == texts[0]


def test_other_chunking_is_a_different_dataset(chunk_dataset, tmp_path):
    texts = ["one. two.", "three. four."]
    folder = teacher_folder("all-MiniLM-L6-v2")
    kwargs = dict(progress=False, chunk_tokenizer=folder)
    build_teacher_dataset(
        texts, [fake_teacher()], tmp_path / "ds", chunking="sentences:4", **kwargs
    )
    with pytest.raises(UserError, match="different teacher dataset.*chunks"):
        build_teacher_dataset(
            texts, [fake_teacher()], tmp_path / "ds", chunking="tokens:4", **kwargs
        )
