"""Which backend runs a teacher on a CPU-only machine: our Flax port or sentence-transformers,
timed once on a sample of the corpus and remembered per teacher and machine, so resumed and
repeated builds encode with the same backend and give the same vectors.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import pathlib
import platform
import time
from collections.abc import Callable, Sequence

import jax

from jasper_jax.data.teacher_assets import cache_root

log = logging.getLogger(__name__)


# Sample texts below which `auto` does not time the two backends (timing noise, and small jobs
# should not pay for a second model load).
MIN_SAMPLE = 64


# Texts from which `auto` times the backends; smaller builds take jax without timing.
TIMING_FROM = 4096


def timing_sample(texts: Sequence[str], size: int = 128) -> list[str]:
    """`size` texts spread over a corpus of at least TIMING_FROM texts (else none): enough to
    time a backend, about 1% of a big build's work per backend."""
    if len(texts) < TIMING_FROM:
        return []
    return list(texts[:: len(texts) // size][:size])


def can_time_both(sample: Sequence[str]) -> bool:
    """Timing is worth it on a CPU-only machine (elsewhere jax runs on the accelerator and torch
    here would not) where sentence-transformers is installed, with enough sample texts."""
    return (
        len(sample) >= MIN_SAMPLE
        and jax.default_backend() == "cpu"
        and importlib.util.find_spec("sentence_transformers") is not None
    )


def choices_file() -> pathlib.Path:
    return cache_root() / "teacher-backends.json"


def _machine_key(key: str) -> str:
    return f"{key}:{platform.machine()}:{os.cpu_count()}:{jax.default_backend()}"


def _known_choices() -> dict:
    try:
        known = json.loads(choices_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def recalled_backend(key: str) -> str | None:
    """The backend `auto` timed faster for this teacher (fingerprints `key`) on this machine
    before, or None."""
    choice = _known_choices().get(_machine_key(key))
    return choice if choice in ("jax", "torch") else None


def remembered_backend(key: str, name: str, measure: Callable[[], str]) -> str:
    """The backend `auto` runs a teacher with on this machine: timed once (`measure`), then read
    back from ``cache_root()/teacher-backends.json`` (by the teacher's fingerprints and the
    machine), so every later build, a resumed one included, encodes with the same backend and
    gives the same vectors. Delete the file to time again."""
    path, known, key = choices_file(), _known_choices(), _machine_key(key)
    if known.get(key) in ("jax", "torch"):
        log.info("teacher %s: %s, as timed before on this machine (%s)", name, known[key], path)
        return known[key]
    known[key] = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(known, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(partial, path)
    except OSError as e:  # a read-only cache costs a timing per build, nothing else
        log.warning("could not remember the backend choice in %s: %s", path, e)
    return known[key]


def faster(name: str, sides: dict[str, tuple], sample: list[str], batch_size: int) -> str:
    """The backend ("jax" or "torch") that encodes `sample` faster, timed after a warm-up pass
    (which also compiles the jax programs the sample's lengths need, kept for the real run)."""
    rates = {}
    for backend, (encode, _, _) in sides.items():
        encode(sample if backend == "jax" else sample[:batch_size])
        start = time.perf_counter()
        encode(sample)
        rates[backend] = len(sample) / (time.perf_counter() - start)
    best = max(rates, key=rates.__getitem__)
    log.info(
        "teacher %s: %s on %d sample texts; using %s",
        name,
        ", ".join(f"{b} {r:.0f} texts/s" for b, r in rates.items()),
        len(sample),
        best,
    )
    return best
