"""Texts of a local Hugging Face ``datasets`` corpus: ``hf:PATH[:SPLIT][:FIELD]``.

PATH (no ``:`` in it) is read with local loaders only; nothing is downloaded (the ``datasets``
library is imported with ``HF_DATASETS_OFFLINE=1``):

- a folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``: opened with
  ``load_from_disk``, which memory-maps its arrow files (no copy);
- a ``.parquet``, ``.arrow``, ``.jsonl`` / ``.json`` (optionally ``.gz``) file, or a folder of
  files of one of these types (searched recursively; split names come from the file names, e.g.
  ``data/train-00000-of-00004.parquet`` and ``data/test-...``, as on the Hub, else every file is
  ``train``): opened with ``load_dataset(TYPE, ..., streaming=True)``. Streaming reads the files
  where they are; without it ``datasets`` would first write an arrow copy of the whole corpus
  into its cache.

SPLIT defaults to ``train``. FIELD defaults to the column ``text`` when it holds strings, else
the first string column. Only that column is read, in batches; missing (null) values count as
empty texts.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Iterator

from jasper_jax.errors import UserError, one_line

# file suffix -> the ``datasets`` packaged builder that reads it
FILE_TYPES = {
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
}
_STRING_DTYPES = ("string", "large_string")
_BATCH = 4096  # texts per batch read from the column


def hf_texts(spec: str, split: str | None = None) -> Iterator[str]:
    """Texts of the corpus ``spec`` (``hf:PATH[:SPLIT][:FIELD]``) in dataset order; a missing
    value is yielded as ``""`` (the caller skips and counts empty texts).

    ``split`` (when given) overrides the spec's SPLIT.

    Raises:
      UserError: a missing path, a folder with no data files (or files of several types), an
        unknown split, a FIELD that is not a string column (names the columns), a file that
        ``datasets`` cannot read.
    """
    path_text, spec_split, field = (spec.split(":", 3)[1:] + [None, None])[:3]
    table = open_hf_split(path_text, split or spec_split or None, spec)
    column = _text_column(table, field or None, spec)
    for batch in hf_batches(table, [column], spec):
        for value in batch[column]:
            yield "" if value is None else value


def open_hf_split(path_text: str, split: str | None, spec: str):
    """The ``Dataset`` (memory-mapped) or ``IterableDataset`` (streamed) of ``split`` of the
    local corpus at ``path_text`` (``split`` None: the dataset saved alone, else ``train``).

    Raises:
      UserError: a missing path, a folder with no data files (or files of several types), an
        unknown split, a file that ``datasets`` cannot open; ``spec`` names the corpus.
    """
    path = pathlib.Path(path_text).expanduser()
    if not path_text or not path.exists():
        raise UserError(
            f"{spec!r}: {path_text!r} does not exist; fix: give hf:PATH with PATH a local "
            "save_to_disk folder or a .parquet/.arrow/.jsonl file or folder"
        )
    return _open_split(path, split, spec)


def hf_batches(table, columns: list[str], spec: str) -> Iterator[dict[str, list]]:
    """Batches of ``columns`` of ``table`` in order: dicts of column -> [b] values (b <= 4096).

    Raises:
      UserError: the data files cannot be read (disk errors pass through for the CLI).
    """
    try:
        yield from table.select_columns(columns).iter(batch_size=_BATCH)
    except (UserError, MemoryError):
        raise
    except Exception as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise  # a disk error: the CLI names the file and the fix
        raise UserError(
            f"{spec!r}: cannot read column{'s' if len(columns) > 1 else ''} "
            f"{', '.join(map(repr, columns))} ({type(err).__name__}: {one_line(err)}); "
            "fix: check or rewrite the data files"
        ) from err


def _datasets():
    """The ``datasets`` module, kept off the network (and imported only when an hf: corpus is
    read: it is slow to import)."""
    if "datasets" not in sys.modules:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError as err:
        raise UserError(
            f"hf: corpora need the datasets library ({err}); fix: pip install 'datasets>=2.19'"
        ) from err
    datasets.config.HF_HUB_OFFLINE = True  # already imported elsewhere: the env var came late
    return datasets


def _open_split(path: pathlib.Path, split: str | None, spec: str):
    """The ``Dataset`` (memory-mapped) or ``IterableDataset`` (streamed) of ``split``."""
    datasets = _datasets()
    saved = path.is_dir() and any(
        (path / name).is_file() for name in ("dataset_dict.json", "state.json")
    )
    try:
        if saved:
            found = datasets.load_from_disk(str(path))
        else:
            files = {"data_files": str(path)} if path.is_file() else {"data_dir": str(path)}
            found = datasets.load_dataset(_file_type(path, spec), streaming=True, **files)
    except (UserError, MemoryError):
        raise
    except Exception as err:
        if isinstance(err, OSError) and err.errno is not None:
            raise
        raise UserError(
            f"cannot open {spec!r} with the datasets library ({type(err).__name__}: "
            f"{one_line(err)}); fix: check the files, or rewrite them with save_to_disk"
        ) from err
    if isinstance(found, (datasets.Dataset, datasets.IterableDataset)):
        if split is not None:  # one dataset saved on its own: it has no splits to choose
            raise UserError(
                f"{spec!r}: {str(path)!r} holds one dataset without splits, so split {split!r} "
                "cannot be chosen; fix: leave SPLIT empty, e.g. hf:PATH::FIELD"
            )
        return found
    split = split or "train"
    if split not in found:
        raise UserError(f"{spec!r}: no split {split!r}; have {sorted(found)}")
    return found[split]


def _file_type(path: pathlib.Path, spec: str) -> str:
    """The packaged builder for a data file, or for the one type of data file in a folder."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    kinds = {
        FILE_TYPES[suffix]
        for p in files
        if not any(part.startswith(".") for part in p.relative_to(path).parts)
        for suffix in FILE_TYPES
        if p.name.endswith(suffix)
    }
    if len(kinds) != 1:
        found = "no data files" if not kinds else f"files of several types {sorted(kinds)}"
        raise UserError(
            f"{spec!r}: {str(path)!r} holds {found}; expected a save_to_disk folder, or "
            f"files of one type ({', '.join(FILE_TYPES)}); fix: point hf: at one of those"
        )
    return kinds.pop()


def _text_column(table, field: str | None, spec: str) -> str:
    """FIELD if it is a string column; by default ``text``, else the first string column."""
    features = table.features
    if features is None:  # a stream without a schema: judge by the first record
        first = next(iter(table), {})
        columns = list(first)
        strings = [name for name, value in first.items() if isinstance(value, str)]
    else:
        columns = list(features)
        strings = [
            name
            for name, feature in features.items()
            if getattr(feature, "dtype", None) in _STRING_DTYPES
        ]
    if field is None:
        field = "text" if "text" in strings else (strings[0] if strings else None)
    if field is None or field not in strings:
        what = "has no string column" if field is None else f"has no string column {field!r}"
        raise UserError(
            f"{spec!r} {what}; its columns are {columns}, string ones {strings}; fix: name a "
            "string column as hf:PATH:SPLIT:FIELD"
        )
    return field
