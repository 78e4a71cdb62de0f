"""InfoNCE with hard negatives and a learned temperature, and GOR per role, against plain NumPy
versions of the formulas (jina-embeddings-v5, PAPER.md); global over a mesh == one device."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jasper_jax import sharding
from jasper_jax.losses.contrastive import (
    info_nce_loss,
    learned_temperature,
    role_orthogonal_regularizer,
)
from jasper_jax.losses.objective import LossConfig, distillation_loss
from jasper_jax.losses.pair_loss import LOG_TEMPERATURE, PAIRS, pair_loss


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _nll(logits: np.ndarray, valid_columns: np.ndarray, target: int) -> float:
    kept = logits[valid_columns]
    top = kept.max()
    return float(top + np.log(np.exp(kept - top).sum()) - logits[target])


def numpy_info_nce(q, p, tau, mask, negatives=None, negative_mask=None, symmetric=False):
    """The formula, row by row, in float64."""
    q, p = _unit(q.astype(np.float64)), _unit(p.astype(np.float64))
    n = len(q)
    columns, valid = [*p], [*mask]
    if negatives is not None:
        k = negatives.shape[1]
        nm = np.ones((n, k), bool) if negative_mask is None else negative_mask
        for i in range(n):
            for j in range(k):
                columns.append(_unit(negatives[i, j].astype(np.float64)))
                valid.append(bool(mask[i] and nm[i, j]))
    columns, valid = np.stack(columns), np.array(valid, bool)
    rows = [i for i in range(n) if mask[i]]
    forward = np.mean([_nll(q[i] @ columns.T / tau, valid, i) for i in rows])
    if not symmetric:
        return forward
    backward = np.mean([_nll(p[j] @ q.T / tau, np.asarray(mask, bool), j) for j in rows])
    return 0.5 * (forward + backward)


@pytest.fixture
def batch():
    rng = np.random.default_rng(3)
    n, k, d = 6, 3, 16
    q = rng.normal(size=(n, d)).astype(np.float32)
    p = (q + 2.0 * rng.normal(size=(n, d))).astype(np.float32)
    negatives = (q[:, None] + 1.2 * rng.normal(size=(n, k, d))).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 1, 1], bool)
    negative_mask = rng.random((n, k)) > 0.3
    return q, p, negatives, mask, negative_mask


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("with_negatives", [False, True])
def test_info_nce_equals_numpy(batch, symmetric, with_negatives):
    q, p, negatives, mask, negative_mask = batch
    extra = dict(negatives=negatives, negative_mask=negative_mask) if with_negatives else {}
    got = info_nce_loss(q, p, 0.05, mask, symmetric, **extra)
    want = numpy_info_nce(q, p, 0.05, mask, symmetric=symmetric, **extra)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_hard_negatives_raise_the_loss_and_invalid_ones_do_not_count(batch):
    q, p, negatives, mask, _ = batch
    plain = float(info_nce_loss(q, p, 0.05, mask))
    assert float(info_nce_loss(q, p, 0.05, mask, negatives=negatives)) > plain
    none_valid = np.zeros(negatives.shape[:2], bool)
    masked = info_nce_loss(q, p, 0.05, mask, negatives=negatives, negative_mask=none_valid)
    np.testing.assert_allclose(float(masked), plain, rtol=1e-6)


def test_learned_temperature_gradient_equals_numpy(batch):
    """d loss / d log(tau) through the clipped exp, against a central difference of the NumPy
    formula in float64; clipped outside [low, high], where the gradient is 0."""
    q, p, negatives, mask, negative_mask = batch

    def loss(log_tau):
        tau = learned_temperature(log_tau, 0.01, 1.0)
        return info_nce_loss(q, p, tau, mask, True, negatives, negative_mask)

    log_tau = np.log(0.05)
    value, grad = jax.value_and_grad(loss)(jnp.float32(log_tau))
    eps = 1e-5
    ref = lambda lt: numpy_info_nce(q, p, np.exp(lt), mask, negatives, negative_mask, True)
    want = (ref(log_tau + eps) - ref(log_tau - eps)) / (2 * eps)
    np.testing.assert_allclose(float(value), ref(log_tau), rtol=1e-5)
    np.testing.assert_allclose(float(grad), want, rtol=1e-4)
    assert float(jax.grad(loss)(jnp.float32(np.log(5.0)))) == 0.0  # clipped at high = 1.0
    assert float(learned_temperature(jnp.float32(-20.0), 0.01, 1.0)) == pytest.approx(0.01)


def test_gor_per_role_equals_numpy(batch):
    q, p, _, mask, _ = batch

    def spread(x):
        x = _unit(x[mask].astype(np.float64))
        g = x @ x.T
        b = len(x)
        return (np.sum(g**2) - np.trace(g**2)) / (b * (b - 1))

    got = role_orthogonal_regularizer(q, p, mask)
    np.testing.assert_allclose(float(got), spread(q) + spread(p), rtol=1e-5)


def test_global_over_eight_devices_equals_one(batch):
    """The batch sharded over (data, fsdp) of an 8-device mesh: the loss and its gradients
    are those of one device (the loss sees the global batch, not per-device slices)."""
    rng = np.random.default_rng(5)
    n, k, d = 16, 2, 8
    q = rng.normal(size=(n, d)).astype(np.float32)
    p = (q + rng.normal(size=(n, d))).astype(np.float32)
    negatives = rng.normal(size=(n, k, d)).astype(np.float32)
    mask = np.arange(n) != 5

    def loss(q, p, negatives, log_tau):
        tau = learned_temperature(log_tau, 0.01, 1.0)
        return info_nce_loss(q, p, tau, mask, True, negatives)

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 3)))
    one = grad_fn(q, p, negatives, jnp.float32(np.log(0.02)))
    mesh = sharding.make_mesh((2, 4, 1))
    put = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, x.ndim))
    many = grad_fn(put(q), put(p), put(negatives), jnp.float32(np.log(0.02)))
    assert len(many[1][0].sharding.device_set) == 8
    np.testing.assert_allclose(float(many[0]), float(one[0]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(many[1]), jax.tree.leaves(one[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def _pair_batch(n=6, k=2, d=16, teacher_dim=24, seed=7):
    """Student heads [n, 2 + k, d] (two heads) and teachers [n, 2 + k, teacher_dim]."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(n, 2 + k, teacher_dim)).astype(np.float32)
    heads = {
        "dense_24": (teacher + 0.5 * rng.normal(size=teacher.shape)).astype(np.float32),
        "dense_8": rng.normal(size=(n, 2 + k, 8)).astype(np.float32),
    }
    return heads, teacher


def _gor(x):
    x = _unit(x.astype(np.float64))
    g = x @ x.T
    return (np.sum(g**2) - np.trace(g**2)) / (len(x) * (len(x) - 1))


def test_pair_loss_contrastive_and_gor_equal_numpy():
    """Distillation off: w_nce * mean over heads of InfoNCE(query -> positive, in-batch and hard
    negatives, learned tau) + w_gor * mean over heads of GOR(queries) + GOR(positives); the
    gradient in log(tau) too."""
    heads, teacher = _pair_batch()
    config = LossConfig(
        cosine_weight=0.0,
        similarity_weight=0.0,
        resim_weight=0.0,
        infonce_weight=2.0,
        gor_weight=0.5,
        temperature_range=(0.01, 1.0),
    )
    mask = np.ones(len(teacher), bool)

    def numpy_total(log_tau):
        nce = [
            numpy_info_nce(x[:, 0], x[:, 1], np.exp(log_tau), mask, negatives=x[:, 2:])
            for x in heads.values()
        ]
        gor = [_gor(x[:, 0]) + _gor(x[:, 1]) for x in heads.values()]
        return 2.0 * np.mean(nce) + 0.5 * np.mean(gor)

    def total(log_tau):
        student = {PAIRS: heads, LOG_TEMPERATURE: jnp.broadcast_to(log_tau, (len(teacher),))}
        return pair_loss(student, teacher, config)

    log_tau = np.log(0.05)
    (value, metrics), grad = jax.value_and_grad(total, has_aux=True)(jnp.float32(log_tau))
    np.testing.assert_allclose(float(value), numpy_total(log_tau), rtol=1e-5)
    eps = 1e-5
    want = (numpy_total(log_tau + eps) - numpy_total(log_tau - eps)) / (2 * eps)
    np.testing.assert_allclose(float(grad), want, rtol=1e-4)
    assert float(metrics["temperature"]) == pytest.approx(0.05, rel=1e-6)
    assert {"infonce", "infonce/dense_24", "infonce/dense_8", "gor", "total"} <= set(metrics)
    assert "sim/dense_24" not in metrics  # distillation off


def test_pair_loss_distillation_sees_every_text_and_fixed_temperature():
    """The distillation terms are `distillation_loss` over all n * m texts; without a learned
    temperature InfoNCE uses the fixed one."""
    heads, teacher = _pair_batch()
    config = LossConfig(infonce_weight=1.0, infonce_temperature=0.1, infonce_symmetric=True)
    total, metrics = pair_loss({PAIRS: heads}, teacher, config)
    n, m = teacher.shape[:2]
    flat = {h: x.reshape(n * m, -1) for h, x in heads.items()}
    plain = dataclasses.replace(config, infonce_weight=0.0)
    distill, _ = distillation_loss(flat, teacher.reshape(n * m, -1), plain)
    mask = np.ones(n, bool)
    nce = np.mean(
        [
            numpy_info_nce(x[:, 0], x[:, 1], 0.1, mask, negatives=x[:, 2:], symmetric=True)
            for x in heads.values()
        ]
    )
    np.testing.assert_allclose(float(total), float(distill) + nce, rtol=1e-5)
    assert float(metrics["temperature"]) == pytest.approx(0.1)
