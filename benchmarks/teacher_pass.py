"""The demo's teacher pass: its train texts through both bundled teachers into a TFDS dataset.

The same texts the demo encodes (`data.train_texts` spread over the embedded corpus's train
split), the same two teachers, built with `build_teacher_dataset` twice: with `backend="auto"`
(what the demo runs: our port, or sentence-transformers where it times faster) and with
`backend="torch"` (sentence-transformers for both, the reference). Whole build each: loading,
encoding, writing. Nothing is cached between the two (the teacher-encoding cache is pointed at
an empty folder).

    python -m benchmarks.teacher_pass [--texts 12000] [--backends auto,torch]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks.common import report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=12000)
    parser.add_argument(
        "--backends",
        default="auto,torch",
        help="comma-separated, the reference (sentence-transformers: torch) last; add jax for "
        "our port alone",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["JASPER_JAX_CACHE"] = str(Path(tmp, "cache"))
        from jasper_jax.config import load_settings
        from jasper_jax.data.corpus import load_corpus
        from jasper_jax.data.teacher_dataset import build_teacher_dataset
        from jasper_jax.demo.main import spread_sample

        s = load_settings("configs/embedded_default.py:1")
        texts = spread_sample(load_corpus(s.data.corpus, split="train"), args.texts)
        rows = []
        for backend in args.backends.split(","):
            start = time.perf_counter()
            build_teacher_dataset(
                texts, list(s.teachers), Path(tmp, backend), backend=backend, progress=False
            )
            rows.append([backend, time.perf_counter() - start])
            print(rows[-1], flush=True)
    ref = rows[-1][1]
    report(
        f"Teacher pass of the demo: {len(texts)} train texts x {list(s.teachers)}",
        ["backend", "seconds", "speed-up vs sentence-transformers"],
        [[name, secs, ref / secs] for name, secs in rows],
        note="whole build each (load, encode, write the dataset); one run each",
    )


if __name__ == "__main__":
    main()
