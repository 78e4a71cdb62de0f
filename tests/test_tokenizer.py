"""`jasper_jax.tokenizer`: the cached Rust tokenizer gives the token ids transformers gives, for
every tokenizer family we train or distil from, and a warm `jasper-jax encode` never imports
transformers or torch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from jasper_jax.data.teacher_assets import teacher_folder
from jasper_jax.tokenizer import cache_file, load_tokenizer
from tests.train_fixtures import make_tiny_student

TEXTS = [
    "Hello World",
    "Ünïcödé café naïve façade",
    "",
    " ".join(f"word{i} w{i}" for i in range(200)),  # cut at max_length
    "[SEP] inside [CLS] <|endoftext|> and </s>",
    "数学 and 漢字, emoji 🙂 and tabs\tand\nnewlines",
    "  leading and trailing spaces  ",
]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JASPER_JAX_CACHE", str(tmp_path / "cache"))


def _byte_level_bpe() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(
        TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 50, trainer
    )
    return tok


def _bert_edited(folder: Path) -> Path:
    """MiniLM's files with a tokenizer_config that transformers applies on top of tokenizer.json
    (no lowercasing, cut on the left): the raw file alone gives other ids."""
    shutil.copytree(teacher_folder("all-MiniLM-L6-v2"), folder, ignore=_only_tokenizer_files)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(do_lower_case=False, truncation_side="left")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _only_tokenizer_files(directory: str, names: list[str]) -> list[str]:
    return [n for n in names if not n.endswith((".json", ".txt"))]


def _saved(folder: Path, cls: str, **special) -> Path:
    import transformers

    getattr(transformers, cls)(tokenizer_object=_byte_level_bpe(), **special).save_pretrained(
        folder
    )
    return folder


FOLDERS = {
    "bert": lambda tmp: teacher_folder("all-MiniLM-L6-v2"),
    "bert-edited-config": lambda tmp: _bert_edited(tmp / "bert"),
    "qwen2-byte-bpe": lambda tmp: _saved(
        tmp / "qwen2", "Qwen2Tokenizer", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    ),
    "llama-bos-eos": lambda tmp: _saved(
        tmp / "llama",
        "LlamaTokenizer",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
        add_bos_token=True,
        add_eos_token=True,
    ),
}


def _transformers_ids(folder: Path, texts: list[str], max_length: int):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(folder))
    enc = hf(texts, truncation=True, max_length=max_length, padding=False)
    return [list(x) for x in enc["input_ids"]], sum(bool(e.overflowing) for e in enc.encodings)


@pytest.mark.parametrize("family", sorted(FOLDERS))
@pytest.mark.parametrize("prompt", [None, "query: "])
def test_cached_tokenizer_equals_transformers(tmp_path, family, prompt):
    folder = FOLDERS[family](tmp_path)
    first = load_tokenizer(folder)
    assert first._hf is not None and cache_file(folder).is_file()
    again = load_tokenizer(folder)
    assert again._hf is None, "the second load must come from the cache, not transformers"

    texts = [(prompt or "") + t for t in TEXTS]
    for max_length in (8, 64):
        want_ids, want_cut = _transformers_ids(folder, texts, max_length)
        for tok in (first, again):
            got = tok.tokenize(TEXTS, max_length, prompt)
            assert got.ids == want_ids
            assert got.truncated == want_cut
        assert want_cut >= 1  # the long text is cut at both lengths
    assert again.pad_token_id == first.pad_token_id is not None


def test_edited_config_is_not_the_raw_file(tmp_path):
    """The cache holds what transformers built, not tokenizer.json as written."""
    folder = _bert_edited(tmp_path / "bert")
    raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    raw.no_padding()
    raw.enable_truncation(8)
    raw_ids = [e.ids for e in raw.encode_batch(TEXTS)]
    assert raw_ids != _transformers_ids(folder, TEXTS, 8)[0]
    assert load_tokenizer(folder).tokenize(TEXTS, 8).ids == _transformers_ids(folder, TEXTS, 8)[0]


def test_changed_files_or_corrupt_cache_rebuild(tmp_path, caplog):
    folder = _bert_edited(tmp_path / "bert")
    load_tokenizer(folder)
    where = cache_file(folder)
    where.write_text("{not json", encoding="utf-8")
    assert load_tokenizer(folder)._hf is not None  # rebuilt through transformers
    assert "ignoring unreadable tokenizer cache" in caplog.text
    assert load_tokenizer(folder)._hf is None  # and written again

    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["do_lower_case"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert cache_file(folder) != where
    tok = load_tokenizer(folder)
    assert tok._hf is not None
    assert tok.tokenize(TEXTS, 8).ids == _transformers_ids(folder, TEXTS, 8)[0]


def test_unwritable_cache_still_tokenizes(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("JASPER_JAX_CACHE", str(blocker))  # a file: no folder can be made under it
    folder = teacher_folder("all-MiniLM-L6-v2")
    assert (
        load_tokenizer(folder).tokenize(["a b"], 8).ids == _transformers_ids(folder, ["a b"], 8)[0]
    )


def test_warm_encode_imports_neither_transformers_nor_torch(tmp_path):
    folder = make_tiny_student(tmp_path / "student", layers=1)
    (tmp_path / "in.txt").write_text("one text\nanother text\n", encoding="utf-8")
    env = {**os.environ, "JASPER_JAX_CACHE": str(tmp_path / "cache")}
    code = (
        "import sys\n"
        "from jasper_jax.cli import main\n"
        f"rc = main(['encode', '--model', {str(folder)!r}, '--input', {str(tmp_path / 'in.txt')!r},"
        f" '--output', sys.argv[1]])\n"
        "print('RC', rc, 'LOADED', sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'transformers'}))\n"
    )
    outs = []
    for name in ("cold.npy", "warm.npy"):
        done = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / name)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert "RC 0" in done.stdout, done.stdout + done.stderr
        outs.append(done.stdout)
    assert "'transformers'" in outs[0]  # the cold run builds the tokenizer through it
    assert "LOADED []" in outs[1], outs[1]

    import numpy as np

    np.testing.assert_array_equal(np.load(tmp_path / "cold.npy"), np.load(tmp_path / "warm.npy"))
