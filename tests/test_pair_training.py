"""Training on pair data (distillation + contrastive, issue 18): the pair pipeline tokenizes each
role with its prompt; a stage trains with InfoNCE, hard negatives and a learned temperature;
sharded over 8 devices it equals one device; settings it cannot serve exit 2 with one line."""

from pathlib import Path

import numpy as np
import pytest

from jasper_jax.cli import main
from jasper_jax.data.pair_dataset import build_pair_dataset
from jasper_jax.data.pair_pipeline import make_pair_pipeline
from jasper_jax.data.pairs import read_pairs
from jasper_jax.data.pipeline import load_fixed_length_tokenizer
from jasper_jax.errors import UserError
from jasper_jax.run_folder import load_params, load_workdir_model
from jasper_jax.train.loop import train_and_evaluate
from tests.train_fixtures import read_metrics, tiny_overrides, tiny_settings, tiny_setup  # noqa: F401

BOTH = {"loss.infonce": 1.0, "loss.learn_temperature": True, "loss.gor": 1.0}
PROMPTS = {"data.query_prompt": "query: ", "data.document_prompt": "passage: "}


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory) -> Path:
    """48 embedded WordNet train pairs (one hard negative each) encoded by MiniLM (384-d)."""
    out = tmp_path_factory.mktemp("pairs") / "ds"
    pairs = read_pairs("embedded", split="train", negatives=1, limit=48)
    build_pair_dataset(pairs, ["all-MiniLM-L6-v2"], out, progress=False)
    return out


def pair_settings(setup, pairs_dir, **overrides):
    fields = {"data.train_dir": str(pairs_dir), **overrides}
    return tiny_settings(setup, 3, **fields)


def test_pair_batches_tokenize_each_role_with_its_prompt(tiny_setup, pairs_dir):  # noqa: F811
    batches = make_pair_pipeline(
        pairs_dir,
        tiny_setup["student"],
        batch_size=8,
        max_length=16,
        seed=0,
        query_prompt="query: ",
        document_prompt="passage: ",
        length_groups=4,
        pad_multiple=4,
    )
    batch = next(batches)
    n, m, length = batch["input_ids"].shape
    assert (n, m) == (8, 3) and length % 4 == 0 and length <= 16
    assert batch["teacher"].shape == (8, 3, 384)
    np.testing.assert_allclose(np.linalg.norm(batch["teacher"], axis=-1), 1.0, rtol=1e-5)
    assert batch["attention_mask"].sum(-1).max() > length - 4  # padded to the longest text
    pairs = read_pairs("embedded", split="train", negatives=1, limit=48)
    tokenizer = load_fixed_length_tokenizer(tiny_setup["student"], 16)
    row = int(batch["index"][0])
    texts = ["query: " + pairs.queries[row], "passage: " + pairs.positives[row]]
    texts.append("passage: " + pairs.negatives[row][0])
    for column, text in enumerate(texts):
        assert list(batch["input_ids"][0, column]) == tokenizer.encode(text).ids[:length]
    without = make_pair_pipeline(
        pairs_dir, tiny_setup["student"], batch_size=8, max_length=16, seed=0, negatives=0
    )
    assert next(without)["input_ids"].shape[:2] == (8, 2)
    with pytest.raises(UserError, match="holds 1 hard negatives"):
        make_pair_pipeline(
            pairs_dir, tiny_setup["student"], batch_size=8, max_length=16, seed=0, negatives=2
        )


@pytest.fixture(scope="module")
def both_run(tiny_setup, pairs_dir, tmp_path_factory) -> Path:  # noqa: F811
    workdir = tmp_path_factory.mktemp("both") / "run"
    s = pair_settings(tiny_setup, pairs_dir, **BOTH, **PROMPTS)
    result = train_and_evaluate(s, workdir)  # held-out fidelity too (single-text eval set)
    assert result["status"] == "finished" and "dense_16" in result["eval"]
    return workdir


def test_both_losses_train_with_a_learned_temperature(both_run):
    metrics = read_metrics(both_run)
    assert len(metrics) == 3
    for key in ("infonce", "infonce/dense_384", "infonce/dense_16", "gor", "temperature"):
        assert all(np.isfinite(m[f"train/{key}"]) for m in metrics), key
    assert "train/cos/dense_384" in metrics[0]  # distillation on every text too
    params, _ = load_params(both_run)
    temperature = float(np.exp(np.asarray(params["loss"]["log_temperature"])))
    assert temperature != pytest.approx(0.05, abs=1e-7)  # it trained
    assert 0.01 <= temperature <= 1.0
    model = load_workdir_model(both_run)[0]
    assert model.prompts == {"query": "query: ", "document": "passage: "}
    assert "loss" not in model.params  # the temperature is not part of the model


def test_sharded_pair_losses_equal_single_device(
    both_run,
    tiny_setup,  # noqa: F811
    pairs_dir,
    tmp_path,
):
    """InfoNCE and GOR over the global batch: 8 devices (data 2 x fsdp 4) == 1 device."""
    s = pair_settings(tiny_setup, pairs_dir, mesh_shape=(2, 4, 1), **BOTH, **PROMPTS)
    assert train_and_evaluate(s, tmp_path / "many")["status"] == "finished"
    for key in ("train/loss", "train/infonce", "train/temperature"):
        many = [m[key] for m in read_metrics(tmp_path / "many")]
        one = [m[key] for m in read_metrics(both_run)]
        np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"loss.infonce": 1.0, "data.train_dir": "SINGLE"}, "needs pair data"),
        ({"data.negatives": 3}, "data.negatives=3"),
        ({"data.max_chunks": 4}, "data.max_chunks=4"),
        ({"loss.cosine": 0.0, "loss.similarity": 0.0, "loss.relative_similarity": 0.0}, "nothing"),
        ({"loss.learn_temperature": True, "loss.infonce_temperature": 5.0}, "must lie in"),
    ],
)
def test_settings_pairs_cannot_serve_exit_2_with_one_line(
    tiny_setup,  # noqa: F811
    pairs_dir,
    tmp_path,
    capsys,
    fields,
    message,
):
    fields = {"data.train_dir": str(pairs_dir), "data.eval_dir": "", **fields}
    if fields["data.train_dir"] == "SINGLE":
        fields["data.train_dir"] = str(tiny_setup["train"])
    argv = ["train", "--config", "configs/embedded_default.py:3"]
    argv += ["--workdir", str(tmp_path / "w"), *tiny_overrides(tiny_setup, 3, **fields)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
