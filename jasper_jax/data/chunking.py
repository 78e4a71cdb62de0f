"""Split long texts into chunks (character spans) and map those spans onto token positions.

Chunk alignment (dewey_en_beta, PAPER 7) encodes a document once and mean-pools each chunk's
token span. Chunks are stored as character spans ``[start, end)`` of the text, so the teacher can
encode ``text[start:end]`` on its own and any student tokenizer can find the same span again
through its offset mapping (:func:`token_spans`).

Three ways to chunk (``ChunkingConfig.mode``), with sizes counted in tokens of one tokenizer:
- ``sentences``: consecutive sentences packed greedily into chunks of at most ``size`` tokens
  (a single sentence longer than ``size`` is cut into token windows); with ``overlap`` a chunk
  starts with the last whole sentences of the one before, up to ``overlap`` tokens of them;
- ``tokens``: windows of ``size`` tokens, consecutive windows sharing ``overlap`` tokens;
- ``random``: dewey_en_beta's recipe (PAPER 7): per document a size drawn from
  [``min_size``, ``size``], an overlap of 30-60 % of it, and sentence packing (70 % of
  documents) or token windows (30 %). The draws are seeded by the document's text, so a build
  is reproducible and resumable. dewey draws 64-500 *characters*; in tokens that is about
  ``random:16:112``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Sequence

import numpy as np
import tokenizers

from jasper_jax.errors import UserError

MODES = ("sentences", "tokens", "random")
RANDOM_OVERLAP = (0.3, 0.6)  # share of the drawn size (dewey_en_beta)
RANDOM_SENTENCE_SHARE = 0.7  # documents chunked by sentences; the rest by token windows
Span = tuple[int, int]
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclasses.dataclass(frozen=True)
class ChunkingConfig:
    """How documents are cut into chunks.

    Attributes:
      mode: "sentences", "tokens" or "random" (see module docstring).
      size: most tokens in one chunk (tokenizer of the teacher-data build).
      overlap: tokens shared by consecutive chunks (at most; whole sentences in "sentences").
      min_size: smallest drawn size ("random" only).
    """

    mode: str
    size: int
    overlap: int = 0
    min_size: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"chunking mode {self.mode!r}: choose one of {MODES}")
        if self.size < 1:
            raise UserError(f"chunk size {self.size} must be at least 1 token")
        if not 0 <= self.overlap < self.size or (self.overlap and self.mode == "random"):
            raise UserError(
                f"chunk overlap {self.overlap}: must be >= 0 and < size {self.size} (e.g. "
                "tokens:128:32); 'random' draws its own overlap"
            )
        if (self.mode == "random") != (self.min_size > 0) or self.min_size > self.size:
            raise UserError(
                f"chunk sizes [{self.min_size}, {self.size}]: 'random' needs "
                "1 <= MIN <= MAX (random:MIN:MAX, e.g. random:16:112); other modes take no MIN"
            )

    @classmethod
    def parse(cls, spec: str) -> ChunkingConfig:
        """ "sentences:64", "sentences:64:16", "tokens:128", "tokens:128:32" (mode:size[:overlap])
        or "random:16:112" (random:min:max)."""
        parts = spec.split(":")
        try:
            if len(parts) not in (2, 3) or (parts[0] == "random" and len(parts) != 3):
                raise ValueError
            numbers = [int(x) for x in parts[1:]]
            if parts[0] == "random":
                return cls("random", numbers[1], min_size=numbers[0])
            return cls(parts[0], numbers[0], numbers[1] if len(numbers) == 2 else 0)
        except ValueError as e:
            raise UserError(
                f"chunking {spec!r}: write MODE:SIZE[:OVERLAP] or random:MIN:MAX, e.g. "
                "sentences:64, tokens:128:32 or random:16:112"
            ) from e

    def spec(self) -> str:
        if self.mode == "random":
            return f"random:{self.min_size}:{self.size}"
        return f"{self.mode}:{self.size}" + (f":{self.overlap}" if self.overlap else "")

    def for_document(self, text: str) -> ChunkingConfig:
        """The fixed chunking of one document: itself, or for "random" the draws seeded by the
        text (size, overlap, sentences or tokens)."""
        if self.mode != "random":
            return self
        seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
        rng = np.random.default_rng(seed)
        size = int(rng.integers(self.min_size, self.size + 1))
        overlap = min(int(round(rng.uniform(*RANDOM_OVERLAP) * size)), size - 1)
        mode = "sentences" if rng.random() < RANDOM_SENTENCE_SHARE else "tokens"
        return ChunkingConfig(mode, size, overlap)


def sentence_spans(text: str) -> list[Span]:
    """Character spans of the sentences of ``text`` (split after . ! ? or at line breaks),
    without surrounding whitespace; empty sentences are left out."""
    spans, start = [], 0
    for match in [*_SENTENCE_END.finditer(text), None]:
        end = match.start() if match else len(text)
        piece = text[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))
        start = match.end() if match else end
    return spans


def _windows(offsets: np.ndarray, first: int, last: int, size: int, step: int) -> list[Span]:
    """Character spans of token windows over tokens [first, last) of ``offsets`` [n, 2]."""
    spans = []
    for a in range(first, last, step):
        b = min(a + size, last)
        spans.append((int(offsets[a, 0]), int(offsets[b - 1, 1])))
        if b == last:
            break
    return spans


def chunk_spans(text: str, offsets: np.ndarray, config: ChunkingConfig) -> list[Span]:
    """Chunks of ``text`` as character spans, in order of their starts.

    Args:
      text: the document.
      offsets: [n_tokens, 2] character offsets of its tokens (no special tokens), in order.
      config: mode and sizes ("random" is resolved per document, see ``for_document``).
    """
    config = config.for_document(text)
    offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
    offsets = offsets[offsets[:, 1] > offsets[:, 0]]  # special and padding tokens cover nothing
    if config.mode == "tokens":
        return _windows(offsets, 0, len(offsets), config.size, config.size - config.overlap)
    return _pack_sentences(_sentence_units(text, offsets, config.size), config)


def _sentence_units(text: str, offsets: np.ndarray, size: int) -> list[tuple[int, int, int]]:
    """(start char, end char, tokens) of each sentence; a sentence over ``size`` tokens becomes
    ``size``-token windows (the last one may pack with the sentences that follow)."""
    starts = offsets[:, 0]
    units = []
    for s, e in sentence_spans(text):
        first, last = int(np.searchsorted(starts, s)), int(np.searchsorted(starts, e))
        if last == first:
            continue  # whitespace/punctuation the tokenizer drops entirely
        if last - first <= size:
            units.append((s, e, last - first))
            continue
        for a in range(first, last, size):
            b = min(a + size, last)
            units.append((int(offsets[a, 0]), int(offsets[b - 1, 1]), b - a))
    return units


def _pack_sentences(units: list[tuple[int, int, int]], config: ChunkingConfig) -> list[Span]:
    """Greedy packing of units into chunks of <= size tokens; each new chunk first takes back
    the previous chunk's last units while they total <= overlap tokens and leave room."""
    chunks: list[Span] = []
    current: list[int] = []
    tokens = 0
    for j, (_, _, n) in enumerate(units):
        if current and tokens + n > config.size:
            chunks.append((units[current[0]][0], units[current[-1]][1]))
            carried, kept = [], 0
            for k in reversed(current):
                if kept + units[k][2] > config.overlap or kept + units[k][2] + n > config.size:
                    break
                carried.insert(0, k)
                kept += units[k][2]
            current, tokens = carried, kept
        current.append(j)
        tokens += n
    if current:
        chunks.append((units[current[0]][0], units[current[-1]][1]))
    return chunks


def plain_tokenizer(tokenizer):
    """A copy of an HF fast tokenizer's backend with no padding, truncation or special tokens
    added, for counting tokens and reading offsets of whole texts."""
    backend = tokenizers.Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend


def chunk_texts(texts: Sequence[str], backend, config: ChunkingConfig) -> list[list[Span]]:
    """Chunk spans of each text; ``backend`` from :func:`plain_tokenizer`."""
    encodings = backend.encode_batch(list(texts), add_special_tokens=False)
    return [
        chunk_spans(t, np.array(e.offsets), config) for t, e in zip(texts, encodings, strict=True)
    ]


def check_spans(spans: np.ndarray, text_length: int, where: str) -> None:
    """Raises UserError unless every span is 0 <= start < end <= text_length."""
    spans = np.asarray(spans).reshape(-1, 2)
    bad = (spans[:, 0] < 0) | (spans[:, 1] > text_length) | (spans[:, 0] >= spans[:, 1])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(
            f"{where}: chunk span {spans[i].tolist()} (chunk {i}) lies outside the text of "
            f"{text_length} characters or is empty; fix: spans must satisfy "
            "0 <= start < end <= len(text)"
        )


def token_spans(
    char_spans: np.ndarray, offsets: Sequence[Span], real: np.ndarray, shift: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Token ranges of character spans in one tokenized text.

    A token belongs to a chunk when it starts inside the chunk's characters. A chunk is kept
    only when its last character is covered by the tokens that survived truncation (a chunk
    cut by ``max_length`` is dropped: its teacher vector describes the whole chunk).

    Args:
      char_spans: [n, 2] character spans in the original text.
      offsets: per position, the (start, end) characters of the token (tokenizer offsets).
      real: [seq] 1 for real (non-special, non-padding) tokens.
      shift: characters placed before the text (a prompt) in the tokenized string.
    Returns:
      (spans [n, 2] int32 token ranges [start, end), kept [n] bool).
    """
    char_spans = np.asarray(char_spans, np.int64).reshape(-1, 2) + shift
    positions = np.flatnonzero(np.asarray(real) > 0)
    if len(positions) == 0:
        return np.zeros(char_spans.shape, np.int32), np.zeros(len(char_spans), bool)
    token_offsets = np.asarray(offsets, np.int64).reshape(-1, 2)[positions]
    starts, covered = token_offsets[:, 0], int(token_offsets[:, 1].max())
    first = np.searchsorted(starts, char_spans[:, 0], side="left")
    last = np.searchsorted(starts, char_spans[:, 1], side="left")
    kept = (last > first) & (char_spans[:, 1] <= covered)
    top = len(positions) - 1
    spans = np.stack(
        [positions[np.minimum(first, top)], positions[np.clip(last - 1, 0, top)] + 1], axis=1
    )
    return np.where(kept[:, None], spans, 0).astype(np.int32), kept


def group_texts(
    texts: Sequence[str],
    count_tokens: Callable[[str], int],
    min_tokens: int,
    max_tokens: int,
    seed: int = 0,
) -> list[list[int]]:
    """Consecutive texts grouped into documents whose token counts (``count_tokens``) are drawn
    uniformly from [min_tokens, max_tokens]; returns the text indices of each document. A text
    longer than the budget forms a document on its own; empty texts are left out."""
    if not 1 <= min_tokens <= max_tokens:
        raise UserError(f"document lengths [{min_tokens}, {max_tokens}]: need 1 <= min <= max")
    rng = np.random.default_rng(seed)
    groups: list[list[int]] = []
    current: list[int] = []
    used, target = 0, int(rng.integers(min_tokens, max_tokens + 1))
    for i, text in enumerate(texts):
        if not text.strip():
            continue
        n = count_tokens(as_sentence(text))
        if current and used + n > target:
            groups.append(current)
            current, used, target = [], 0, int(rng.integers(min_tokens, max_tokens + 1))
        current.append(i)
        used += n
    return [*groups, current] if current else groups


def as_sentence(text: str) -> str:
    """``text`` stripped, ending in . ! or ? (a full stop is added where it has none)."""
    text = text.strip()
    return text if text[-1:] in (".", "!", "?") else text + "."


def join_sentences(texts: Sequence[str]) -> str:
    """One document from texts, joined so that :func:`sentence_spans` finds each again."""
    return " ".join(as_sentence(t) for t in texts)


def documents_from_texts(
    texts: Sequence[str],
    count_tokens: Callable[[str], int],
    min_tokens: int,
    max_tokens: int,
    seed: int = 0,
) -> list[str]:
    """Long documents of consecutive texts (see :func:`group_texts`, :func:`join_sentences`)."""
    groups = group_texts(texts, count_tokens, min_tokens, max_tokens, seed)
    return [join_sentences([texts[i] for i in group]) for group in groups]
