"""Model-folder tokenizers that load without importing transformers (and, through it, torch).

transformers builds a fast tokenizer from a folder by rules of its own (flags in
`tokenizer_config.json` that rewrite the normaliser or the post-processor, added tokens, the
truncation side), and importing it imports torch: about 2 s of every short command's start. So
the first load of a folder goes through `AutoTokenizer`, and the Rust tokenizer it built is kept
in the user cache under a fingerprint of the folder's tokenizer files and of the installed
transformers and tokenizers versions; later processes rebuild the identical tokenizer with
`tokenizers` alone. Slow (Python-only) tokenizers are used through transformers every time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers

from jasper_jax import paths
from jasper_jax.errors import UserError

# Files a tokenizer is built from (the tokenizer part of a folder's fingerprint).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "merges.txt",
    "vocab.json",
)
# AutoTokenizer also reads these: added tokens, and the model type when the tokenizer config
# names no class.
_ALSO_READ = ("added_tokens.json", "config.json")
CACHE_FORMAT = 1
log = logging.getLogger(__name__)


@dataclasses.dataclass
class Tokenized:
    """ids: one token-id list per text (special tokens included); truncated: texts cut short."""

    ids: list[list[int]]
    truncated: int


class Tokenizer:
    """A folder's tokenizer: token ids as `AutoTokenizer(texts, truncation=True, ...)` gives them.

    Args:
      backend: the Rust tokenizer transformers built (None for a slow tokenizer).
      pad_token_id: the id padding uses (None: the tokenizer has no pad token).
      truncation_side: "right" or "left", the side transformers cuts.
      split_special_tokens: special-token strings in a text are split like plain text.
      folder: the model folder, for `hf` (None: `hf` must be given).
      hf: the transformers tokenizer, when already loaded.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer | None,
        pad_token_id: int | None,
        truncation_side: str = "right",
        split_special_tokens: bool = False,
        folder: Path | None = None,
        hf: Any = None,
    ):
        self.backend = backend
        self.pad_token_id = pad_token_id
        self.truncation_side = truncation_side
        self.split_special_tokens = split_special_tokens
        self.folder = folder
        self._hf = hf

    @property
    def hf(self) -> Any:
        """The transformers tokenizer (imports transformers on first use: offsets, chunking)."""
        if self._hf is None:
            self._hf = _auto_tokenizer(self.folder)
        return self._hf

    def tokenize(
        self, texts: Sequence[str], max_length: int, prompt: str | None = None
    ) -> Tokenized:
        """Like sentence-transformers: the prompt is prepended to each text, and truncation to
        `max_length` tokens keeps the special tokens. A fast tokenizer reports cut texts exactly;
        a slow one counts the texts that fill `max_length`."""
        if prompt:
            texts = [prompt + t for t in texts]
        if self.backend is None:
            enc = self.hf(list(texts), truncation=True, max_length=max_length, padding=False)
            ids = [list(x) for x in enc["input_ids"]]
            return Tokenized(ids, sum(len(x) >= max_length for x in ids))
        # transformers sets these before every call; the backend keeps them until changed
        self.backend.no_padding()
        self.backend.enable_truncation(max_length, direction=self.truncation_side)
        self.backend.encode_special_tokens = self.split_special_tokens
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=True)
        return Tokenized([e.ids for e in encodings], sum(bool(e.overflowing) for e in encodings))


def from_hf(hf: Any, folder: Path | None = None) -> Tokenizer:
    """Wraps a loaded transformers tokenizer (its backend copied, so its settings stay)."""
    backend = None
    if getattr(hf, "is_fast", False):
        backend = tokenizers.Tokenizer.from_str(hf.backend_tokenizer.to_str())
    split = bool(getattr(hf, "split_special_tokens", False))
    return Tokenizer(backend, hf.pad_token_id, hf.truncation_side, split, folder, hf)


def load_tokenizer(folder: str | Path, cache: bool = True) -> Tokenizer:
    """The tokenizer of a local model folder, from the user cache when an earlier process built
    it from the same files with the same transformers and tokenizers versions.

    Raises:
      UserError: the folder has no loadable tokenizer (one line naming it and the fix).
    """
    folder = Path(folder)
    where = cache_file(folder) if cache else None
    if where is not None and where.is_file():
        try:
            entry = json.loads(where.read_text(encoding="utf-8"))
            if entry.get("format") == CACHE_FORMAT:
                backend = tokenizers.Tokenizer.from_str(entry["tokenizer"])
                settings = (entry["pad_token_id"], entry["truncation_side"], entry["split"])
                return Tokenizer(backend, *settings, folder=folder)
        except Exception as err:  # tokenizers raises a bare Exception for a bad file
            log.warning("ignoring unreadable tokenizer cache %s (%s); rebuilding it", where, err)
    tokenizer = from_hf(_auto_tokenizer(folder), folder)
    if where is not None and tokenizer.backend is not None:
        entry = {
            "format": CACHE_FORMAT,
            "folder": str(folder),
            "tokenizer": tokenizer.backend.to_str(),
            "pad_token_id": tokenizer.pad_token_id,
            "truncation_side": tokenizer.truncation_side,
            "split": tokenizer.split_special_tokens,
        }
        try:
            where.parent.mkdir(parents=True, exist_ok=True)
            paths.write_json_atomic(where, entry)
        except OSError as err:  # a read-only or full cache: this run goes on without it
            log.warning("cannot write the tokenizer cache %s (%s)", where, err)
    return tokenizer


def cache_file(folder: Path) -> Path | None:
    """Where the folder's built tokenizer is kept: `<user cache>/tokenizers/<fingerprint>.json`
    (None for a remote folder, or one with no tokenizer files)."""
    if paths.is_remote(folder) or not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for package in ("transformers", "tokenizers"):
        digest.update(f"{package}=={importlib.metadata.version(package)}\0".encode())
    found = False
    for name in TOKENIZER_FILES + _ALSO_READ:
        path = folder / name
        if path.is_file():
            found |= name in TOKENIZER_FILES
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    if not found:
        return None
    return paths.user_cache_root() / "tokenizers" / f"{digest.hexdigest()[:32]}.json"


def auto_tokenizer(folder: str | Path, fix: str) -> Any:
    """`AutoTokenizer` of a local folder (imports transformers, and torch through it). A folder
    that does not load is one UserError line naming it and ending in `fix`; a disk error
    (an OSError with an errno) propagates for the CLI to name the file."""
    from transformers import AutoTokenizer  # only when the cache cannot serve

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ...
        if isinstance(err, OSError) and err.errno is not None:
            raise
        first = next((line for line in str(err).splitlines() if line.strip()), "")
        raise UserError(
            f"cannot load a tokenizer from {str(folder)!r} ({type(err).__name__}: "
            f"{first[:300]}); fix: {fix}"
        ) from err


def _auto_tokenizer(folder: Path | None) -> Any:
    if folder is None:
        raise ValueError("this Tokenizer was built without a folder or a transformers tokenizer")
    return auto_tokenizer(
        folder, "pass a complete model folder (with tokenizer.json or vocab files)"
    )
