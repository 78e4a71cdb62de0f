"""Regenerate the embedded English corpus from Debian's WordNet 3.0 and fortunes packages.

Maintainers only (the records and the split: ``jasper_jax.data.build_corpus``)::

    apt-get install -y wordnet-base fortunes
    python -m jasper_jax.commands.build_corpus        # writes jasper_jax/assets/corpus/
"""

from __future__ import annotations

import argparse
import json
import pathlib

from jasper_jax.data.build_corpus import build_records, write_corpus

WORDNET_DIR = pathlib.Path("/usr/share/wordnet")
FORTUNES_DIR = pathlib.Path("/usr/share/games/fortunes")
OUTPUT_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets" / "corpus"


def main() -> None:
    """Parse the folders (defaults: Debian's) and write the corpus and its manifest."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet-dir", type=pathlib.Path, default=WORDNET_DIR)
    parser.add_argument("--fortunes-dir", type=pathlib.Path, default=FORTUNES_DIR)
    parser.add_argument("--output-dir", type=pathlib.Path, default=OUTPUT_DIR)
    args = parser.parse_args()
    manifest = write_corpus(build_records(args.wordnet_dir, args.fortunes_dir), args.output_dir)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()
