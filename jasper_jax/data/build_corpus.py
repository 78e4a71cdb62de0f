"""The embedded English corpus from Debian's WordNet 3.0 and fortunes packages: records, split.

The derived corpus is committed under ``jasper_jax/assets/corpus/`` so that users need no apt;
only maintainers run this::

    apt-get install -y wordnet-base fortunes
    python -m jasper_jax.commands.build_corpus        # writes jasper_jax/assets/corpus/

Records (one JSON object per line, gzip): ``{"text", "kind", "synset"}`` with kind one of
``gloss`` (a WordNet definition), ``example`` (a quoted WordNet usage example) or ``fortune``;
``synset`` is the WordNet id ``"<offset>-<pos>"`` (pos in n, v, a, r) or ``null`` for fortunes.

Texts are deduplicated after whitespace normalisation (first occurrence kept; WordNet before
fortunes, files in a fixed order). The split is fixed by a stable hash: of the synset id for
WordNet records, so all texts of one synset fall on the same side (a later evaluation retrieves
a held-out synset's definition from its example), and of the text for fortunes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import pathlib
import re
from collections.abc import Iterator

WORDNET_POS = (("noun", "n"), ("verb", "v"), ("adj", "a"), ("adv", "r"))
# Pictures, non-English text, and jokes built on stereotypes make poor training sentences.
SKIPPED_FORTUNE_FILES = frozenset({"ascii-art", "translate-me", "ethnic", "men-women"})
MAX_FORTUNE_CHARS = 300
VALIDATION_PER_MILLE = 50  # 5% of synsets / fortunes go to validation
SPLITS = ("train", "validation")

_QUOTED = re.compile(r'"([^"]*)"')
_WHITESPACE = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return _WHITESPACE.sub(" ", text).strip()


def split_of(key: str) -> str:
    """``"train"`` or ``"validation"`` from a stable (process- and platform-independent) hash."""
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 1000
    return "validation" if bucket < VALIDATION_PER_MILLE else "train"


def _split_outside_quotes(gloss: str) -> list[str]:
    """Split on ``;`` except inside double quotes (examples may contain semicolons)."""
    parts, current, quoted = [], [], False
    for ch in gloss:
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return [normalise(part) for part in parts if part.strip()]


def parse_wordnet_line(line: str, pos: str) -> list[dict]:
    """Records of one ``data.<pos>`` line: its definition and its quoted examples.

    A gloss reads ``definition; more definition; "example one"; "example two"- Author``. Parts
    that open with a quote are examples (an attribution after the closing quote is dropped);
    the other parts, rejoined with ``; ``, are the definition.
    """
    if line.startswith("  ") or "|" not in line:  # licence header lines start with two spaces
        return []
    synset = f"{line.split(' ', 1)[0]}-{pos}"
    definition_parts, examples = [], []
    for part in _split_outside_quotes(line.split("|", 1)[1]):
        quoted = _QUOTED.match(part)
        if quoted:
            examples.append(normalise(quoted.group(1)))
        else:
            definition_parts.append(part)
    definition = "; ".join(definition_parts)
    records = [{"text": definition, "kind": "gloss", "synset": synset}] if definition else []
    records += [{"text": ex, "kind": "example", "synset": synset} for ex in examples if ex]
    return records


def wordnet_records(wordnet_dir: pathlib.Path) -> Iterator[dict]:
    """Records of the four ``data.<pos>`` files of a WordNet 3.0 folder, in a fixed order."""
    for name, pos in WORDNET_POS:
        with open(wordnet_dir / f"data.{name}", encoding="utf-8") as handle:
            for line in handle:
                yield from parse_wordnet_line(line, pos)


def clean_fortune(raw: str) -> str | None:
    """One cleaned paragraph, or None when the fortune is not a short single paragraph of prose.

    Attribution lines (``-- Author``) are dropped; indentation-heavy or symbol-heavy fortunes
    (verse layouts, dialogue scripts, ASCII drawings) are rejected by the letter ratio test.
    """
    lines = [line for line in raw.strip("\n").split("\n") if not line.strip().startswith("--")]
    body = "\n".join(lines).strip()
    if not body or re.search(r"\n\s*\n", body):
        return None
    text = normalise(body)
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    if len(text) > MAX_FORTUNE_CHARS or len(text) < 10 or letters < 0.8 * len(text):
        return None
    return text


def fortune_records(fortunes_dir: pathlib.Path) -> Iterator[dict]:
    """Cleaned fortunes of the ``*.u8`` files of a fortunes folder, files in name order."""
    for path in sorted(fortunes_dir.glob("*.u8")):
        if path.stem in SKIPPED_FORTUNE_FILES:
            continue
        for raw in path.read_text(encoding="utf-8").split("\n%\n"):
            text = clean_fortune(raw)
            if text:
                yield {"text": text, "kind": "fortune", "synset": None}


def build_records(wordnet_dir: pathlib.Path, fortunes_dir: pathlib.Path) -> dict[str, list]:
    """Deduplicated records grouped by split, in source order."""
    seen: set[str] = set()
    by_split: dict[str, list] = {split: [] for split in SPLITS}
    sources = (wordnet_records(wordnet_dir), fortune_records(fortunes_dir))
    for records in sources:
        for record in records:
            if record["text"] in seen:
                continue
            seen.add(record["text"])
            by_split[split_of(record["synset"] or record["text"])].append(record)
    return by_split


def write_corpus(by_split: dict[str, list], output_dir: pathlib.Path) -> dict:
    """Write ``<split>.jsonl.gz`` files and ``MANIFEST.json``; returns the manifest."""
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict = {"sources": ["Debian wordnet-base (WordNet 3.0)", "Debian fortunes"]}
    for split, records in by_split.items():
        path = output_dir / f"{split}.jsonl.gz"
        # mtime=0 keeps the gzip bytes reproducible run to run.
        with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:
            for record in records:
                out.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        kinds: dict[str, int] = {}
        for record in records:
            kinds[record["kind"]] = kinds.get(record["kind"], 0) + 1
        manifest[split] = {
            "file": path.name,
            "records": len(records),
            "kinds": kinds,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    (output_dir / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
