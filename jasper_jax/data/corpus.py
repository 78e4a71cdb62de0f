"""Read a corpus of texts to distil on: the embedded English corpus, a file, a local Hugging Face
dataset, or a TFDS dataset.

``path_or_name`` forms accepted by :func:`load_corpus`:

- ``"embedded"`` (or ``"embedded:train"``, ``"embedded:validation"``): the bundled corpus of
  WordNet 3.0 definitions and example sentences plus short fortunes (~177k texts, see
  ``jasper_jax/assets/corpus/LICENSE.md``; regenerate with ``python -m
  jasper_jax.commands.build_corpus``). ``split`` defaults to ``"train"`` so that validation texts
  never leak into training by accident.
- ``*.txt`` / ``*.txt.gz``: one text per line.
- ``*.jsonl`` / ``*.jsonl.gz``: one JSON object per line with a string field ``"text"``.
- ``tfds:NAME[:SPLIT][:FEATURE]``: best effort over any TFDS dataset already prepared on this
  machine (no download happens here). NAME is a registered dataset name (read from
  ``$TFDS_DATA_DIR``) or the path of a prepared dataset folder; SPLIT defaults to ``train``;
  FEATURE defaults to the first ``Text`` feature of the dataset.
- ``hf:PATH[:SPLIT][:FIELD]``: a local Hugging Face ``datasets`` corpus (a ``save_to_disk``
  folder, or parquet / arrow / jsonl files), read offline; see :mod:`jasper_jax.data.corpus_hf`.

Several corpora mixed with weights, and the paper's sentence-piece augmentation:
:mod:`jasper_jax.data.corpus_mix`.

Texts that are empty or only whitespace are skipped and counted (:class:`CorpusTexts`).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import logging
import pathlib
from collections.abc import Iterator

import tensorflow_datasets as tfds

from jasper_jax.data.corpus_hf import hf_texts
from jasper_jax.errors import UserError

EMBEDDED = "embedded"
EMBEDDED_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets" / "corpus"
EMBEDDED_SPLITS = ("train", "validation")
_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CorpusTexts:
    """Texts read from one source, with the number of empty texts that were skipped."""

    texts: list[str]
    skipped_empty: int
    source: str


def load_corpus(path_or_name: str, split: str | None = None) -> list[str]:
    """Texts of a corpus, in file order; empty texts are skipped and their count logged.

    Raises:
      UserError: missing file, unknown suffix, text that is not UTF-8 (names file, line and byte
        offset), malformed JSON lines, unknown split or TFDS dataset.
    """
    corpus = read_corpus(path_or_name, split)
    if corpus.skipped_empty:
        log.warning("%s: skipped %d empty texts", corpus.source, corpus.skipped_empty)
    return corpus.texts


def read_corpus(path_or_name: str, split: str | None = None) -> CorpusTexts:
    """Like :func:`load_corpus` but returns the skipped-empty count with the texts."""
    if path_or_name == EMBEDDED or path_or_name.startswith(EMBEDDED + ":"):
        if ":" in path_or_name:
            split = split or path_or_name.split(":", 1)[1]
        records = load_embedded_records(split or "train")
        return CorpusTexts([r["text"] for r in records], 0, f"embedded:{split or 'train'}")
    if path_or_name.startswith("tfds:"):
        return _keep_nonempty(_tfds_texts(path_or_name, split), path_or_name)
    if path_or_name.startswith("hf:"):
        return _keep_nonempty(hf_texts(path_or_name, split), path_or_name)
    path = pathlib.Path(path_or_name).expanduser()
    if not path.name.endswith(_SUFFIXES):
        raise UserError(
            f"corpus {path_or_name!r} has an unknown type; expected 'embedded', a file ending in "
            f"{', '.join(_SUFFIXES)}, 'hf:PATH[:SPLIT][:FIELD]' or 'tfds:NAME[:SPLIT][:FEATURE]'; "
            "fix: rename or convert it"
        )
    check_file_source(path, split, f"the file corpus {path_or_name!r}", "corpus file")
    texts = _jsonl_texts(path) if ".jsonl" in path.name else _lines(path)
    return _keep_nonempty(texts, str(path))


def check_file_source(path: pathlib.Path, split: str | None, given: str, kind: str) -> None:
    """Raises UserError for a split given to a file (one file is one split) or a missing file;
    `given` and `kind` name the source in the message."""
    if split is not None:
        raise UserError(
            f"split={split!r} given for {given}; a file is one split; fix: drop the split, or "
            "pass one file per split"
        )
    if not path.is_file():
        raise UserError(f"{kind} {str(path)!r} does not exist; fix: check the path")


def load_embedded_records(split: str) -> list[dict]:
    """Records of the embedded corpus: dicts with ``text``, ``kind``, ``synset``.

    ``kind`` is ``"gloss"`` (WordNet definition), ``"example"`` (WordNet usage example) or
    ``"fortune"``; ``synset`` is a WordNet id such as ``"02402425-n"`` (None for fortunes). All
    texts of one synset are in the same split.
    """
    if split not in EMBEDDED_SPLITS:
        raise UserError(
            f"unknown split {split!r} of the embedded corpus; expected one of {EMBEDDED_SPLITS}"
        )
    path = EMBEDDED_DIR / f"{split}.jsonl.gz"
    if not path.is_file():
        raise UserError(
            f"embedded corpus file {str(path)!r} is missing (incomplete install?); fix: reinstall "
            "jasper-jax, or regenerate it with python -m jasper_jax.commands.build_corpus"
        )
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def corpus_fingerprint(texts: list[str]) -> str:
    """SHA-256 over the texts in order (hex); identifies a corpus independent of its file."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        # Length prefixes make the hash unambiguous however texts are split.
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def _keep_nonempty(texts: Iterator[str], source: str) -> CorpusTexts:
    kept, skipped = [], 0
    for text in texts:
        if text.strip():
            kept.append(text)
        else:
            skipped += 1
    return CorpusTexts(kept, skipped, source)


def _decoded_lines(path: pathlib.Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, line without its end) with a precise error on bad UTF-8."""
    opener = gzip.open if path.name.endswith(".gz") else open
    offset = 0
    with opener(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                where = "uncompressed byte" if path.name.endswith(".gz") else "byte"
                raise UserError(
                    f"{str(path)!r} line {number} ({where} offset {offset + err.start}) is not "
                    f"valid UTF-8 ({err.reason}); fix: re-encode the file as UTF-8, e.g. "
                    "iconv -f latin1 -t utf-8"
                ) from None
            offset += len(raw)
            yield number, line.rstrip("\r\n")


def _lines(path: pathlib.Path) -> Iterator[str]:
    for _, line in _decoded_lines(path):
        yield line


def jsonl_values(path: pathlib.Path, example: str) -> Iterator[tuple[int, str, object]]:
    """(1-based line number, line, decoded JSON value) of a .jsonl(.gz) file; a blank line gives
    the value None. A line that is not JSON raises UserError showing `example` as the fix."""
    for number, line in _decoded_lines(path):
        if not line.strip():
            yield number, line, None
            continue
        try:
            yield number, line, json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(
                f"{str(path)!r} line {number} is not valid JSON ({err.msg}); fix: write one "
                f"object like {example} per line"
            ) from None


def _jsonl_texts(path: pathlib.Path) -> Iterator[str]:
    for number, line, record in jsonl_values(path, '{"text": "..."}'):
        if record is None:
            yield ""  # a blank line is an empty text: skipped and counted
            continue
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError(
                f"{str(path)!r} line {number} has no string field 'text' (got {line[:80]!r}); "
                'expected {"text": "..."} per line'
            )
        yield text


def _tfds_texts(spec: str, split: str | None) -> Iterator[str]:
    name, spec_split, feature = (spec.split(":", 3)[1:] + [None, None])[:3]
    split = split or spec_split or "train"
    try:
        is_dir = pathlib.Path(name).expanduser().is_dir()
        builder = tfds.builder_from_directory(name) if is_dir else tfds.builder(name)
    except Exception as err:  # tfds raises many types for unknown or broken datasets
        raise UserError(
            f"cannot open TFDS dataset {name!r} from {spec!r}: {err}; expected a registered name "
            "prepared under $TFDS_DATA_DIR or a prepared dataset folder"
        ) from err
    if split not in builder.info.splits:
        raise UserError(f"{spec!r}: no split {split!r}; have {sorted(builder.info.splits)}")
    text_features = [
        key for key, value in builder.info.features.items() if isinstance(value, tfds.features.Text)
    ]
    feature = feature or (text_features[0] if text_features else None)
    if feature not in builder.info.features:
        raise UserError(
            f"{spec!r}: no text feature {feature!r}; text features are {text_features}; fix: "
            "name one as tfds:NAME:SPLIT:FEATURE"
        )
    try:
        source = builder.as_data_source(split=split)
    except Exception as err:
        raise UserError(f"{spec!r}: cannot read split {split!r} ({err}); prepare it first") from err
    for index in range(len(source)):
        value = source[index][feature]
        yield value.decode("utf-8") if isinstance(value, bytes) else str(value)
