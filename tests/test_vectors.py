"""The two row normalisers (NumPy and jnp) against the plain formula x / max(||x||, 1e-12)."""

import jax
import jax.numpy as jnp
import numpy as np

from jasper_jax.vectors import l2_normalize, unit_rows


def reference(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def test_unit_rows_matches_the_formula_keeps_zero_rows_and_is_float32():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-3, 0.0]], np.float64)
    out = unit_rows(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference(x), rtol=1e-6)
    assert np.all(out[1] == 0)
    np.testing.assert_allclose(unit_rows(np.ones((2, 3, 4))), np.full((2, 3, 4), 0.5), rtol=1e-6)


def test_unit_rows_copies_its_input():
    x = np.array([[3.0, 4.0]], np.float32)
    unit_rows(x)
    assert x.tolist() == [[3.0, 4.0]]


def test_l2_normalize_matches_numpy_and_is_safe_at_zero():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    np.testing.assert_allclose(l2_normalize(x), reference(x), rtol=1e-6)
    grad = jax.grad(lambda v: jnp.sum(l2_normalize(v)))(jnp.asarray(x))
    assert np.all(np.isfinite(grad))


def test_l2_normalize_reads_any_float_dtype_in_float32():
    x = jnp.asarray([[3.0, 4.0]], jnp.bfloat16)
    out = l2_normalize(x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, [[0.6, 0.8]], rtol=1e-6)


def test_the_two_agree():
    x = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(l2_normalize(x)), unit_rows(x), rtol=1e-6, atol=1e-7)
