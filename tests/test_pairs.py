"""Pair rows for contrastive training: the embedded WordNet pairs, jsonl files, local Hugging Face
datasets, and the one-line errors for bad rows."""

from __future__ import annotations

import gzip
import json

import pytest

from jasper_jax.data.corpus import load_embedded_records
from jasper_jax.data.pairs import DOCUMENT, QUERY, read_pairs
from jasper_jax.errors import UserError


@pytest.fixture(scope="module")
def embedded():
    """split -> (records, PairRows with 1 negative, PairRows with 3 negatives of 200 rows)."""
    return {
        split: (
            load_embedded_records(split),
            read_pairs(f"embedded:{split}"),
            read_pairs("embedded", split=split, negatives=3, limit=200),
        )
        for split in ("train", "validation")
    }


def _glosses(records):
    """synset -> gloss, and the synsets with a gloss in corpus order."""
    order = [r["synset"] for r in records if r["kind"] == "gloss"]
    return {r["synset"]: r["text"] for r in records if r["kind"] == "gloss"}, order


def test_embedded_rows_are_examples_with_their_synsets_gloss(embedded):
    for records, pairs, _ in embedded.values():
        gloss, _ = _glosses(records)
        examples = [r for r in records if r["kind"] == "example" and r["synset"] in gloss]
        assert pairs.source.startswith("embedded:") and pairs.negative_count == 1
        # Row i is the i-th glossed example in corpus order, paired with its own synset's gloss.
        assert pairs.queries == [r["text"] for r in examples]
        assert pairs.positives == [gloss[r["synset"]] for r in examples]
        assert len(pairs) > 1000
        glosses = set(gloss.values())
        for positive, negatives in zip(pairs.positives, pairs.negatives, strict=True):
            assert negatives[0] in glosses and negatives[0] != positive


def test_embedded_negatives_are_the_nearest_other_synsets_alternately(embedded):
    records, pairs, three = embedded["train"]
    gloss, order = _glosses(records)
    synset_of = {r["text"]: r["synset"] for r in records if r["kind"] == "example"}
    assert three.queries == pairs.queries[:200] and three.negative_count == 3
    for query, negatives in zip(three.queries, three.negatives, strict=True):
        i = order.index(synset_of[query])
        # next, previous, next+1 (the first synset has no previous: next, next+1, next+2)
        steps = (1, -1, 2) if i > 0 else (1, 2, 3)
        assert negatives == tuple(gloss[order[i + s]] for s in steps)
    assert read_pairs("embedded", negatives=3, limit=200) == three  # deterministic


def test_embedded_train_and_validation_share_no_synset(embedded):
    synsets = {}
    for split, (records, pairs, _) in embedded.items():
        gloss, _ = _glosses(records)
        of_gloss = {text: s for s, text in gloss.items()}
        synsets[split] = {of_gloss[p] for p in pairs.positives}
        assert set(pairs.positives) <= set(gloss.values())
    assert synsets["train"] and synsets["validation"]
    assert not synsets["train"] & synsets["validation"]
    assert read_pairs("embedded", limit=5).source == "embedded:train"  # train unless asked


def _jsonl(path, rows):
    lines = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return str(path)


def test_jsonl_aliases_negative_forms_limit_and_k(tmp_path):
    rows = [
        {"query": "q1", "positive": "p1", "negatives": ["n1a", "n1b"]},
        {"anchor": "q2", "document": "p2", "negatives": ["n2a", "n2b", "n2c"]},
        "",  # a blank line is no row
        {"query": "q3", "positive": "p3", "negative_2": "n3b", "negative_1": "n3a"},
    ]
    for name in ("p.jsonl", "p.jsonl.gz"):
        pairs = read_pairs(_jsonl(tmp_path / name, rows), negatives=2)
        assert pairs.queries == ["q1", "q2", "q3"] and pairs.positives == ["p1", "p2", "p3"]
        assert pairs.negatives == [("n1a", "n1b"), ("n2a", "n2b"), ("n3a", "n3b")]
        assert pairs.columns()[2] == ["n1a", "n2a", "n3a"] and pairs.width == 4
        assert pairs.roles(pairs.width) == (QUERY, DOCUMENT, DOCUMENT, DOCUMENT)
    assert read_pairs(str(tmp_path / "p.jsonl"), limit=1).negatives == [("n1a", "n1b")]
    assert read_pairs(str(tmp_path / "p.jsonl"), negatives=0).width == 2
    single = _jsonl(tmp_path / "s.jsonl", [{"query": "q", "positive": "p", "negative": "n"}] * 2)
    assert read_pairs(single).negatives == [("n",), ("n",)]
    bare = _jsonl(tmp_path / "b.jsonl", [{"query": "q", "positive": "p"}])
    assert read_pairs(bare).negative_count == 0 and read_pairs(bare).columns() == [["q"], ["p"]]


def test_hf_save_to_disk_and_parquet_columns(tmp_path):
    import datasets

    train = {"anchor": ["a1", "a2"], "positive": ["p1", "p2"], "negative": ["n1", "n2"]}
    held = {"anchor": ["a3"], "positive": ["p3"], "negative": ["n3"]}
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(train), "dev": datasets.Dataset.from_dict(held)}
    )
    dd.save_to_disk(tmp_path / "dd")
    pairs = read_pairs(f"hf:{tmp_path / 'dd'}")
    assert (pairs.queries, pairs.negatives) == (["a1", "a2"], [("n1",), ("n2",)])
    assert read_pairs(f"hf:{tmp_path / 'dd'}:dev").queries == ["a3"]
    assert read_pairs(f"hf:{tmp_path / 'dd'}", split="dev").source.endswith(":dev")
    listed = {
        "query": ["q1", "q2", "q3"],
        "positive": ["p1", "p2", "p3"],
        "negatives": [["x", "y"], ["z", "w"], ["u", "v"]],
        "score": [1, 2, 3],  # other columns are not read
    }
    datasets.Dataset.from_dict(listed).to_parquet(tmp_path / "l.parquet")
    pairs = read_pairs(f"hf:{tmp_path / 'l.parquet'}", negatives=1, limit=2)
    assert (pairs.positives, pairs.negatives) == (["p1", "p2"], [("x",), ("z",)])
    numbered = {"anchor": ["q"], "positive": ["p"], "negative_2": ["b"], "negative_1": ["a"]}
    datasets.Dataset.from_dict(numbered).to_parquet(tmp_path / "n.parquet")
    assert read_pairs(f"hf:{tmp_path / 'n.parquet'}").negatives == [("a", "b")]


_OK = {"query": "q", "positive": "p", "negatives": ["n1", "n2"]}


@pytest.mark.parametrize(
    ("bad", "negatives", "message"),
    [
        ({"positive": "p"}, None, r"line 2 has no 'query' \(or 'anchor'\)"),
        ({"query": "q", "positive": "  "}, None, "line 2: 'positive' is empty"),
        ({"query": 5, "positive": "p"}, None, "line 2: 'query' is a int, not a string"),
        ({**_OK, "negatives": "n1"}, None, "line 2: 'negatives' is a str, not a list"),
        ({**_OK, "negatives": ["n1", 3]}, None, "line 2: negative 2 is a int"),
        ({**_OK, "negatives": ["n1", " "]}, None, "line 2: negative 2 is empty"),
        (
            {**_OK, "negatives": ["n1"]},
            None,
            "line 2 has 1 negatives but line 1 has 2.*--negatives K",
        ),
        ({**_OK, "negatives": ["n1"]}, 2, "line 2 has 1 negatives, fewer than negatives=2"),
        ({**_OK, "negative": "n3"}, None, "line 2 gives negatives in several fields"),
        ('{"query": "q",', None, "line 2 is not valid JSON"),
        ('["q", "p"]', None, "line 2 is a list, not an object"),
    ],
)
def test_bad_jsonl_rows_name_the_line(tmp_path, bad, negatives, message):
    path = _jsonl(tmp_path / "bad.jsonl", [_OK, bad, _OK])
    with pytest.raises(UserError, match=message) as err:
        read_pairs(path, negatives=negatives)
    assert "\n" not in str(err.value) and "fix:" in str(err.value)


def test_bad_hf_rows_name_the_row_index(tmp_path):
    import datasets

    columns = {"query": ["q1", None, "q3"], "positive": ["p1", "p2", "p3"]}
    datasets.Dataset.from_dict(columns).save_to_disk(tmp_path / "nulls")
    with pytest.raises(UserError, match=r"row index 1 has no 'query'"):
        read_pairs(f"hf:{tmp_path / 'nulls'}")
    for second, message in (
        (["b", ""], "row index 1: negative 2 is empty"),
        (["b", "c"], "row index 1 has 2 negatives but row index 0 has 1"),
    ):
        columns = {"anchor": ["q1", "q2"], "positive": ["p1", "p2"], "negatives": [["a"], second]}
        datasets.Dataset.from_dict(columns).to_parquet(tmp_path / "n.parquet")
        with pytest.raises(UserError, match=message):
            read_pairs(f"hf:{tmp_path / 'n.parquet'}")
    columns = {"text": ["no pairs here"]}
    datasets.Dataset.from_dict(columns).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(UserError, match=r"row index 0 has no 'query'.*\['text'\]"):
        read_pairs(f"hf:{tmp_path / 't.parquet'}")


def test_bad_sources_and_arguments(tmp_path):
    good = _jsonl(tmp_path / "good.jsonl", [_OK])
    cases = [
        ((str(tmp_path / "missing.jsonl"),), {}, "does not exist"),
        ((str(tmp_path / "pairs.csv"),), {}, "unknown form"),
        ((f"hf:{tmp_path / 'missing'}",), {}, "does not exist"),
        ((f"hf:{tmp_path}:train:query",), {}, "drop the FIELD"),
        ((_jsonl(tmp_path / "empty.jsonl", [""]),), {}, "zero rows"),
        ((good,), {"limit": 0}, r"zero rows \(limit=0\)"),
        ((good,), {"negatives": -1}, "negatives=-1 is negative"),
        ((good,), {"split": "train"}, "a file is one split"),
        (("embedded:test",), {}, "unknown split 'test'"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            read_pairs(*args, **kwargs)
