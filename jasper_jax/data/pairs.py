"""Pair rows for contrastive training: ``(query, positive[, negatives...])``.

A pair corpus gives, per row, a query, its positive document and a fixed number ``k`` of hard
negative documents. Column order everywhere (teacher dataset, pipeline, losses)::

    column 0          query      (role "query")
    column 1          positive   (role "document")
    columns 2..k+1    negatives  (role "document")
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from collections.abc import Iterator

import numpy as np

from jasper_jax.data.corpus import (
    EMBEDDED,
    check_file_source,
    jsonl_values,
    load_embedded_records,
)
from jasper_jax.data.corpus_hf import hf_batches, open_hf_split
from jasper_jax.errors import UserError

QUERY, DOCUMENT = "query", "document"


@dataclasses.dataclass(frozen=True)
class PairRows:
    """Rows of (query, positive, k negatives), every row with the same k.

    Attributes:
      queries: [n] query texts.
      positives: [n] positive document texts.
      negatives: [n] tuples of k hard-negative document texts each (k may be 0).
      source: where the rows came from (for messages and the dataset plan).
    """

    queries: list[str]
    positives: list[str]
    negatives: list[tuple[str, ...]]
    source: str

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def negative_count(self) -> int:
        """k: hard negatives per row."""
        return len(self.negatives[0]) if self.negatives else 0

    @property
    def width(self) -> int:
        """m = 2 + k: texts per row."""
        return 2 + self.negative_count

    def columns(self) -> list[list[str]]:
        """The m columns of texts: queries, positives, then each negative slot."""
        slots = [[row[j] for row in self.negatives] for j in range(self.negative_count)]
        return [list(self.queries), list(self.positives), *slots]

    def spread(self, n: int) -> PairRows:
        """`n` rows evenly spaced over these (all of them when n >= len): the embedded pairs
        follow WordNet's synset order, so the first n would all come from one branch."""
        if n >= len(self):
            return self
        keep = np.linspace(0, len(self) - 1, n).round().astype(int)
        pick = lambda column: [column[i] for i in keep]
        source = f"{self.source} ({n} rows spread)"
        return PairRows(pick(self.queries), pick(self.positives), pick(self.negatives), source)

    @staticmethod
    def roles(width: int) -> tuple[str, ...]:
        """The role of each of the `width` columns: query, then documents."""
        return (QUERY, *([DOCUMENT] * (width - 1)))


# --- reading pair rows --------------------------------------------------------------------------

EMBEDDED_NEGATIVES = 1  # hard negatives per embedded row when `negatives` is not given
QUERY_FIELDS = ("query", "anchor")
POSITIVE_FIELDS = ("positive", "document")
NEGATIVE_FIELDS = ("negatives", "negative")  # a list of strings / one string
_NUMBERED = re.compile(r"negative_(\d+)")  # sentence-transformers' negative_1, negative_2, ...
_FORMS = "'embedded[:SPLIT]', a .jsonl/.jsonl.gz file or 'hf:PATH[:SPLIT]'"


def read_pairs(
    spec: str,
    split: str | None = None,
    negatives: int | None = None,
    limit: int | None = None,
) -> PairRows:
    """Pair rows of ``spec``: n rows of (query, positive, k negatives), in source order.

    Forms of ``spec``:

    - ``"embedded"`` / ``"embedded:SPLIT"``: the bundled WordNet corpus (split ``train`` by
      default); a row per usage example: query = the example, positive = its synset's gloss,
      negatives = glosses of the nearest other synsets (k = 1 by default, see
      :func:`embedded_pairs`).
    - ``*.jsonl`` / ``*.jsonl.gz``: an object per line with ``query`` (or ``anchor``),
      ``positive`` (or ``document``) and optionally ``negatives`` (a list of strings),
      ``negative`` (one string) or ``negative_1``, ``negative_2``, ...
    - ``hf:PATH[:SPLIT]``: a local Hugging Face ``datasets`` corpus with the same fields as
      columns, read offline (see :mod:`jasper_jax.data.corpus_hf`).

    Args:
      spec: the source, one of the forms above.
      split: overrides the spec's SPLIT (files have none).
      negatives: k; None: every row must have the same count; K: the first K of each row.
      limit: read only the first ``limit`` rows.

    Returns:
      PairRows with [n] queries, [n] positives and [n] k-tuples of negatives.

    Raises:
      UserError: in one line naming the problem, the row and the fix: a row without a text
        query or positive, malformed negatives, unequal or too few negatives, a missing file,
        an unknown form, zero rows, a negative ``negatives`` or ``limit``.
    """
    for name, value in (("negatives", negatives), ("limit", limit)):
        if value is not None and value < 0:
            raise UserError(f"{name}={value} is negative; fix: pass {name} >= 0 (or leave it out)")
    if spec == EMBEDDED or spec.startswith(EMBEDDED + ":"):
        split = split or spec.partition(":")[2] or "train"
        k = EMBEDDED_NEGATIVES if negatives is None else negatives
        return _collect(embedded_pairs(split, k), f"embedded:{split}", negatives, limit)
    if spec.startswith("hf:"):
        path_text, _, rest = spec[3:].partition(":")
        if ":" in rest:
            raise UserError(
                f"pairs {spec!r}: expected 'hf:PATH[:SPLIT]' (pair columns are fixed: query, "
                "positive, negatives); fix: drop the FIELD part"
            )
        split = split or rest or None
        source = f"hf:{path_text}:{split}" if split else spec
        return _collect(_hf_records(spec, path_text, split), source, negatives, limit)
    path = _pair_file(spec, split)
    return _collect(_jsonl_records(path), str(path), negatives, limit)


def _pair_file(spec: str, split: str | None) -> pathlib.Path:
    """The existing .jsonl(.gz) file that ``spec`` names (a file has no splits)."""
    path = pathlib.Path(spec).expanduser()
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        raise UserError(f"pairs {spec!r} have an unknown form; expected {_FORMS}; fix: convert")
    check_file_source(path, split, f"the pair file {spec!r}", "pair file")
    return path


def embedded_pairs(split: str, negatives: int) -> Iterator[tuple[str, dict]]:
    """(label, record) for each usage example of the embedded corpus whose synset has a gloss.

    Records hold ``query`` (the example), ``positive`` (its synset's gloss) and ``negatives``:
    up to ``negatives`` glosses of the nearest other synsets in corpus (WordNet offset) order,
    taken alternately after and before (next, previous, next+1, previous-1, ...), skipping a
    gloss equal to the positive or already taken. Deterministic; corpus order.
    """
    records = load_embedded_records(split)
    glosses = [r["text"] for r in records if r["kind"] == "gloss"]
    where = {r["synset"]: i for i, r in enumerate(r for r in records if r["kind"] == "gloss")}
    for number, record in enumerate(records, start=1):
        index = where.get(record["synset"]) if record["kind"] == "example" else None
        if index is not None:
            row = {"query": record["text"], "positive": glosses[index]}
            row["negatives"] = _neighbour_glosses(glosses, index, negatives)
            yield f"record {number}", row


def _neighbour_glosses(glosses: list[str], index: int, k: int) -> list[str]:
    """Up to k glosses of the synsets nearest to ``index``: index+1, index-1, index+2, ..."""
    chosen: list[str] = []
    for step in range(1, len(glosses)):
        if len(chosen) == k or (index + step >= len(glosses) and index - step < 0):
            break
        for j in (index + step, index - step):
            text = glosses[j] if 0 <= j < len(glosses) else None
            if text is not None and text != glosses[index] and text not in chosen:
                chosen.append(text)
                if len(chosen) == k:
                    break
    return chosen


def _jsonl_records(path: pathlib.Path) -> Iterator[tuple[str, object]]:
    example = '{"query": "...", "positive": "...", "negatives": [...]}'
    for number, _, record in jsonl_values(path, example):
        if record is not None:  # a blank line (e.g. at the end) is no row
            yield f"line {number}", record


def _hf_records(spec: str, path_text: str, split: str | None) -> Iterator[tuple[str, dict]]:
    table = open_hf_split(path_text, split, spec)
    # A stream without a schema has no column names: take the first record's keys.
    columns = table.column_names or list(next(iter(table), {}))
    fields = (*QUERY_FIELDS, *POSITIVE_FIELDS, *NEGATIVE_FIELDS)
    wanted = [c for c in columns if c in fields or _NUMBERED.fullmatch(c)]
    index = 0
    # Only the pair columns are read; with none, all (row 0 then names what is missing).
    for batch in hf_batches(table, wanted or columns, spec):
        names = list(batch)
        for values in zip(*(batch[name] for name in names), strict=True):
            yield f"row index {index}", dict(zip(names, values, strict=True))
            index += 1


def _collect(
    records: Iterator[tuple[str, object]], source: str, negatives: int | None, limit: int | None
) -> PairRows:
    """PairRows of the first ``limit`` records, checked; k fixed by ``negatives`` or row 1."""
    rows = PairRows([], [], [], source)
    first: tuple[str, int] | None = None  # (label, count) of the first row
    for label, record in records if limit != 0 else ():
        where = f"{source!r} {label}"
        query, positive, found = _parse(record, where)
        if negatives is not None and len(found) < negatives:
            raise UserError(
                f"{where} has {len(found)} negatives, fewer than negatives={negatives}; fix: "
                "pass a smaller --negatives K, or give that row more negatives"
            )
        if negatives is None and first is not None and len(found) != first[1]:
            raise UserError(
                f"{where} has {len(found)} negatives but {first[0]} has {first[1]}; every row "
                "needs the same number; fix: pass --negatives K to keep the first K of each row"
            )
        first = first or (label, len(found))
        rows.queries.append(query)
        rows.positives.append(positive)
        rows.negatives.append(tuple(found if negatives is None else found[:negatives]))
        if limit is not None and len(rows) >= limit:
            break
    if not rows.queries:
        raise UserError(
            f"pairs {source!r} hold zero rows{' (limit=0)' if limit == 0 else ''}; fix: give "
            "a source with rows of query and positive"
        )
    return rows


def _parse(record: object, where: str) -> tuple[str, str, list[str]]:
    """(query, positive, negatives) of one record, or a UserError naming ``where``."""
    if not isinstance(record, dict):
        raise UserError(
            f"{where} is a {type(record).__name__}, not an object; fix: give "
            '{"query": "...", "positive": "..."} per row'
        )
    query = _text(record, QUERY_FIELDS, where)
    positive = _text(record, POSITIVE_FIELDS, where)
    return query, positive, _negatives(record, where)


def _text(record: dict, names: tuple[str, ...], where: str) -> str:
    """The first of ``names`` present (not null) in ``record``: a non-empty string."""
    name = next((n for n in names if record.get(n) is not None), None)
    alias = f"{names[0]!r} (or {names[1]!r})"
    if name is None:
        raise UserError(
            f"{where} has no {alias}; its fields are {sorted(record)}; fix: give every row a "
            f"{alias} text"
        )
    value = record[name]
    if not isinstance(value, str) or not value.strip():
        what = "empty" if isinstance(value, str) else f"a {type(value).__name__}, not a string"
        raise UserError(f"{where}: {name!r} is {what}; fix: give every row a non-empty {alias}")
    return value


def _negatives(record: dict, where: str) -> list[str]:
    """The row's negatives from ``negatives``, ``negative`` or ``negative_1``, ``negative_2``..."""
    numbered = sorted((int(m[1]), key) for key in record if (m := _NUMBERED.fullmatch(key)))
    given = {
        name: value
        for name, value in (
            ("negatives", record.get("negatives")),
            ("negative", record.get("negative")),
            ("negative_N", [record[key] for _, key in numbered if record[key] is not None]),
        )
        if value is not None and value != []  # nulls: no negatives in that field
    }
    if len(given) > 1:
        raise UserError(
            f"{where} gives negatives in several fields {sorted(given)}; fix: use one of "
            "'negatives' (a list), 'negative' (one string) or 'negative_1', 'negative_2', ..."
        )
    name, value = next(iter(given.items()), ("negatives", []))
    if name == "negative":
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise UserError(
            f"{where}: {name!r} is a {type(value).__name__}, not a list of strings; fix: give "
            f'"negatives": ["...", ...]'
        )
    for position, text in enumerate(value, start=1):
        if not isinstance(text, str) or not text.strip():
            what = "empty" if isinstance(text, str) else f"a {type(text).__name__}"
            raise UserError(
                f"{where}: negative {position} is {what}, not a non-empty string; fix: give "
                "negatives as non-empty strings, or leave that one out"
            )
    return list(value)
