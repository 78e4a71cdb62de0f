"""Varied real English texts for encode tests, built offline from the standard library's docs."""

from __future__ import annotations

import re

_MODULES = ("argparse", "json", "logging", "collections", "email", "http", "unittest", "decimal")


def varied_texts(n: int = 300) -> list[str]:
    """`n` texts: sentences from stdlib docstrings plus the awkward cases users send.

    Includes an empty line, single words, a text far over any max length, and non-ASCII text.
    """
    import importlib

    sentences: list[str] = []
    for name in _MODULES:
        doc = importlib.import_module(name).__doc__ or ""
        for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
            if 3 <= len(s) <= 400 and s not in sentences:
                sentences.append(s)
    special = [
        "",
        "word",
        "Zürich",
        "naïve café crème brûlée, déjà vu",
        "Привет, как дела? Это проверка кодировки.",
        "日本語の文章も埋め込みできますか。",
        "emoji 🙂🚀 and symbols ∑ ∫ ≤ ≥",
        "   leading and trailing spaces   ",
        " ".join(["This sentence is repeated to exceed the maximum length."] * 80),
    ]
    texts = special + sentences
    k = 0
    while len(texts) < n:  # distinct pairs of sentences: longer, still natural text
        a, b = k % len(sentences), (k // len(sentences) + 1 + k) % len(sentences)
        if a != b:
            texts.append(sentences[a] + " " + sentences[b])
        k += 1
    return texts[:n]
