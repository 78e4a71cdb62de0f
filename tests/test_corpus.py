"""Corpus readers (embedded, txt/jsonl files, local Hugging Face datasets), their errors, the
WordNet parser, weighted mixes of corpora and the sentence-piece augmentation."""

import gzip
import json

import numpy as np
import pytest

from jasper_jax.data import build_corpus
from jasper_jax.data.chunking import sentence_spans
from jasper_jax.data.corpus import load_corpus, load_embedded_records, read_corpus
from jasper_jax.data.corpus_mix import CorpusMix
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


# --- local Hugging Face datasets (hf:PATH[:SPLIT][:FIELD]) -------------------------------------


def _columns():
    body, title = ["first body.", "", "third body.", "  "], ["t1", None, "t3", "t4"]
    return {"id": [1, 2, 3, 4], "body": body, "title": title}


def test_hf_save_to_disk_folder_splits_and_fields(tmp_path):
    import datasets

    train = datasets.Dataset.from_dict({"text": ["alpha", "", None, "beta"], "note": list("wxyz")})
    held = datasets.Dataset.from_dict({"text": ["gamma"], "note": ["v"]})
    datasets.DatasetDict({"train": train, "validation": held}).save_to_disk(tmp_path / "dd")
    corpus = read_corpus(f"hf:{tmp_path / 'dd'}")
    assert (corpus.texts, corpus.skipped_empty) == (["alpha", "beta"], 2)  # "" and null
    assert load_corpus(f"hf:{tmp_path / 'dd'}:validation") == ["gamma"]
    assert load_corpus(f"hf:{tmp_path / 'dd'}", split="validation") == ["gamma"]
    assert load_corpus(f"hf:{tmp_path / 'dd'}:train:note") == list("wxyz")
    with pytest.raises(UserError, match=r"no split 'test'; have \['train', 'validation'\]"):
        load_corpus(f"hf:{tmp_path / 'dd'}:test")
    train.save_to_disk(tmp_path / "one")  # a Dataset alone: no splits
    assert load_corpus(f"hf:{tmp_path / 'one'}::note") == list("wxyz")
    with pytest.raises(UserError, match="without splits"):
        load_corpus(f"hf:{tmp_path / 'one'}:train")


def test_hf_parquet_file_field_detection(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    pq.write_table(pa.table(_columns()), path)  # written by pyarrow, not by `datasets`
    corpus = read_corpus(f"hf:{path}")  # no 'text' column: the first string column, body
    assert (corpus.texts, corpus.skipped_empty) == (["first body.", "third body."], 2)
    assert load_corpus(f"hf:{path}:train:title") == ["t1", "t3", "t4"]
    with pytest.raises(UserError, match=r"no string column 'id'.*\['id', 'body', 'title'\]"):
        load_corpus(f"hf:{path}::id")
    pq.write_table(pa.table({"id": [1], "score": [0.5]}), tmp_path / "numbers.parquet")
    with pytest.raises(UserError, match=r"has no string column; its columns are \['id', 'score'"):
        load_corpus(f"hf:{tmp_path / 'numbers.parquet'}")


def test_hf_jsonl_arrow_and_folders_match_the_other_readers(tmp_path):
    import datasets

    records = [{"text": f"line {i}", "n": i} for i in range(5)] + [{"text": "", "n": 5}]
    jsonl = tmp_path / "c.jsonl.gz"
    with gzip.open(jsonl, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in records)
    ours, theirs = read_corpus(str(jsonl)), read_corpus(f"hf:{jsonl}")  # ours: a 2nd reader
    assert (theirs.texts, theirs.skipped_empty) == (ours.texts, ours.skipped_empty)
    assert ours.texts == [f"line {i}" for i in range(5)] and ours.skipped_empty == 1
    # a Hub-style folder: split names from the file names
    table = datasets.Dataset.from_dict(_columns())
    (tmp_path / "hub" / "data").mkdir(parents=True)
    table.to_parquet(tmp_path / "hub" / "data" / "train-00000-of-00001.parquet")
    table.select([2]).to_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet")
    assert load_corpus(f"hf:{tmp_path / 'hub'}") == ["first body.", "third body."]
    assert load_corpus(f"hf:{tmp_path / 'hub'}:test:title") == ["t3"]
    table.save_to_disk(tmp_path / "saved")  # its .arrow file read on its own
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    assert load_corpus(f"hf:{arrow}::title") == ["t1", "t3", "t4"]


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("empty folder", "holds no data files"),
        ("mixed folder", r"files of several types \['json', 'parquet'\]"),
        ("broken parquet", "cannot"),
    ],
)
def test_hf_bad_corpora_are_user_errors(tmp_path, layout, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "corpus"
    if layout != "missing":
        folder.mkdir()
        (folder / "README.md").write_text("not data\n")
    if layout == "mixed folder":
        pq.write_table(pa.table({"text": ["a"]}), folder / "a.parquet")
        (folder / "b.jsonl").write_text('{"text": "b"}\n')
    spec = f"hf:{folder}"
    if layout == "broken parquet":
        (folder / "x.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
        spec = f"hf:{folder / 'x.parquet'}"
    with pytest.raises(UserError, match=message):
        load_corpus(spec)


# --- mixes (--corpus SPEC@WEIGHT) and the sentence-piece augmentation ---------------------------


def _sources(tmp_path, sizes=(("a", 100), ("b", 50), ("c", 30))) -> list[str]:
    paths = []
    for name, size in sizes:
        path = tmp_path / f"{name}.txt"
        path.write_text("".join(f"{name}{i}\n" for i in range(size)) + "\n")  # + 1 empty
        paths.append(str(path))
    return paths


def _by_source(texts):
    return {name: [t for t in texts if t[0] == name] for name in "abc"}


def test_weighted_mix_has_exact_shares_and_never_repeats(tmp_path, caplog):
    a, b, c = _sources(tmp_path)
    mix = CorpusMix.parse([f"{a}@0.5", f"{b}@0.3", f"{c}@0.2"])
    texts, skipped = mix.texts()
    # c (30 texts at share 0.2) bounds the mix at 150 texts: 75 + 45 + 30
    assert (len(texts), skipped) == (150, 3) and len(set(texts)) == 150
    parts = _by_source(texts)
    assert [len(parts[n]) for n in "abc"] == [75, 45, 30]
    assert "runs out" in caplog.text and "c.txt" in caplog.text
    for name, size in (("a", 100), ("b", 50), ("c", 30)):  # drawn texts keep their file order
        numbers = [int(t[1:]) for t in parts[name]]
        assert numbers == sorted(numbers) and set(numbers) <= set(range(size))
    first_half = _by_source(texts[:75])  # interleaved, not one source after another
    assert all(0 < len(first_half[n]) < len(parts[n]) for n in "abc")
    assert [len(v) for v in _by_source(mix.texts(40)[0]).values()] == [20, 12, 8]
    equal = CorpusMix.parse([f"{a}@1", f"{b}@1", f"{c}@1"])
    assert [len(v) for v in _by_source(equal.texts(10)[0]).values()] == [4, 3, 3]


def test_mix_is_deterministic_and_seeded(tmp_path):
    a, b, c = _sources(tmp_path)
    values = [f"{a}@2", f"{b}@1.5", f"{c}@1"]
    first = CorpusMix.parse(values, 0.5, seed=3).texts(60)
    assert CorpusMix.parse(values, 0.5, seed=3).texts(60) == first
    other = CorpusMix.parse(values, 0.5, seed=4).texts(60)
    assert other != first  # 60 * (2, 1.5, 1) / 4.5 = (26.7, 20, 13.3) texts for either seed
    assert [len(v) for v in _by_source(other[0]).values()] == [27, 20, 13]


def test_unweighted_corpora_concatenate_and_one_corpus_keeps_its_order(tmp_path):
    a, b, _ = _sources(tmp_path)
    assert CorpusMix.parse([a, b]).texts() == (
        [f"a{i}" for i in range(100)] + [f"b{i}" for i in range(50)],
        2,
    )
    assert CorpusMix.parse([a, b]).texts(102)[0][-3:] == ["a99", "b0", "b1"]
    assert CorpusMix.parse([f"{a}@3"]).texts(5)[0] == load_corpus(a)[:5]
    with pytest.raises(UserError, match="has no weight while"):
        CorpusMix.parse([a, f"{b}@1"])
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(UserError, match="blank.txt' of the mix holds no non-empty texts"):
        CorpusMix.parse([f"{a}@1", f"{tmp_path / 'blank.txt'}@1"]).texts()
    odd = tmp_path / "odd@v2.txt"  # an existing file whose name holds an '@'
    odd.write_text("x\n")
    assert CorpusMix.parse([str(odd)]).texts() == (["x"], 0)
    assert CorpusMix.parse(["embedded:validation@1", "embedded@3"]).specs == (
        "embedded:validation",
        "embedded",
    )


def _documents(count=200):
    """Documents of 11-30 numbered sentences, so a split one always changes."""
    rng = np.random.default_rng(0)
    return [
        " ".join(f"Doc {d} sentence {s}{'!' if s % 3 else '.'}" for s in range(n))
        for d, n in enumerate(rng.integers(11, 31, size=count))
    ]


def test_split_sentences_replaces_a_share_of_documents_by_pieces(tmp_path):
    documents = _documents()
    texts = CorpusMix(("unused",), split_share=0.3, seed=7).augment(documents)
    assert texts == CorpusMix(("unused",), split_share=0.3, seed=7).augment(documents)
    assert texts != CorpusMix(("unused",), split_share=0.3, seed=8).augment(documents)
    kept = [t for t in texts if t in documents]
    pieces = [t for t in texts if t not in documents]
    assert len(documents) - len(kept) == 60  # exactly 30 % of 200 documents split
    sizes = [len(sentence_spans(p)) for p in pieces]
    assert min(sizes) >= 1 and max(sizes) <= 10 and set(range(1, 11)) <= set(sizes)
    # in place and complete: each split document's pieces follow one another and hold its
    # sentences in order, so joining them with a space gives the document back
    rebuilt, current = [], []
    for text in texts:
        if text in documents:
            rebuilt.append(text)
            continue
        current.append(text)
        doc = int(text.split()[1])
        if " ".join(current) == documents[doc]:
            rebuilt.append(" ".join(current))
            current = []
    assert rebuilt == documents and not current
    assert CorpusMix(("unused",), split_share=0.0).augment(documents) == documents
    everything = CorpusMix(("unused",), split_share=1.0).augment(documents)
    assert not set(everything) & set(documents)


def test_split_sentences_after_limit_in_a_mix(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("\n".join(_documents(50)) + "\n")
    mix = CorpusMix.parse([str(path)], split_share=0.5, seed=1)
    chosen, _ = mix.read(20)
    texts, _ = mix.texts(20)
    assert chosen == _documents(50)[:20]
    assert sum(t in chosen for t in texts) == 10 and len(texts) > 20


# --- the `jasper-jax teachers` flags -------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        *(
            (["--corpus", f"{{a}}@{w}", "--corpus", "{b}@1"], f"weight {w!r} is not a positive")
            for w in ("abc", "0", "-2", "nan", "")
        ),
        (["--corpus", "{a}", "--corpus", "{b}@1"], "has no weight while"),
        (["--corpus", "{a}", "--split-sentences", "1.5"], "--split-sentences 1.5 is not a share"),
    ],
)
def test_bad_corpus_flags_exit_2_and_write_nothing(tmp_path, capsys, flags, named):
    from jasper_jax.cli import main

    a, b, _ = _sources(tmp_path)
    out = tmp_path / "out"
    flags = [f.format(a=a, b=b) for f in flags]
    assert main(["teachers", *flags, "--teacher", "all-MiniLM-L6-v2", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert "Traceback" not in err and len(lines) == 1 and named in lines[0], err
    assert not out.exists()


def test_teachers_cli_builds_and_resumes_a_mixed_augmented_corpus(tmp_path, monkeypatch, capsys):
    from jasper_jax.cli import main
    from jasper_jax.commands import teachers as command
    from jasper_jax.data.teacher_dataset import build_teacher_dataset, open_teacher_dataset
    from tests.test_teacher_dataset import fake_teacher

    def with_fake_teacher(corpus, teachers, output, **kwargs):
        assert teachers == ["fake"]
        return build_teacher_dataset(corpus, [fake_teacher()], output, **kwargs)

    monkeypatch.setattr(command, "build_teacher_dataset", with_fake_teacher)
    docs = tmp_path / "docs.txt"
    docs.write_text("\n".join(_documents(40)) + "\n")
    a, _, _ = _sources(tmp_path)
    out = tmp_path / "out"
    flags = ["teachers", "--corpus", f"{docs}@1", "--corpus", f"{a}@3", "--limit", "20"]
    flags += ["--split-sentences", "0.5", "--teacher", "fake", "--output", str(out)]
    assert main(flags) == 0
    source, meta = open_teacher_dataset(out)
    rows = source.__getitems__(list(range(len(source))))
    stored = [r["text"].decode() for r in sorted(rows, key=lambda r: int(r["index"]))]
    expected, skipped = CorpusMix.parse([f"{docs}@1", f"{a}@3"], 0.5).texts(20)
    assert stored == expected and skipped == 1
    chosen, _ = CorpusMix.parse([f"{docs}@1", f"{a}@3"]).read(20)
    assert sum(t.startswith("Doc ") for t in chosen) == 5  # 1:3 of 20 documents
    assert len(stored) > 20 and meta["rows"] == len(stored)
    capsys.readouterr()
    assert main(flags) == 0  # same arguments: the same texts, so the dataset is already there
    assert "teacher dataset ready" in capsys.readouterr().out
    assert main([*flags, "--corpus-seed", "1"]) == 2  # other texts: refused, not mixed
    assert "corpus_fingerprint" in capsys.readouterr().err


def test_teachers_cli_documents_then_pieces(tmp_path, monkeypatch):
    from jasper_jax.cli import main
    from jasper_jax.commands import teachers as command
    from jasper_jax.data.teacher_assets import MINILM, teacher_folder
    from jasper_jax.data.teacher_dataset import build_teacher_dataset, open_teacher_dataset
    from tests.test_teacher_dataset import fake_teacher

    built = {}

    def with_fake_teacher(corpus, teachers, output, **kwargs):
        built[output] = list(corpus)
        return build_teacher_dataset(corpus, [fake_teacher()], output, **kwargs)

    monkeypatch.setattr(command, "build_teacher_dataset", with_fake_teacher)
    path = tmp_path / "c.txt"
    path.write_text("".join(f"Short text number {i} is here\n" for i in range(200)))
    flags = ["teachers", "--corpus", str(path), "--teacher", "fake", "--documents", "40:60"]
    flags += ["--chunk-tokenizer", str(teacher_folder(MINILM)), "--limit", "3"]
    for name, extra in (("whole", []), ("split", ["--split-sentences", "1"])):
        assert main([*flags, *extra, "--output", str(tmp_path / name)]) == 0
    whole, split = built[str(tmp_path / "whole")], built[str(tmp_path / "split")]
    assert len(whole) == 3 and whole[0].startswith("Short text number 0 is here. Short text")
    assert " ".join(split) == " ".join(whole) and len(split) > 3  # every document in pieces
    assert all(1 <= len(sentence_spans(piece)) <= 10 for piece in split)
    source, _ = open_teacher_dataset(tmp_path / "split")
    assert len(source) == len(split)
