"""Length-grouped batches: draw `groups` batches at once, sort their texts by token count, and
pad each batch only to its own longest text (rounded up to `pad_multiple` tokens).

Corpus texts are mostly far shorter than `max_length` (the bundled corpus: median 11 tokens,
99th percentile 47, against a 48-token limit), so fixed-shape batches spend most of each step
on padding. Grouping keeps the batches' rows random within a shuffled window of
`groups x batch_size` texts (as HF's `group_by_length`), and costs one compile per distinct
batch length (at most max_length / pad_multiple).

Pipeline: shuffled global groups -> `SortByLength` (on the whole global group, so every process
agrees on the order and the lengths) -> `TakeProcessRows(groups=...)` -> tokenize ->
`GroupedBatches` splits each group into its batches and trims their padding. Its state is the
grain state before the current group plus the position in it, so a resumed run replays exactly.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator

import grain
import numpy as np


def groups_for(rows: int, batch_size: int, length_groups: int) -> int:
    """Batches per group for a dataset of `rows`: `length_groups`, fewer when the data holds
    fewer batches (a small dataset is grouped whole), at least 1. An epoch then yields its
    complete groups: rows // (groups * batch_size) * groups batches."""
    return max(1, min(length_groups, rows // batch_size))


def padded_length(longest: int, multiple: int, max_length: int) -> int:
    """`longest` tokens rounded up to a multiple of `multiple`, at most `max_length`."""
    return min(max_length, -(-max(longest, 1) // multiple) * multiple)


@dataclasses.dataclass
class SortByLength(grain.transforms.Map):
    """A global group of `groups * batch_size` rows -> the same rows as `groups` consecutive
    batches of similar token counts, the batches in a seeded random order, plus `pad_to`
    [rows] int32: each row's batch length (see `padded_length`).

    token_counts: texts (bytes) [n] -> token counts [n], as the tokenizer will cut them.
    """

    token_counts: Callable[[np.ndarray], np.ndarray]
    batch_size: int
    pad_multiple: int
    max_length: int
    seed: int

    def map(self, group: dict) -> dict:
        lengths = np.asarray(self.token_counts(group["text"]))
        batches = np.argsort(lengths, kind="stable").reshape(-1, self.batch_size)
        # Without the shuffle every group would run short -> long batches in turn.
        rng = np.random.default_rng([self.seed, int(np.min(group["index"]))])
        batches = batches[rng.permutation(len(batches))]
        longest = lengths[batches].max(axis=1)
        pad = [padded_length(int(n), self.pad_multiple, self.max_length) for n in longest]
        out = {key: value[batches.reshape(-1)] for key, value in group.items()}
        out["pad_to"] = np.repeat(np.array(pad, np.int32), self.batch_size)
        return out


class GroupedBatches(Iterator[dict]):
    """Splits grain's groups (this process's rows of `groups` batches, `rows` rows each) into
    batches whose [rows, L] token arrays are cut to their `pad_to` length.

    `get_state()` / `set_state()`: JSON bytes {"grain": state before the current group,
    "position": batches of it already handed out}.
    """

    TOKEN_KEYS = ("input_ids", "attention_mask")

    def __init__(self, loader_iterator, rows: int):
        self._iterator, self._rows = loader_iterator, rows
        self._group: list[dict] = []
        self._position = 0
        self._group_state = loader_iterator.get_state()

    def __iter__(self) -> GroupedBatches:
        return self

    def __next__(self) -> dict:
        if self._position == len(self._group):
            self._load_group()
        batch = self._group[self._position]
        self._position += 1
        return batch

    def _load_group(self) -> None:
        self._group_state = self._iterator.get_state()
        group = next(self._iterator)
        self._group, self._position = self._split(group), 0

    def _split(self, group: dict) -> list[dict]:
        pad_to = group.pop("pad_to")
        out = []
        for start in range(0, len(pad_to), self._rows):
            rows = slice(start, start + self._rows)
            batch = {key: value[rows] for key, value in group.items()}
            for key in self.TOKEN_KEYS:
                batch[key] = batch[key][:, : int(pad_to[start])]
            out.append(batch)
        return out

    def get_state(self) -> bytes:
        state = {"grain": self._group_state.decode("utf-8"), "position": self._position}
        return json.dumps(state).encode("utf-8")

    def set_state(self, state: bytes) -> None:
        saved = json.loads(state)
        self._iterator.set_state(saved["grain"].encode("utf-8"))
        self._group, self._position = [], 0
        if saved["position"]:
            self._load_group()
            self._position = saved["position"]
