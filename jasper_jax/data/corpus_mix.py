"""Several corpora mixed with weights, and the paper's augmentation into sentence pieces.

``--corpus`` is repeatable; each value is ``SPEC[@WEIGHT]`` with SPEC any
:func:`jasper_jax.data.corpus.read_corpus` form and WEIGHT a positive decimal number. The text
after the last ``@`` is the weight unless it holds ``/`` or ``:`` or the whole value names an
existing file or folder (so ``hf:/data/v@2:train`` is a path; a file ``a@b.txt`` that does not
exist yet reads as a bad weight).

- One corpus (weighted or not): its texts in file order; ``limit`` keeps the first ones.
- Several, no weights: concatenated in the given order; ``limit`` keeps the first texts.
- Several, every one weighted: a mix. Each source gives exactly its share ``w_i / sum(w)`` of
  the texts (largest-remainder rounding). Texts are drawn **without replacement and never
  repeated**: a source that runs out stops the mix, so the total is the largest number of texts
  the sources can give at these shares (``min_i n_i * sum(w) / w_i``), or ``limit`` if smaller;
  a warning names the source that bounds it. (Repeating would spend teacher time on duplicate
  rows, and the paper de-duplicates its texts.) Each source's drawn texts keep their file
  order; the sources are interleaved in a seeded random order, so every slice of the corpus
  holds about the same shares.
- ``split_share`` (``--split-sentences``): the paper's augmentation (Jasper and Stella, section
  3.2: 30 % of documents chosen at random are split into short texts of 1-10 sentences). After
  the texts are chosen (``limit`` counts them), ``round(split_share * n)`` of them, drawn at
  random, are **replaced** in place by consecutive pieces of 1-10 sentences (sizes drawn
  uniformly, the last piece takes what is left), so the dataset holds more texts than ``limit``.
  Replacing follows the paper's wording ("split into"): the whole document is not kept as well.
  Sentences are found by :func:`jasper_jax.data.chunking.sentence_spans`; a piece is the text
  from its first sentence's start to its last sentence's end.

The same arguments and ``seed`` give the same texts in the same order (the teacher dataset's plan
fingerprints them, so a resumed build must see them again). The random draws rank raw PCG64
outputs, whose stream numpy keeps fixed across versions, unlike ``Generator`` methods.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from jasper_jax.data.chunking import sentence_spans
from jasper_jax.data.corpus import read_corpus
from jasper_jax.errors import UserError

MAX_PIECE_SENTENCES = 10  # the paper's pieces hold 1-10 sentences
# stream tags: the draws of one purpose do not depend on those of another
_PICK, _ORDER, _CHOOSE_SPLIT, _PIECES = range(4)
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CorpusMix:
    """The corpora of one build, their weights, and the augmentation (module docstring).

    Attributes:
      specs: corpus specs (``read_corpus`` forms) in the given order.
      weights: one positive weight per spec, or None (concatenate).
      split_share: share of texts split into sentence pieces, in [0, 1].
      seed: seed of the mix and the augmentation (a non-negative integer).
    """

    specs: tuple[str, ...]
    weights: tuple[Fraction, ...] | None = None
    split_share: float = 0.0
    seed: int = 0

    @classmethod
    def parse(cls, values: Sequence[str], split_share: float = 0.0, seed: int = 0) -> CorpusMix:
        """A mix from ``--corpus`` values ``SPEC[@WEIGHT]``; UserError for a weight that is not
        a positive number, some values weighted and others not, a share outside [0, 1]."""
        if isinstance(values, str):
            values = [values]
        if not values:
            raise UserError("no corpus given; fix: pass --corpus SPEC at least once")
        parsed = [_split_weight(value) for value in values]
        weighted = [v for v, (_, weight) in zip(values, parsed, strict=True) if weight is not None]
        if weighted and len(weighted) != len(values):
            bare = [v for v, (_, weight) in zip(values, parsed, strict=True) if weight is None]
            raise UserError(
                f"--corpus {bare[0]!r} has no weight while {weighted[0]!r} has one; fix: give "
                "every --corpus a weight (SPEC@WEIGHT) to mix them, or none to concatenate them"
            )
        if not 0.0 <= split_share <= 1.0:
            raise UserError(
                f"--split-sentences {split_share} is not a share; fix: give a number from 0 to 1 "
                "(the paper splits 0.3 of its documents)"
            )
        if seed < 0:
            raise UserError(f"--corpus-seed {seed} is negative; fix: give an integer >= 0")
        specs = tuple(spec for spec, _ in parsed)
        weights = tuple(w for _, w in parsed) if weighted and len(values) > 1 else None
        return cls(specs, weights, float(split_share), int(seed))

    def read(self, limit: int | None = None) -> tuple[list[str], int]:
        """(the chosen non-empty texts before augmentation, number of empty texts skipped)."""
        sources = [read_corpus(spec) for spec in self.specs]
        skipped = sum(source.skipped_empty for source in sources)
        if self.weights is None:
            texts = [text for source in sources for text in source.texts]
            return (texts[:limit] if limit else texts), skipped
        return self._mix([source.texts for source in sources], limit), skipped

    def texts(self, limit: int | None = None) -> tuple[list[str], int]:
        """(the build's texts: chosen, then augmented; number of empty texts skipped)."""
        texts, skipped = self.read(limit)
        return self.augment(texts), skipped

    def augment(self, texts: Sequence[str]) -> list[str]:
        """``texts`` with ``round(split_share * len(texts))`` of them, drawn at random, each
        replaced in place by its pieces of 1-10 sentences."""
        count = math.floor(self.split_share * len(texts) + 0.5)
        if count == 0:
            return list(texts)
        chosen = np.zeros(len(texts), bool)
        chosen[_permutation(len(texts), self.seed, _CHOOSE_SPLIT)[:count]] = True
        draws = np.random.PCG64(np.random.SeedSequence([self.seed, _PIECES]))
        out: list[str] = []
        for text, split in zip(texts, chosen, strict=True):
            out.extend(sentence_pieces(text, draws) if split else [text])
        log.info("split %d of %d texts into %d pieces", count, len(texts), len(out) - len(texts))
        return out

    def _mix(self, sources: list[list[str]], limit: int | None) -> list[str]:
        """Exact shares of each source, drawn without replacement, sources interleaved."""
        total_weight = sum(self.weights)
        for spec, texts in zip(self.specs, sources, strict=True):
            if not texts:
                raise UserError(
                    f"corpus {spec!r} of the mix holds no non-empty texts; fix: drop it or give "
                    "a corpus with text in it"
                )
        # the most texts the mix can give at these shares without repeating any
        bounds = [len(t) * total_weight // w for t, w in zip(sources, self.weights, strict=True)]
        most = min(bounds)
        total = min(limit, most) if limit else most
        if most < (limit or sum(map(len, sources))):
            tightest = int(np.argmin(bounds))
            log.warning(
                "mix of %d texts: corpus %r (%d texts) runs out at share %.4g; texts are never "
                "repeated, so the mix stops there",
                total,
                self.specs[tightest],
                len(sources[tightest]),
                self.weights[tightest] / total_weight,
            )
        counts = _apportion(total, [w / total_weight for w in self.weights])
        picked = [
            [texts[i] for i in np.sort(_permutation(len(texts), self.seed, _PICK, k)[:count])]
            for k, (texts, count) in enumerate(zip(sources, counts, strict=True))
        ]
        labels = np.repeat(np.arange(len(sources)), counts)
        labels = labels[_permutation(total, self.seed, _ORDER)]
        taken = [iter(texts) for texts in picked]
        return [next(taken[label]) for label in labels]


def sentence_pieces(text: str, draws: np.random.PCG64) -> list[str]:
    """``text`` cut into consecutive pieces of 1-10 of its sentences (sizes drawn from
    ``draws``; the last piece takes the sentences left); a text without sentence ends is one
    piece."""
    spans = sentence_spans(text)
    if len(spans) <= 1:
        return [text]
    pieces, first = [], 0
    while first < len(spans):
        size = int(draws.random_raw() % MAX_PIECE_SENTENCES) + 1  # bias of 2**-60: none
        last = min(first + size, len(spans)) - 1
        pieces.append(text[spans[first][0] : spans[last][1]])
        first = last + 1
    return pieces


def _split_weight(value: str) -> tuple[str, Fraction | None]:
    """(spec, weight or None) of one ``--corpus`` value (rules in the module docstring)."""
    spec, at, tail = value.rpartition("@")
    if not at or "/" in tail or ":" in tail or pathlib.Path(value).expanduser().exists():
        return value, None
    try:
        number = float(tail)
    except ValueError:
        number = math.nan
    if not (math.isfinite(number) and number > 0) or not spec:
        raise UserError(
            f"--corpus {value!r}: weight {tail!r} is not a positive number; fix: write "
            "SPEC@WEIGHT with a number > 0, e.g. corpus.jsonl@0.8"
        )
    try:
        return spec, Fraction(tail.strip())  # exact decimal shares: 0.8 and 0.2 sum to 1
    except ValueError:
        return spec, Fraction(number)


def _apportion(total: int, shares: Sequence[Fraction]) -> list[int]:
    """Integers summing to ``total``, each the floor of ``total * share`` plus one for the
    largest remainders (ties to the earlier source)."""
    exact = [total * share for share in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _permutation(n: int, *key: int) -> np.ndarray:
    """A permutation of ``range(n)`` seeded by ``key``, the same on every numpy version (it
    ranks raw PCG64 outputs)."""
    raw = np.random.PCG64(np.random.SeedSequence(list(key))).random_raw(n)
    return np.argsort(raw, kind="stable")
