"""Closed-form heads (model.head_init = "lstsq"): NumPy reference, meshes, processes, training."""

import sys

import jax.numpy as jnp
import numpy as np
import pytest

from jasper_jax.config import load_config, to_settings
from jasper_jax.data.eval_records import load_eval_arrays
from jasper_jax.encode import TextEncoder
from jasper_jax.errors import UserError
from jasper_jax.losses import LossConfig, distillation_loss
from jasper_jax.run_folder import load_any_model, load_params
from jasper_jax.train import head_init
from jasper_jax.train.loop import train_and_evaluate
from tests import head_fit_worker as worker
from tests.local_processes import run_processes
from tests.train_fixtures import tiny_config, tiny_overrides, tiny_setup  # noqa: F401


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(ridge: float) -> dict[str, np.ndarray]:
    """NumPy: ridge as an ordinary least-squares problem on an augmented system, padding rows
    dropped; the full head's predictions' top principal directions for the reduced head."""
    data = worker.problem()
    keep = data["attention_mask"].any(axis=1)
    x = np.sin(data["features"][keep].astype(np.float64)) * 1.5
    t = _unit(data["teacher"][keep].astype(np.float64))
    xa = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    h = x.shape[1]
    lam = ridge * np.trace(x.T @ x) / h
    shrink = np.sqrt(lam) * np.eye(h + 1)[:h]  # rows sqrt(lam) e_j, j < h: no bias shrinkage
    a = np.concatenate([xa, shrink])
    b = np.concatenate([t, np.zeros((h, t.shape[1]))])
    m = np.linalg.lstsq(a, b, rcond=None)[0]
    predictions = xa @ m
    _, vectors = np.linalg.eigh(predictions.T @ predictions)
    top = vectors[:, ::-1][:, :6]
    return {"m": m, "reduced_predictions": predictions @ top, "xa": xa, "count": len(x)}


def _aligned(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`a` with each column's sign flipped to agree with `b` (principal directions have no sign)."""
    return a * np.sign(np.sum(a * b, axis=0, keepdims=True))


@pytest.mark.parametrize("mesh", [(1, 1, 1), (8, 1, 1), (2, 2, 2)])
def test_fit_equals_numpy_lstsq_on_any_mesh(mesh):
    import jax

    fitted = worker.fit(mesh) if len(jax.devices()) >= np.prod(mesh) else pytest.skip("devices")
    ref = _reference(ridge=1e-3)
    assert int(fitted["count"]) == ref["count"] == worker.ROWS - 5
    full = np.concatenate([fitted["full_kernel"], fitted["full_bias"][None]])
    np.testing.assert_allclose(full, ref["m"], rtol=1e-4, atol=1e-5)
    small = np.concatenate([fitted["small_kernel"], fitted["small_bias"][None]])
    predictions = ref["xa"] @ small
    np.testing.assert_allclose(
        _aligned(predictions, ref["reduced_predictions"]),
        ref["reduced_predictions"],
        rtol=1e-4,
        atol=1e-4,
    )


def test_two_processes_fit_the_same_heads(tmp_path):
    one = worker.fit((1, 1, 1))
    out = tmp_path / "two.npz"
    run_processes(
        lambda i, port: (
            [sys.executable, "-m", "tests.head_fit_worker", str(out), "(2, 4, 1)"]
            + [f"127.0.0.1:{port}", "2", str(i)]
        ),
        timeout=240,
    )
    two = np.load(out)
    assert int(two["count"]) == int(one["count"])
    for key in ("full_kernel", "full_bias"):
        np.testing.assert_allclose(two[key], one[key], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        _aligned(two["small_kernel"], one["small_kernel"]), one["small_kernel"], atol=1e-5
    )


def test_ridge_shrinks_the_kernel_not_the_bias():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(200, 5)), np.ones((200, 1))], axis=1)
    t = rng.normal(size=(200, 3)) + 4.0  # a large mean: only the bias should carry it
    moments = head_init.Moments(x.T @ x, x.T @ t, 200)
    loose, _ = head_init.ridge_heads(moments, 0.0)
    tight, bias = head_init.ridge_heads(moments, 1e3)
    assert np.linalg.norm(tight) < 0.01 * np.linalg.norm(loose)
    np.testing.assert_allclose(bias, t.mean(axis=0), rtol=0.05)


def test_reduced_head_wider_than_its_rank_is_refused():
    moments = head_init.Moments(np.eye(4), np.ones((4, 3)), 10)
    with pytest.raises(UserError, match="cannot be fitted in closed form"):
        head_init.reduced_head(moments, np.ones((3, 3)), np.ones(3), 5)


def _heldout_loss(workdir, setup) -> float:
    """The stage's objective on the held-out texts (one batch), from the saved model."""
    model = load_any_model(workdir)
    texts, teacher, _ = load_eval_arrays(setup["validation"])
    vectors = TextEncoder(model, batch_size=64).encode_heads(texts, heads=("dense_384",))
    total, _ = distillation_loss(
        {"dense_384": jnp.asarray(vectors["dense_384"])}, jnp.asarray(teacher), LossConfig()
    )
    return float(total)


def test_stage1_from_closed_form_head_beats_random_head(tiny_setup, tmp_path):  # noqa: F811

    scores = {}
    for mode in ("lstsq", "random"):
        c = tiny_config(tiny_setup, 1, **{"model.head_init": mode, "train.steps": 5})
        result = train_and_evaluate(to_settings(c), tmp_path / mode)
        scores[mode] = (_heldout_loss(tmp_path / mode, tiny_setup), result["eval"])
    (fit_loss, fit_eval), (random_loss, random_eval) = scores["lstsq"], scores["random"]
    assert fit_loss < random_loss
    assert fit_eval["dense_384"]["cosine"] > random_eval["dense_384"]["cosine"] + 0.05


def test_fit_only_stage_saves_the_closed_form_heads(tiny_setup, tmp_path):  # noqa: F811
    """train.steps=0: the stage is the closed-form fit, saved as step 0; a re-run is already
    finished with the same scores; the next stage starts from it; random heads are refused."""

    c = tiny_config(tiny_setup, 1, **{"train.steps": 0})
    first = train_and_evaluate(to_settings(c), tmp_path / "s1")
    assert (first["status"], first["step"]) == ("finished", 0)
    _, step = load_params(tmp_path / "s1")
    assert step == 0
    again = train_and_evaluate(to_settings(c), tmp_path / "s1")
    np.testing.assert_allclose(
        again["eval"]["dense_384"]["cosine"], first["eval"]["dense_384"]["cosine"], rtol=1e-6
    )
    with pytest.raises(UserError, match="train.steps"):
        load_config(
            "configs/embedded_default.py:1",
            tiny_overrides(tiny_setup, 1, **{"train.steps": 0, "model.head_init": "random"}),
        )
    c2 = tiny_config(tiny_setup, 2, **{"init_from": tmp_path / "s1", "train.steps": 1})
    assert train_and_evaluate(to_settings(c2), tmp_path / "s2")["status"] == "finished"
