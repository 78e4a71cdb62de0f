"""The train loop: stage masks, exact kill-and-resume, sharding invariance, bad input."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

from jasper_jax.config import to_settings
from jasper_jax.errors import UserError
from jasper_jax.models import hf_io
from jasper_jax.run_folder import load_params
from jasper_jax.train.loop import TrainingStopped, train_and_evaluate
from tests.train_fixtures import (  # noqa: F401
    read_metrics,
    sigterm_after_steps,
    tiny_config,
    tiny_settings,
    tiny_setup,
)


def _flat(params) -> dict:
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in after if k in before and not np.array_equal(before[k], after[k])}


@pytest.fixture(scope="module")
def stage_runs(tiny_setup, tmp_path_factory):  # noqa: F811
    """Stages 1, 2, 3 (2 steps each) chained through init_from."""
    root = tmp_path_factory.mktemp("stages")
    runs, previous = {}, ""
    for stage in (1, 2, 3):
        c = tiny_config(tiny_setup, stage, **{"train.steps": 2, "init_from": previous})
        runs[stage] = train_and_evaluate(to_settings(c), root / f"s{stage}")
        runs[stage]["params"] = _flat(load_params(root / f"s{stage}")[0])
        previous = str(root / f"s{stage}")
    return runs


def test_stage1_trains_only_the_head(tiny_setup, stage_runs):  # noqa: F811
    state = hf_io.read_state_dict(tiny_setup["student"])
    after = stage_runs[1]["params"]
    for path, value in after.items():
        if path.startswith("encoder/"):
            hf_key = hf_io.flax_path_to_hf(tuple(path.split("/")[1:]))
            expected = state[hf_key].T if path.endswith("kernel") else state[hf_key]
            np.testing.assert_array_equal(value, expected, err_msg=path)
    assert {"heads/dense_384/kernel", "heads/dense_384/bias"} <= set(after)


def test_stage2_trains_head_and_last_layers(stage_runs):
    before, after = stage_runs[1]["params"], stage_runs[2]["params"]
    changed = _changed(before, after)
    allowed = ("heads/", "encoder/encoder/layer_2/", "encoder/encoder/layer_3/")
    assert changed and all(k.startswith(allowed) for k in changed), sorted(changed)
    for prefix in allowed:  # every trainable group really moved
        assert any(k.startswith(prefix) for k in changed), prefix


def test_stage3_trains_everything_and_adds_reduced_heads(stage_runs):
    before, after = stage_runs[2]["params"], stage_runs[3]["params"]
    assert {"heads/dense_32/kernel", "heads/dense_16/kernel"} <= set(after) - set(before)
    changed = _changed(before, after)
    assert any(k.startswith("encoder/embeddings/") for k in changed)
    assert any(k.startswith("encoder/encoder/layer_0/") for k in changed)
    assert not any("pooler" in k for k in changed)  # HF pooler is off the embedding path
    assert set(stage_runs[3]["eval"]) == {"dense_384", "dense_32", "dense_16"}
    assert "cosine" in stage_runs[3]["eval"]["dense_384"]


def test_kill_and_resume_gives_identical_losses(tiny_setup, tmp_path):  # noqa: F811
    fields = {"train.steps": 8, "train.checkpoint_every": 100}
    train_and_evaluate(tiny_settings(tiny_setup, 3, **fields), tmp_path / "a")
    reference = [m["train/loss"] for m in read_metrics(tmp_path / "a")]

    workdir = tmp_path / "b"

    sigterm_after_steps(workdir, 3, timeout=120)
    first = train_and_evaluate(tiny_settings(tiny_setup, 3, **fields), workdir)
    assert first["status"] == "preempted" and 3 <= first["step"] < 8
    second = train_and_evaluate(tiny_settings(tiny_setup, 3, **fields), workdir)
    assert second["status"] == "finished" and second["step"] == 8
    resumed = [m["train/loss"] for m in read_metrics(workdir)]
    assert resumed == reference  # exactly: same batches, same dropout keys, same arithmetic


def test_length_groups_compile_once_per_length(tiny_setup, tmp_path):  # noqa: F811
    fields = {"train.steps": 12, "data.length_groups": 6, "data.pad_multiple": 4}
    grouped = train_and_evaluate(tiny_settings(tiny_setup, 3, **fields), tmp_path / "grouped")
    tokens = [m["train/tokens"] for m in read_metrics(tmp_path / "grouped")]
    assert grouped["status"] == "finished" and len(tokens) == 12
    lengths = grouped["batch_lengths"]
    assert len(lengths) > 1 and all(n % 4 == 0 and n <= 16 for n in lengths), lengths
    fixed = train_and_evaluate(
        tiny_settings(tiny_setup, 3, **{"train.steps": 2, "data.length_groups": 1}),
        tmp_path / "f",
    )
    assert fixed["batch_lengths"] == [16]


@pytest.fixture(scope="module")
def single_device_losses(tiny_setup, tmp_path_factory):  # noqa: F811
    workdir = tmp_path_factory.mktemp("one") / "run"
    assert train_and_evaluate(tiny_settings(tiny_setup, 3), workdir)["status"] == "finished"
    return [m["train/loss"] for m in read_metrics(workdir)]


@pytest.mark.parametrize("mesh", [(2, 1, 4), (2, 4, 1)])
def test_sharded_losses_equal_single_device(single_device_losses, tiny_setup, tmp_path, mesh):  # noqa: F811
    many = train_and_evaluate(tiny_settings(tiny_setup, 3, mesh_shape=mesh), tmp_path / "many")
    assert many["status"] == "finished"
    b = [m["train/loss"] for m in read_metrics(tmp_path / "many")]
    np.testing.assert_allclose(b, single_device_losses, rtol=1e-5, atol=1e-5)


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def test_bad_config_and_workdir_are_refused(tiny_setup, tmp_path):  # noqa: F811
    with pytest.raises(UserError, match="teacher dim 384"):
        train_and_evaluate(tiny_settings(tiny_setup, 1, **{"model.heads": (100,)}), tmp_path / "x")
    with pytest.raises(UserError, match="run the previous stage first"):
        c = tiny_config(tiny_setup, 2, init_from=str(tmp_path / "missing"))
        train_and_evaluate(to_settings(c), tmp_path / "y")
    workdir = tmp_path / "run"
    train_and_evaluate(tiny_settings(tiny_setup, 1, **{"train.steps": 1}), workdir)
    before = _tree_hash(workdir / "checkpoints")
    with pytest.raises(UserError, match="holds checkpoints of another run"):
        train_and_evaluate(tiny_settings(tiny_setup, 2, **{"train.steps": 1}), workdir)
    assert _tree_hash(workdir / "checkpoints") == before


def test_nonfinite_updates_are_skipped_then_training_stops(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    """Every batch gets NaN teacher vectors: updates are skipped, then training stops cleanly."""
    import jax.numpy as jnp

    from jasper_jax.train.text_task import TextTask

    original = TextTask.forward

    def poisoned(self, s):
        forward = original(self, s)

        def run(params, batch, rng):
            out, teacher = forward(params, batch, rng)
            return out, jnp.where(batch["input_ids"][0, 1] >= 0, jnp.nan, 1.0) * teacher

        return run

    fields = {"train.steps": 6, "train.checkpoint_every": 1, "train.max_nonfinite_in_row": 2}
    workdir = tmp_path / "nan"
    monkeypatch.setattr(TextTask, "forward", poisoned)
    with pytest.raises(TrainingStopped, match="2 updates in a row had a non-finite"):
        train_and_evaluate(tiny_settings(tiny_setup, 3, **fields), workdir)
    metrics = read_metrics(workdir)
    assert [m["train/skipped"] for m in metrics] == [1.0]
    params, step = load_params(workdir)  # the saved state is the untouched initial one
    assert step == 1
    assert all(np.isfinite(v).all() for v in _flat(params).values())


def test_paper_recipe_runs_with_a_tiny_qwen2_student(tiny_setup, tmp_path):  # noqa: F811
    """configs/jasper_paper.py as shipped (bf16, remat, all devices on fsdp), model shrunk."""
    import shutil

    import transformers

    from jasper_jax.config import load_config
    from tests.train_fixtures import TOKENIZER_FILES

    folder = tmp_path / "qwen2"
    cfg = transformers.Qwen2Config(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    transformers.Qwen2Model(cfg).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tiny_setup["student"]) / name, folder / name)
    paper = load_config("configs/jasper_paper.py:3")
    assert paper.model.heads == (12288, 1024, 512, 256) and paper.dtype == "bfloat16"
    overrides = {
        "model.init_hf": folder,
        "model.heads": (384, 32, 16),
        "data.train_dir": tiny_setup["train"],
        "data.eval_dir": tiny_setup["validation"],
        "data.batch_size": 8,
        "data.max_length": 16,
        "data.eval_texts": 32,
        "train.steps": 2,
        "train.log_every": 1,
    }
    c = load_config(
        "configs/jasper_paper.py:3", [f"--config.{k}={v}" for k, v in overrides.items()]
    )
    result = train_and_evaluate(to_settings(c), tmp_path / "run")
    assert result["status"] == "finished"
    losses = [m["train/loss"] for m in read_metrics(tmp_path / "run")]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
    assert set(result["eval"]) == {"dense_384", "dense_32", "dense_16"}
    before = hf_io.read_state_dict(folder)["layers.1.self_attn.q_proj.weight"]
    after = _flat(load_params(tmp_path / "run")[0])["encoder/layers_1/self_attn/q_proj/kernel"]
    assert after.dtype == np.float32  # bf16 compute, fp32 master weights
    assert not np.allclose(after.T, before)  # stage 3 trains the encoder
