"""``jasper-jax teachers``: encode a corpus with teacher models into a teacher dataset.

Example (two machines sharing /data/teachers)::

    jasper-jax teachers --corpus embedded --teacher all-mpnet-base-v2 \
        --teacher all-MiniLM-L6-v2 --output /data/teachers --shard-index 0 --num-shards 2
    # ... and --shard-index 1 on the other; the last slice to finish writes the dataset.

Long documents with chunk vectors (chunk alignment), documents made of consecutive texts::

    jasper-jax teachers --corpus embedded --teacher all-mpnet-base-v2 \
        --teacher all-MiniLM-L6-v2 --output /data/long --documents 128:480 \
        --chunks sentences:64 --max-length 512

Pairs (query, positive, k hard negatives per row; queries with the query prompt, documents
with the document prompt)::

    jasper-jax teachers --pairs embedded --negatives 1 --teacher all-MiniLM-L6-v2 \
        --output /data/pairs
"""

from __future__ import annotations

import argparse

from jasper_jax.commands.train import add_distributed_args, initialize_distributed
from jasper_jax.data.chunk_vectors import load_tokenizer
from jasper_jax.data.chunking import documents_from_texts, plain_tokenizer
from jasper_jax.data.corpus_mix import CorpusMix
from jasper_jax.data.pair_dataset import build_pair_dataset
from jasper_jax.data.pairs import read_pairs
from jasper_jax.data.teacher_assets import resolve_model_folder
from jasper_jax.data.teacher_dataset import BuildResult, build_teacher_dataset
from jasper_jax.data.teacher_plan import COMPUTE_DTYPES
from jasper_jax.data.teacher_spec import parse_teacher_spec
from jasper_jax.errors import UserError
from jasper_jax.sharding import parse_mesh_shape


def add_args(parser: argparse.ArgumentParser) -> None:
    """Add the ``teachers`` sub-command's flags to ``parser``."""
    _add_corpus_args(parser)
    parser.add_argument(
        "--teacher",
        action="append",
        required=True,
        help="teacher folder or known name (all-mpnet-base-v2, all-MiniLM-L6-v2); repeat for "
        "several, concatenated in the given order. Options after the name: :head=DIM (one of "
        "the folder's 2_Dense_DIM heads, e.g. stella's 8192), :prompt_name=NAME (a prompt of "
        "its config_sentence_transformers.json), :prompt=TEXT (last: the rest is the text); "
        "for --pairs :prompt... is the query prompt, :document_prompt_name=NAME and "
        ":document_prompt=TEXT (also last) the document prompt",
    )
    parser.add_argument(
        "--teacher-prompt",
        default=None,
        help="prefix added to every text (--pairs: to every query), for teachers without a "
        "prompt option of their own",
    )
    parser.add_argument(
        "--teacher-document-prompt",
        default=None,
        help="--pairs: prefix added to every document (positive, negative), for teachers "
        "without a document prompt option of their own (default: none)",
    )
    parser.add_argument("--output", required=True, help="output folder of the teacher dataset")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--shard-index", type=int, default=0, help="slice this run encodes")
    parser.add_argument("--num-shards", type=int, default=1, help="number of corpus slices")
    _add_run_args(parser)
    parser.add_argument(
        "--documents",
        default=None,
        help="MIN:MAX: join consecutive corpus texts into documents of MIN-MAX tokens first",
    )


def _add_run_args(parser: argparse.ArgumentParser) -> None:
    """The flags that say how teachers run: backend, batch, blocks, lengths, chunks, mesh."""
    parser.add_argument("--batch-size", type=int, default=64, help="teacher encode batch size")
    parser.add_argument(
        "--block-size",
        type=int,
        default=4096,
        help="texts per resumable block of work (a killed run redoes at most one per process)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a different dataset")
    parser.add_argument(
        "--backend",
        choices=("auto", "jax", "torch"),
        default="auto",
        help="run teachers with our Flax port (jax; BERT/Qwen2) or sentence-transformers (torch)",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens each text is cut to (default: each teacher's max_seq_length; long documents "
        "want the position limit, e.g. 512)",
    )
    parser.add_argument(
        "--chunks",
        default=None,
        help="chunk mode: also store each text's chunks and their vectors, cut by "
        "MODE:SIZE[:OVERLAP] (sentences:64, sentences:64:16, tokens:128:32) or random:MIN:MAX "
        "(dewey: per document a drawn size, overlap and mode), sizes in --chunk-tokenizer tokens",
    )
    parser.add_argument(
        "--chunk-tokenizer",
        default=None,
        help="model folder whose tokenizer counts chunk sizes (default: the first teacher's; "
        "use the student's)",
    )
    parser.add_argument(
        "--mesh-shape",
        default=None,
        help="data,fsdp,tensor mesh our port runs the teachers on, weights sharded over every "
        "device, e.g. 1,8,1 (default: data parallel over all devices)",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=COMPUTE_DTYPES,
        default="auto",
        help="teacher compute dtype; auto: bfloat16 on TPU/GPU, float32 on CPU",
    )
    add_distributed_args(parser)


def _add_corpus_args(parser: argparse.ArgumentParser) -> None:
    """The flags that choose the texts: corpora, their mix, --limit, the augmentation."""
    parser.add_argument(
        "--corpus",
        action="append",
        metavar="SPEC[@WEIGHT]",
        help="'embedded' (or embedded:validation), a .txt/.jsonl file, hf:PATH[:SPLIT][:FIELD] "
        "(a local Hugging Face dataset: save_to_disk folder, parquet/arrow/jsonl files) or "
        "tfds:NAME[:SPLIT][:FEATURE]; repeat to concatenate corpora, or give every one a "
        "@WEIGHT to mix them at those shares (texts never repeated)",
    )
    parser.add_argument(
        "--pairs",
        default=None,
        metavar="SPEC",
        help="instead of --corpus: rows of (query, positive, hard negatives) from "
        "'embedded[:SPLIT]', a .jsonl(.gz) file or hf:PATH[:SPLIT]; builds a pair dataset (a "
        "record per row)",
    )
    parser.add_argument(
        "--negatives",
        type=int,
        default=None,
        metavar="K",
        help="--pairs: hard negatives kept per row (default: all, every row with as many; "
        "embedded: 1)",
    )
    parser.add_argument(
        "--split-sentences",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="augmentation: replace this share (0-1; the paper: 0.3) of the corpus texts, drawn "
        "at random, by pieces of 1-10 of their sentences",
    )
    parser.add_argument(
        "--corpus-seed", type=int, default=0, help="seed of the corpus mix and --split-sentences"
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only the first N texts (of a weighted mix: N drawn texts; counted before "
        "--split-sentences; --pairs: N rows)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the sub-command; returns the exit code (``UserError`` propagates to the CLI)."""
    _check_source(args)
    mesh_shape = args.mesh_shape and parse_mesh_shape(args.mesh_shape)
    initialize_distributed(args)
    common = dict(
        prompt=args.teacher_prompt,
        dtype=args.dtype,
        shard_index=args.shard_index,
        num_shards=args.num_shards,
        batch_size=args.batch_size,
        chunk_size=args.block_size,
        overwrite=args.overwrite,
        backend=args.backend,
        max_length=args.max_length,
        mesh_shape=mesh_shape,
        compute_dtype=args.compute_dtype,
    )
    if args.pairs is not None:
        pairs = read_pairs(args.pairs, negatives=args.negatives, limit=args.limit)
        result = build_pair_dataset(
            pairs, args.teacher, args.output, document_prompt=args.teacher_document_prompt, **common
        )
    else:
        corpus = CorpusMix.parse(args.corpus, args.split_sentences, args.corpus_seed)
        if args.documents:
            corpus = _documents(args, corpus)
        result = build_teacher_dataset(
            corpus,
            args.teacher,
            args.output,
            limit=None if args.documents else args.limit,  # _documents applied it
            chunking=args.chunks,
            chunk_tokenizer=args.chunk_tokenizer,
            **common,
        )
    _report(args, result, "pair rows" if args.pairs is not None else "texts")
    return 0


def _check_source(args: argparse.Namespace) -> None:
    """One source of texts: --corpus (with its single-text flags) or --pairs (with its own)."""
    pairs = args.pairs is not None
    if not pairs and not args.corpus:
        raise UserError(
            "no texts given; fix: pass --corpus SPEC (single texts) or --pairs SPEC (rows of "
            "query, positive, hard negatives)"
        )
    single = {
        "--corpus": args.corpus,
        "--documents": args.documents,
        "--chunks": args.chunks,
        "--chunk-tokenizer": args.chunk_tokenizer,
        "--split-sentences": args.split_sentences or None,
    }
    pair = {
        "--negatives": args.negatives,
        "--teacher-document-prompt": args.teacher_document_prompt,
    }
    given = [flag for flag, value in (single if pairs else pair).items() if value is not None]
    if given and pairs:
        raise UserError(
            f"--pairs cannot be used with {', '.join(given)} (single-text flags); fix: drop "
            f"{' and '.join(given)}, or --pairs"
        )
    if given:
        raise UserError(
            f"{', '.join(given)} only apply to --pairs builds; fix: drop them, or build from "
            "--pairs SPEC instead of --corpus"
        )


def _report(args: argparse.Namespace, result: BuildResult, unit: str) -> None:
    """What the build did, on stdout: ready, waiting for slices, or combined elsewhere."""
    if result.dataset_dir is None and not result.pending_slices:
        print(
            f"slice {args.shard_index} of {args.num_shards} done; all slices are done and "
            "another run is combining them into the dataset"
        )
    elif result.dataset_dir is None:
        print(
            f"slice {args.shard_index} of {args.num_shards} done ({result.rows} {unit} in the "
            f"corpus); waiting for slices {result.pending_slices}"
        )
    else:
        print(f"teacher dataset ready: {result.dataset_dir} ({result.rows} {unit})")
    if result.skipped_empty:
        print(f"skipped {result.skipped_empty} empty texts")
    for name, count in result.truncated.items():
        if count:
            print(f"{count} texts were cut at teacher {name}'s max length (see --max-length)")


def _documents(args: argparse.Namespace, corpus: CorpusMix) -> list[str]:
    """The corpus's texts joined into documents of --documents MIN:MAX tokens (counted with the
    chunk tokenizer, else the first teacher's), the first --limit of them, then augmented."""
    try:
        low, high = (int(x) for x in args.documents.split(":"))
    except ValueError as e:
        raise UserError(
            f"--documents {args.documents!r}: write MIN:MAX tokens, e.g. 128:480"
        ) from e
    first = parse_teacher_spec(args.teacher[0]).source
    folder = args.chunk_tokenizer or resolve_model_folder(first, what="teacher")
    flag = "--chunk-tokenizer" if args.chunk_tokenizer else "--teacher"
    backend = plain_tokenizer(load_tokenizer(folder, flag))
    count = lambda text: len(backend.encode(text, add_special_tokens=False).ids)
    # --limit counts documents here
    texts, _ = corpus.read(args.limit * (low + high) // 2 if args.limit else None)
    documents = documents_from_texts(texts, count, low, high)
    return corpus.augment(documents[: args.limit] if args.limit else documents)
