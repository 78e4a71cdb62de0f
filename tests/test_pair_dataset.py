"""Pair teacher dataset: rows of (query, positive, k negatives), each text encoded with the
prompt of its role; resumed builds with other prompts are refused; eval loaders refuse it."""

import numpy as np
import pytest

from jasper_jax.cli import main
from jasper_jax.data.eval_records import load_eval_arrays, load_eval_chunks
from jasper_jax.data.pair_dataset import build_pair_dataset
from jasper_jax.data.pairs import PairRows
from jasper_jax.data.teacher_dataset import open_teacher_dataset, pair_width
from jasper_jax.data.teacher_spec import parse_teacher_spec
from jasper_jax.data.teachers import Teacher, load_teacher
from jasper_jax.errors import UserError
from tests.test_dataset_safety import _one_error_line
from tests.test_teacher_dataset import DIM, fake_vector, unit

SMALL = dict(chunk_size=4, progress=False)


def prompted_teacher(prompt, document_prompt, name="fake", dim=DIM) -> Teacher:
    """A fake teacher whose vector of a text depends on the prompt it was given."""

    def encode(texts, prompt=prompt):
        return np.stack([fake_vector((prompt or "") + t)[:dim] for t in texts])

    return Teacher(name, name, dim, prompt, "m", "t", encode, document_prompt=document_prompt)


TEACHERS = [prompted_teacher("query: ", "passage: "), prompted_teacher("Q>", None, "b", 4)]


def pair_rows(n=5, k=2, bad_row=None) -> PairRows:
    negatives = [tuple(f"neg {j} of {i}" for j in range(k)) for i in range(n)]
    if bad_row is not None:
        negatives[bad_row] = ("NaN! here", *negatives[bad_row][1:])
    return PairRows(
        [f"query {i}" for i in range(n)], [f"pos {i}" for i in range(n)], negatives, "t"
    )


def records(out) -> tuple[dict, dict]:
    source, meta = open_teacher_dataset(out)
    return {int(r["index"]): r for r in source.__getitems__(list(range(len(source))))}, meta


def test_records_hold_the_columns_and_each_roles_vectors(tmp_path):
    pairs = pair_rows()  # 5 rows x 4 columns; blocks of 4 texts: block 4-8 holds both roles
    result = build_pair_dataset(pairs, TEACHERS, tmp_path / "ds", **SMALL)
    assert result.rows == 5 and result.dataset_dir == tmp_path / "ds" / "dataset"
    rows, meta = records(tmp_path / "ds")
    assert pair_width(meta) == 4 and meta["rows"] == 5 and sorted(rows) == list(range(5))
    assert meta["pairs"] == {"negatives": 2, "roles": ["query", "document", "document", "document"]}
    described = [(t["prompt"], t["document_prompt"]) for t in meta["identity"]["teachers"]]
    assert described == [("query: ", "passage: "), ("Q>", None)]
    columns = pairs.columns()
    for i, record in rows.items():
        texts = [column[i] for column in columns]
        assert [t.decode() for t in record["texts"]] == texts
        assert record["teacher"].shape == (4, DIM + 4)
        for column, text in enumerate(texts):
            want = [
                unit(fake_vector(("query: " if column == 0 else "passage: ") + text)),
                unit(fake_vector(("Q>" if column == 0 else "") + text)[:4]),
            ]
            np.testing.assert_allclose(record["teacher"][column], np.concatenate(want), atol=1e-6)
    assert pair_width({"dim": 3}) is None


def test_a_row_with_a_nan_vector_is_skipped(tmp_path):
    build_pair_dataset(pair_rows(bad_row=3), TEACHERS, tmp_path / "ds", **SMALL)
    rows, meta = records(tmp_path / "ds")
    assert sorted(rows) == [0, 1, 2, 4] and meta["rows"] == 4
    assert meta["rejected"] == {"count": 1, "first_rows": [3]}


def test_a_resumed_build_with_other_prompts_or_pairs_is_refused(tmp_path):
    out, kwargs = tmp_path / "ds", dict(num_shards=2, **SMALL)
    first = build_pair_dataset(pair_rows(), TEACHERS, out, shard_index=0, **kwargs)
    assert first.dataset_dir is None and first.pending_slices == [1]
    others = [
        ([prompted_teacher("query: ", "doc: "), TEACHERS[1]], pair_rows(), "document prompts"),
        ([prompted_teacher("q: ", "passage: "), TEACHERS[1]], pair_rows(), "teacher prompts"),
        (TEACHERS, pair_rows(k=1), r"pairs \{.negatives.: 2"),
        (TEACHERS, pair_rows(n=6), "corpus_fingerprint"),
    ]
    for teachers, pairs, message in others:
        with pytest.raises(UserError, match=message):
            build_pair_dataset(pairs, teachers, out, shard_index=1, **kwargs)
    done = build_pair_dataset(pair_rows(), TEACHERS, out, shard_index=1, **kwargs)
    assert done.dataset_dir == out / "dataset"
    with pytest.raises(UserError, match="document prompts differ"):  # the finished one, too
        build_pair_dataset(pair_rows(), [TEACHERS[0], prompted_teacher("Q>", "D>", "b", 4)], out)


def test_eval_loaders_refuse_a_pair_dataset(tmp_path):
    build_pair_dataset(pair_rows(), TEACHERS, tmp_path / "ds", **SMALL)
    for load in (load_eval_arrays, load_eval_chunks):
        with pytest.raises(UserError, match="is a pair dataset.*fix: build the held-out") as err:
            load(tmp_path / "ds")
        assert "\n" not in str(err.value)


def test_cli_refuses_pairs_with_single_text_flags(tmp_path, capsys):
    out = tmp_path / "out"
    cases = [
        (["--pairs", "embedded", "--corpus", "embedded"], "--pairs cannot be used with --corpus"),
        (["--pairs", "embedded", "--chunks", "sentences:8"], "with --chunks"),
        (["--corpus", "embedded", "--negatives", "2"], "--negatives only apply to --pairs"),
        ([], "no texts given"),
    ]
    for flags, words in cases:
        argv = ["teachers", *flags, "--teacher", "all-MiniLM-L6-v2", "--output", str(out)]
        assert main(argv) == 2, flags
        assert words in _one_error_line(capsys.readouterr().err)
        assert not out.exists()


def test_cli_builds_a_pair_dataset(tmp_path, capsys):
    out = tmp_path / "out"
    flags = ["--pairs", "embedded", "--negatives", "1", "--limit", "3", "--output", str(out)]
    flags += ["--teacher", "all-MiniLM-L6-v2", "--teacher-document-prompt", "passage: "]
    assert main(["teachers", *flags, "--backend", "jax"]) == 0
    assert "teacher dataset ready" in capsys.readouterr().out
    rows, meta = records(out)
    assert len(rows) == 3 and meta["pairs"]["negatives"] == 1
    assert meta["identity"]["teachers"][0]["document_prompt"] == "passage: "


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_a_loaded_teacher_encodes_documents_with_its_document_prompt(backend):
    texts = ["a cat sat on the mat", "the stock market fell"]
    spec = "all-MiniLM-L6-v2:prompt=query: :document_prompt=passage: "
    teacher = load_teacher(spec, backend=backend)
    assert (teacher.prompt, teacher.document_prompt) == ("query: ", "passage: ")
    plain = load_teacher("all-MiniLM-L6-v2", backend=backend)
    for role, prompt in (("query", "query: "), ("document", "passage: ")):
        want = plain.encode([prompt + t for t in texts])
        np.testing.assert_allclose(teacher.encode_as(texts, role), want, atol=1e-5)
    assert teacher.encode_as(texts) is not None and plain.describe()["prompt"] is None
    assert "document_prompt" not in plain.describe()  # single-text identities as before


def test_teacher_spec_document_prompt_options():
    got = parse_teacher_spec("m:head=8:prompt=Q: a:b:document_prompt=D: c")
    assert (got.source, got.head, got.prompt, got.document_prompt) == ("m", "8", "Q: a:b", "D: c")
    got = parse_teacher_spec("m:document_prompt_name=passage:document_prompt=x:prompt=y")
    assert (got.document_prompt_name, got.document_prompt, got.prompt) == ("passage", "x", "y")
    with pytest.raises(UserError, match="document_prompt="):
        parse_teacher_spec("m:document_prompt_name=")


@pytest.mark.parametrize(
    "lines, flags, words",
    [
        ([{"query": "q"}], [], "line 1"),  # no positive
        (
            [{"query": "a", "positive": "b", "negatives": ["c"]}, {"query": "d", "positive": "e"}],
            [],
            "--negatives K",
        ),
        ([{"query": "a", "positive": "b", "negatives": ["c"]}], ["--negatives", "2"], "line 1"),
    ],
)
def test_cli_bad_pair_rows_exit_2_with_one_line(tmp_path, capsys, lines, flags, words):
    """A row missing a field, negatives of unequal count (no --negatives), fewer negatives than
    --negatives asks: one line naming the row or the fix, exit 2, nothing written."""
    import json

    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["teachers", "--pairs", str(source), *flags, "--teacher", "all-MiniLM-L6-v2"]
    assert main([*argv, "--output", str(out)]) == 2
    assert words in _one_error_line(capsys.readouterr().err)
    assert not out.exists()
