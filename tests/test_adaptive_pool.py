"""Adaptive average pooling against torch's `adaptive_avg_pool1d/2d` (the reference semantics)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jasper_jax.models.adaptive_pool import (
    adaptive_avg_pool_1d,
    adaptive_avg_pool_2d,
    adaptive_pool_matrix,
)

RNG = np.random.default_rng(0)


def _rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# (in, out): divides, does not divide, identity, up-sampling with and without overlap, to one.
SIZES_1D = [(10, 5), (10, 3), (7, 7), (3, 7), (5, 12), (4, 8), (6, 1), (729, 300), (1152, 1536)]


@pytest.mark.parametrize(("size_in", "size_out"), SIZES_1D)
def test_1d_matches_torch(size_in, size_out):
    x = _rand(2, 3, size_in)
    expected = F.adaptive_avg_pool1d(torch.from_numpy(x), size_out).numpy()
    got = np.asarray(adaptive_avg_pool_1d(jnp.asarray(x), size_out))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_1d_pools_any_axis():
    x = _rand(2, 11, 3)
    expected = F.adaptive_avg_pool1d(torch.from_numpy(x.transpose(0, 2, 1)), 4).numpy()
    got = np.asarray(adaptive_avg_pool_1d(jnp.asarray(x), 4, axis=1))
    np.testing.assert_allclose(got, expected.transpose(0, 2, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("shape", "out_hw"),
    [
        ((2, 3, 9, 10), (4, 3)),  # batched, down, non-dividing
        ((2, 3, 8, 6), (4, 3)),  # batched, down, dividing
        ((3, 5, 4), (7, 9)),  # unbatched, up
        ((4, 8, 5), (3, 11)),  # unbatched, down on H and up on W
    ],
)
def test_2d_matches_torch(shape, out_hw):
    x = _rand(*shape)
    expected = F.adaptive_avg_pool2d(torch.from_numpy(x), out_hw).numpy()
    got = np.asarray(adaptive_avg_pool_2d(jnp.asarray(x), out_hw))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_jasper_bridge_shape_matches_torch_module():
    """SigLIP so400m tokens [B, 729, 1152] -> [B, 300, 1536], as Jasper's AdaptiveAvgPool2d."""
    x = _rand(2, 729, 1152)
    expected = torch.nn.AdaptiveAvgPool2d((300, 1536))(torch.from_numpy(x)).numpy()
    got = np.asarray(jax.jit(adaptive_avg_pool_2d, static_argnums=1)(jnp.asarray(x), (300, 1536)))
    assert got.shape == (2, 300, 1536)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_windows_follow_torch_rule():
    # 5 -> 3: windows [0, 2), [1, 4), [3, 5) overlap; every column averages its window.
    m = adaptive_pool_matrix(5, 3)
    expected = np.array([[1 / 2, 0, 0], [1 / 2, 1 / 3, 0], [0, 1 / 3, 0], [0, 1 / 3, 1 / 2]])
    expected = np.vstack([expected, [0, 0, 1 / 2]])
    np.testing.assert_allclose(m, expected, atol=1e-7)
    assert not m.flags.writeable


def test_bf16_in_bf16_out_close_to_fp32():
    x = _rand(2, 29, 40)
    full = np.asarray(adaptive_avg_pool_2d(jnp.asarray(x), (12, 64)))
    half = adaptive_avg_pool_2d(jnp.asarray(x, jnp.bfloat16), (12, 64))
    assert half.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(half, np.float32), full, atol=3e-2, rtol=0)


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match=">= 1"):
        adaptive_avg_pool_1d(jnp.ones((4,)), 0)
    with pytest.raises(ValueError, match="at least 2 axes"):
        adaptive_avg_pool_2d(jnp.ones((4,)), (2, 2))
