"""`jasper-jax eval`: metrics against independent NumPy references, the WordNet task, the whole
run on a tiny workdir, bad input, and the mteb adapter's encode behaviour (without mteb)."""

import enum
import json
from pathlib import Path

import numpy as np
import pytest

from jasper_jax.cli import main
from jasper_jax.encode import TextEncoder
from jasper_jax.evaluation import retrieval, robustness
from jasper_jax.evaluation.mteb_adapter import MtebEncoder
from jasper_jax.evaluation.retrieval import paired_bootstrap
from jasper_jax.export import export_workdir
from jasper_jax.precision import quantize
from jasper_jax.run_folder import load_workdir_model
from tests.test_export import workdir  # noqa: F401
from tests.train_fixtures import tiny_setup  # noqa: F401


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ranks_and_metrics_match_a_sorting_reference():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((50, 40))
    relevant = rng.integers(0, 40, 50)
    order = np.argsort(-scores, axis=1)
    expected = np.array([list(row).index(r) + 1 for row, r in zip(order, relevant, strict=True)])
    ranks = retrieval.rank_of_relevant(scores, relevant)
    np.testing.assert_array_equal(ranks, expected)
    m = retrieval.retrieval_metrics(np.array([1, 2, 11, 3]))
    assert m["recall_at_1"] == 0.25
    assert m["ndcg_at_10"] == pytest.approx((1 + 1 / np.log2(3) + 0 + 0.5) / 4)
    # A constant scorer gets no credit: ties rank the relevant document last.
    assert retrieval.rank_of_relevant(np.zeros((2, 5)), np.array([0, 3])).tolist() == [5, 5]


def test_binary_quantisation_ranks_by_hamming_distance():
    rng = np.random.default_rng(1)
    q, d = rng.standard_normal((30, 70)), rng.standard_normal((90, 70))  # 70: not a multiple of 8
    packed = retrieval.binarize(q)
    assert packed.shape == (30, 9) and packed.dtype == np.uint8
    np.testing.assert_array_equal(np.unpackbits(packed, axis=1)[:, :70], (q > 0).astype(np.uint8))
    reference = ((q[:, None, :] > 0) != (d[None, :, :] > 0)).sum(-1)
    np.testing.assert_array_equal(
        retrieval.hamming_distances(packed, retrieval.binarize(d)), reference
    )
    # sign(x)/sqrt(d) cosines are 1 - 2 hamming / d: the same ranking as Hamming distance.
    cos = retrieval.sign_vectors(q) @ retrieval.sign_vectors(d).T
    np.testing.assert_allclose(cos, 1 - 2 * reference / 70, atol=1e-6)


def test_wordnet_task_pairs_each_example_with_its_own_held_out_definition():
    from jasper_jax.data.corpus import load_embedded_records

    task = retrieval.wordnet_task(max_queries=200, max_documents=1000)
    assert len(task.queries) == 200 and len(task.documents) == 1000
    records = load_embedded_records("validation")
    synset_of = {r["text"]: r["synset"] for r in records if r["kind"] == "gloss"}
    examples = {}
    for r in records:
        if r["kind"] == "example":
            examples.setdefault(r["synset"], set()).add(r["text"])
    for query, doc in zip(task.queries, [task.documents[i] for i in task.relevant], strict=True):
        assert query in examples[synset_of[doc]]
    train_synsets = {r["synset"] for r in load_embedded_records("train")}
    assert not {synset_of[d] for d in task.documents} & train_synsets
    with pytest.raises(Exception, match="--docs"):
        retrieval.wordnet_task(max_queries=200, max_documents=100)


def test_robustness_rows_cover_prefixes_and_binary_and_are_perfect_on_the_target():
    rng = np.random.default_rng(2)
    held, queries = _unit(rng.standard_normal((40, 96))), _unit(rng.standard_normal((12, 96)))
    docs = queries + 0.01 * rng.standard_normal(queries.shape)  # document i answers query i
    enc = robustness.Encoded(held, queries, _unit(docs))
    rows = robustness.robustness_rows({"x": enc}, held, np.arange(12))
    assert [(r["dim"], r["quant"]) for r in rows] == [
        (d, q) for d in (32, 64, 96) for q in ("float32", "binary")
    ]
    full = rows[-2]
    assert full["cosine"] == pytest.approx(1.0) and full["spearman"] == pytest.approx(1.0)
    assert full["nn_recall_at_10"] == 1.0 and full["recall_at_1"] == 1.0
    assert "cosine" not in rows[-1]  # binary rows report no cosine
    for r in rows:  # bytes per vector: what `encode --precision float32|ubinary` stores
        precision = "ubinary" if r["quant"] == "binary" else "float32"
        assert r["bytes"] == quantize(robustness.truncate(held, r["dim"]), precision)[0].nbytes
    assert [r["bytes"] for r in rows] == [32 * 4, 32 // 8, 64 * 4, 64 // 8, 96 * 4, 96 // 8]
    truncated = robustness.truncate(held, 32)
    np.testing.assert_allclose(np.linalg.norm(truncated, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        truncated * np.linalg.norm(held[:, :32], axis=1)[:, None], held[:, :32], atol=1e-6
    )


def test_eval_on_a_tiny_workdir_writes_tables_json_and_plot(workdir, tmp_path):  # noqa: F811
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(workdir), "--output", str(out), "--teachers", "all-MiniLM-L6-v2"]
    argv += ["--texts", "48", "--queries", "24", "--docs", "120", "--speed-texts", "16"]
    assert main(argv) == 0
    result = json.loads((out / "eval.json").read_text())
    student, teacher = result["models"]
    assert student["kind"] == "student" and student["default_output"] == "dense_384"
    assert {r["output"] for r in student["rows"]} == {"dense_384", "dense_32", "dense_16", "pooled"}
    assert {r["quant"] for r in student["rows"]} == {"float32", "binary"}
    assert result["task"] == {
        "name": "wordnet-example-to-definition",
        "queries": 24,
        "documents": 120,
    }
    # The only teacher is the whole target: it agrees with it perfectly.
    full = next(r for r in teacher["rows"] if not r["prefix"] and r["quant"] == "float32")
    assert full["cosine"] == pytest.approx(1.0, abs=1e-5) and full["spearman"] == pytest.approx(1.0)
    assert teacher["parameters"]["total"] == 22_713_216  # all-MiniLM-L6-v2
    assert student["parameters"]["encoder"] > 0 and student["texts_per_second"] > 0
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "eval.md").read_text()
    assert "| student (dense_384) |" in md and "binary" in md


def test_teacher_cache_hits_only_the_same_teacher_prompt_and_texts(tmp_path, caplog):
    from jasper_jax.evaluation.teacher_cache import cached_encode, entry_key, resolve_cache_dir

    calls = []

    def compute(texts):
        calls.append(list(texts))
        return np.asarray([[len(t), 1.0] for t in texts], np.float32)

    teacher = {"name": "t", "model_fingerprint": "m1", "tokenizer_fingerprint": "k"}
    first = cached_encode(tmp_path, teacher, None, ["ab", "c"], compute)
    again = cached_encode(tmp_path, teacher, None, ["ab", "c"], compute)
    np.testing.assert_array_equal(first, again)
    assert len(calls) == 1 and len(list(tmp_path.glob("*.npy"))) == 1
    # Anything that changes the vectors is a miss: texts (not only their concatenation),
    # the prompt, the teacher's weights.
    cached_encode(tmp_path, teacher, None, ["a", "bc"], compute)
    cached_encode(tmp_path, teacher, "query: ", ["ab", "c"], compute)
    cached_encode(tmp_path, {**teacher, "model_fingerprint": "m2"}, None, ["ab", "c"], compute)
    assert len(calls) == 4 and len(list(tmp_path.glob("*.npy"))) == 4
    # A damaged entry is recomputed and replaced, with a warning; no temp files are left.
    entry = tmp_path / f"{entry_key(teacher, None, ['ab', 'c'])}.npy"
    for damage in (b"not an npy file", None):
        if damage is None:  # a valid file of the wrong shape
            np.save(entry, np.zeros((3, 2), np.float32))
        else:
            entry.write_bytes(damage)
        caplog.clear()
        with caplog.at_level("WARNING"):
            n = len(calls)
            out = cached_encode(tmp_path, teacher, None, ["ab", "c"], compute)
            out = cached_encode(tmp_path, teacher, None, ["ab", "c"], compute)
        assert len(calls) == n + 1 and "recomputing" in caplog.text
        np.testing.assert_array_equal(out, first)
    assert not list(tmp_path.glob("*.tmp"))
    # "off" (and a None folder) computes every time.
    assert resolve_cache_dir("off") is None and resolve_cache_dir("Off") is None
    n = len(calls)
    cached_encode(None, teacher, None, ["ab", "c"], compute)
    cached_encode(None, teacher, None, ["ab", "c"], compute)
    assert len(calls) == n + 2


def test_eval_reuses_cached_teacher_encodings_with_the_same_result(workdir, tmp_path, caplog):  # noqa: F811
    cache = tmp_path / "cache"
    argv = ["eval", "--model", str(workdir), "--teachers", "all-MiniLM-L6-v2"]
    argv += ["--texts", "24", "--queries", "12", "--docs", "60", "--speed-texts", "8"]
    results = []
    for run in ("cold", "warm"):
        out = tmp_path / run
        with caplog.at_level("INFO"):
            caplog.clear()
            assert main([*argv, "--output", str(out), "--teacher-cache", str(cache)]) == 0
        results.append(json.loads((out / "eval.json").read_text()))
        hits = caplog.text.count("from the cache")
        assert hits == (0 if run == "cold" else 3)  # held-out texts, queries, documents
    assert len(list(cache.glob("*.npy"))) == 3
    cold, warm = ([m["rows"] for m in r["models"]] for r in results)
    assert cold == warm
    assert results[1]["models"][1]["texts_per_second"] > 0  # timed on the model, not the cache
    off = tmp_path / "off"
    assert main([*argv, "--output", str(off), "--teacher-cache", "off"]) == 0
    assert len(list(cache.glob("*.npy"))) == 3


def test_export_card_includes_the_workdir_eval(workdir, tmp_path):  # noqa: F811
    import shutil

    from jasper_jax.evaluation.runner import write_results

    # A copy: the shared workdir must stay without eval/ for the export tests.
    workdir = Path(shutil.copytree(workdir, tmp_path / "workdir"))
    eval_json = workdir / "eval" / "eval.json"
    if not eval_json.exists():  # eval writes WORKDIR/eval by default; build a tiny one here
        from jasper_jax.evaluation.runner import EvalSettings, evaluate

        settings = EvalSettings(texts=24, queries=12, documents=60, speed_texts=8)
        result = evaluate(workdir, teachers=["all-MiniLM-L6-v2"], settings=settings)
        write_results(result, workdir / "eval")
    export_workdir(workdir, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Evaluation (jasper-jax eval)" in card and "| student (dense_384) |" in card


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_eval_refuses_unsupported_model_folders(tmp_path, capsys):
    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, err = _run(["eval", "--model", str(gpt)], capsys)
    assert code == 2 and "gpt2" in err and "bert" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = _run(["eval", "--model", str(empty)], capsys)
    assert code == 2 and "neither a model folder" in err and "workdir" in err
    code, err = _run(["eval", "--model", str(gpt), "--texts", "5"], capsys)
    assert code == 2 and "--texts" in err
    assert not (tmp_path / "gpt-eval").exists()


class _FakeEncoder:
    """Records what the adapter asks for; vectors encode the call so results can be checked."""

    class model:  # noqa: N801 - mimics TextEncoder.model
        prompts = {"query": "Q: ", "document": ""}

    def __init__(self):
        self.calls = []

    def encode(self, texts, *, head=None, prompt=None):
        self.calls.append((list(texts), head, prompt))
        return np.ones((len(texts), 3), np.float32) / np.sqrt(3)


class PromptType(str, enum.Enum):  # noqa: UP042 - exactly mteb.types.PromptType
    query = "query"
    passage = "passage"


def test_mteb_adapter_prompts_and_inputs():
    fake = _FakeEncoder()
    adapter = MtebEncoder(fake, head="dense_16")
    out = adapter.encode(["a", "b"], task_name="SciFact", prompt_type=PromptType.query)
    assert out.shape == (2, 3) and out.dtype == np.float32
    assert fake.calls[-1] == (["a", "b"], "dense_16", "Q: ")
    adapter.encode(["c"], task_name="SciFact", prompt_type=PromptType.passage)
    assert fake.calls[-1][2] is None  # document prompt is empty
    adapter.encode(["d"], task_name="STSBenchmark")
    assert fake.calls[-1][2] is None
    # mteb 2.x: batches of {"text": [...]} and task metadata.
    meta = type("Meta", (), {"name": "SciFact", "type": "Retrieval"})()
    adapter.encode([{"text": ["e", "f"]}, {"text": ["g"]}], task_metadata=meta, hf_split="test")
    assert fake.calls[-1][0] == ["e", "f", "g"]
    custom = MtebEncoder(
        fake,
        prompts={"SciFact-query": "task+type ", "Retrieval": "type ", "query": "generic "},
    )
    assert custom.select_prompt("SciFact", PromptType.query) == "task+type "
    assert custom.select_prompt("NFCorpus", PromptType.query, "Retrieval") == "type "
    assert custom.select_prompt("NFCorpus", "query") == "generic "
    assert custom.select_prompt("NFCorpus", None) is None
    np.testing.assert_allclose(adapter.similarity(out, out), np.ones((2, 2)), rtol=1e-6)


def test_mteb_adapter_encodes_like_the_jax_encoder(workdir):  # noqa: F811
    adapter = MtebEncoder.from_path(workdir, head="32")
    texts = ["a short query", "another one about cats", ""]
    got = adapter.encode(texts, task_name="X", prompt_type=PromptType.query, batch_size=8)
    ref = TextEncoder(load_workdir_model(workdir)[0]).encode(texts, head="32", prompt="query: ")
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_paired_bootstrap_interval():
    """A constant shift is its own interval; swapping the systems negates it; with iid noise
    of sd 1 over 400 queries the 95% interval is about +-1.96 / 20 wide and covers the mean."""
    rng = np.random.default_rng(0)
    b = rng.random(400)
    assert paired_bootstrap(b + 0.1, b) == pytest.approx((0.1, 0.1, 0.1))
    a = b + rng.normal(size=400)
    diff, low, high = paired_bootstrap(a, b, resamples=4000)
    assert low < diff < high
    assert high - low == pytest.approx(2 * 1.96 * np.std(a - b) / 20, rel=0.15)
    back = paired_bootstrap(b, a, resamples=4000)
    assert back[0] == pytest.approx(-diff) and back[1] < 0
