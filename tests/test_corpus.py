"""Corpus readers: embedded corpus, txt/jsonl files, their errors, and the WordNet parser."""

import gzip
import json

import pytest

from jasper_jax.data import build_corpus
from jasper_jax.data.corpus import load_corpus, load_embedded_records, read_corpus
from jasper_jax.errors import UserError


def test_embedded_corpus_splits_by_synset_and_holds_real_english():
    train = load_embedded_records("train")
    validation = load_embedded_records("validation")
    assert len(train) > 100_000 and 3_000 < len(validation) < 0.1 * len(train)
    train_synsets = {r["synset"] for r in train if r["synset"]}
    validation_synsets = {r["synset"] for r in validation if r["synset"]}
    assert not train_synsets & validation_synsets
    texts = [r["text"] for r in train + validation]
    assert len(set(texts)) == len(texts)  # deduplicated across splits
    kinds = {r["kind"] for r in validation}
    assert kinds == {"gloss", "example", "fortune"}
    # WordNet 3.0 gloss of 'dog, domestic dog' (02084071-n), checked by hand.
    dog = [r for r in train + validation if r["synset"] == "02084071-n"]
    assert any(r["kind"] == "example" and r["text"] == "the dog barked all night" for r in dog)
    assert load_corpus("embedded:validation") == [r["text"] for r in validation]


def test_wordnet_line_parser_separates_definition_and_examples():
    line = (
        "02402425 05 n 03 cattle 0 cows 0 kine 0 000 | domesticated bovine animals; as a group; "
        '"so many head of cattle"; "seven thin and ill-favored kine"- Bible; "a; b"  \n'
    )
    records = build_corpus.parse_wordnet_line(line, "n")
    assert records == [
        {
            "text": "domesticated bovine animals; as a group",
            "kind": "gloss",
            "synset": "02402425-n",
        },
        {"text": "so many head of cattle", "kind": "example", "synset": "02402425-n"},
        {"text": "seven thin and ill-favored kine", "kind": "example", "synset": "02402425-n"},
        {"text": "a; b", "kind": "example", "synset": "02402425-n"},
    ]
    assert build_corpus.parse_wordnet_line("  1 This software and database is", "n") == []


def test_fortune_cleaning():
    assert build_corpus.clean_fortune("A dream will\n\talways triumph.\n\t\t-- S. Lem\n") == (
        "A dream will always triumph."
    )
    assert build_corpus.clean_fortune("first paragraph\n\nsecond paragraph") is None
    assert build_corpus.clean_fortune("x" * 301) is None
    assert build_corpus.clean_fortune("  /\\_/\\  ( o.o ) > ^ < | | |") is None


def test_txt_and_jsonl_skip_empty_texts(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_bytes("one\r\n\n  \ntwo é\n".encode())
    assert read_corpus(str(txt)).texts == ["one", "two é"]
    assert read_corpus(str(txt)).skipped_empty == 2
    jsonl = tmp_path / "b.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "alpha", "id": 1}) + "\n\n")
        handle.write(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "beta"}) + "\n")
    corpus = read_corpus(str(jsonl))
    assert (corpus.texts, corpus.skipped_empty) == (["alpha", "beta"], 2)


def test_non_utf8_names_line_and_byte_offset(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nna\xefve\n")
    with pytest.raises(UserError, match=r"bad.txt.*line 2 \(byte offset 7\)"):
        load_corpus(str(path))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "does not exist"),
        ("data.csv", "a,b\n", "unknown type"),
        ("bad.jsonl", '{"text": "ok"}\n{oops\n', "line 2 is not valid JSON"),
        ("nofield.jsonl", '{"body": "x"}\n', "no string field 'text'"),
    ],
)
def test_bad_files_are_user_errors(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_corpus(str(path))


def test_bad_splits_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown split"):
        load_corpus("embedded", split="test")
    path = tmp_path / "a.txt"
    path.write_text("x\n")
    with pytest.raises(UserError, match="a file is one split"):
        load_corpus(str(path), split="train")
