"""Compact vectors (`jasper_jax.precision`) equal sentence-transformers' `quantize_embeddings`
array for array; calibration files round-trip; eval's binary path is the same bits."""

import json

import numpy as np
import pytest

from jasper_jax.calibration import Calibration, load_calibration, save_calibration
from jasper_jax.errors import UserError
from jasper_jax.evaluation import retrieval
from jasper_jax.precision import (
    bytes_per_vector,
    hamming_distances,
    quantize,
    ranges_of,
    unpack_signs,
)


def _unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _st(x, precision, ranges=None):
    from sentence_transformers import quantize_embeddings

    return quantize_embeddings(x, precision=precision, ranges=ranges)


@pytest.mark.parametrize("dim", [384, 37, 8, 1])
@pytest.mark.parametrize("precision", ["float32", "int8", "uint8", "binary", "ubinary"])
def test_equal_to_sentence_transformers(precision, dim):
    calib = _unit_rows(500, dim, seed=0)
    x = _unit_rows(200, dim, seed=1)  # other rows: some fall outside the ranges and clip
    ranges = ranges_of(calib)
    ours = quantize(x, precision, ranges)
    ref = _st(x, precision, ranges)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)
    assert ours.nbytes == len(x) * bytes_per_vector(precision, dim)


def test_float16_is_the_vectors_rounded_to_half():
    x = _unit_rows(50, 64, seed=2)
    out = quantize(x, "float16")
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, np.float16(x))  # numpy's IEEE round-to-nearest
    assert np.abs(out.astype(np.float32) - x).max() <= 2.0**-11  # half an ulp of values < 1


def test_int8_clips_values_outside_the_calibration_range():
    ranges = np.array([[-1.0, 0.0, 0.5], [1.0, 0.0, 0.75]], np.float32)  # dim 1: constant
    x = np.array([[-2.0, 5.0, 0.6], [2.0, -5.0, 0.74], [0.0, 0.0, 0.76]], np.float32)
    codes = quantize(x, "uint8", ranges)
    # dim 0: below min -> 0, above max -> 255; dim 1 (constant range, step 1): clip(x - 0)
    assert codes[:, 0].tolist() == [0, 255, 127]
    assert codes[:, 1].tolist() == [5, 0, 0]
    step = np.float32(0.25) / np.float32(255)
    assert codes[:, 2].tolist() == [
        int(np.floor((np.float32(0.6) - np.float32(0.5)) / step)),
        int(np.floor((np.float32(0.74) - np.float32(0.5)) / step)),
        255,
    ]
    np.testing.assert_array_equal(quantize(x, "int8", ranges), codes.astype(np.int16) - 128)
    np.testing.assert_array_equal(quantize(x, "uint8", ranges), _st(x, "uint8", ranges))


def test_packed_width_for_a_dim_that_is_not_a_multiple_of_8():
    x = np.array([[1, -1, 1, 1, -1, -1, -1, 1, 1, 0.0]], np.float32)  # 10 dims, 0 is not > 0
    ub = quantize(x, "ubinary")
    assert ub.shape == (1, 2) and ub.dtype == np.uint8
    assert ub.tolist() == [[0b10110001, 0b10000000]]  # padding bits are 0
    assert quantize(x, "binary").tolist() == [[0b10110001 - 128, 0b10000000 - 128]]
    for packed in (ub, quantize(x, "binary")):
        np.testing.assert_array_equal(unpack_signs(packed, 10), x > 0)


def test_bad_input_is_refused():
    x = _unit_rows(4, 16, seed=3)
    with pytest.raises(UserError, match="NaN/inf.*row 2"):
        bad = x.copy()
        bad[2, 5] = np.nan
        quantize(bad, "binary")
    with pytest.raises(UserError, match="calibration ranges"):
        quantize(x, "int8")
    with pytest.raises(UserError, match=r"expected \(2, 16\)"):
        quantize(x, "int8", np.zeros((2, 15), np.float32))
    with pytest.raises(UserError, match="min .* above max"):
        quantize(x, "int8", np.stack([np.ones(16), np.zeros(16)]))
    with pytest.raises(UserError, match="not supported; choose one of"):
        quantize(x, "int4")
    with pytest.raises(UserError, match="float vectors"):
        quantize(quantize(x, "ubinary"), "binary")


def test_hamming_is_popcount_and_agrees_for_binary_and_ubinary():
    a, b = _unit_rows(70, 45, seed=4), _unit_rows(30, 45, seed=5)
    reference = ((a > 0)[:, None, :] != (b > 0)[None, :, :]).sum(-1)
    for precision in ("ubinary", "binary"):
        d = hamming_distances(quantize(a, precision), quantize(b, precision), block=16)
        np.testing.assert_array_equal(d, reference)
    with pytest.raises(UserError, match="do not match"):
        hamming_distances(quantize(a, "ubinary"), quantize(b, "binary"))


def test_eval_binary_path_is_the_ubinary_encoding():
    x = _unit_rows(20, 30, seed=6)
    np.testing.assert_array_equal(retrieval.binarize(x), quantize(x, "ubinary"))
    signs = retrieval.sign_vectors(x)
    np.testing.assert_array_equal(signs, np.where(x > 0, 1, -1).astype(np.float32) / np.sqrt(30))


def test_calibration_file_round_trips_exactly(tmp_path):
    ranges = {"pooled": ranges_of(_unit_rows(9, 7, seed=7)), "dense_3": ranges_of(np.eye(3))}
    record = {"file": "t.txt", "count": 9, "sha256": "ab", "prompt": None, "max_length": 8}
    path = tmp_path / "calibration.json"
    save_calibration(path, Calibration(ranges, record))
    back = load_calibration(path)
    assert back.texts == record and sorted(back.ranges) == ["dense_3", "pooled"]
    for name, r in ranges.items():
        np.testing.assert_array_equal(back.ranges[name], r)  # float32 exact through JSON
    with pytest.raises(UserError, match="not 'dense_5'.*--head"):
        back.for_output("dense_5", 5, str(path))

    payload = json.loads(path.read_text())
    payload["outputs"]["pooled"]["min"][0] = 2.0  # above its max
    path.write_text(json.dumps(payload))
    with pytest.raises(UserError, match="output 'pooled'.*above max"):
        load_calibration(path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="unreadable or damaged.*--calibration"):
        load_calibration(path)
