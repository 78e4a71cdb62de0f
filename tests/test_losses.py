"""Losses against independent float64 NumPy transcriptions of SPEC section 2 / PAPER 2.2 and 8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jasper_jax import losses
from jasper_jax.vectors import l2_normalize

MARGIN = 0.015
RTOL = 1e-5


# --- NumPy references: literal formulas, float64, no masking (tests compact the batch instead) --


def np_normalize(x):
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_cosine(s, t):
    return np.mean(1.0 - np.sum(np_normalize(s) * np_normalize(t), axis=-1))


def np_sim(s, t):
    s, t = np_normalize(s), np_normalize(t)
    return np.mean((s @ s.T - t @ t.T) ** 2)


def np_resim(s, t, margin=MARGIN, tie_label=-1.0):
    """The reference's O(P^2) form: row-major upper-triangle pairs, then pairs of pairs a < b."""
    s, t = np_normalize(s), np_normalize(t)
    rows, cols = np.triu_indices(len(s), k=1)
    p_s, p_t = (s @ s.T)[rows, cols], (t @ t.T)[rows, cols]
    d_s = p_s[None, :] - p_s[:, None]  # d[a, b] = p[b] - p[a]
    d_t = p_t[None, :] - p_t[:, None]
    label = np.where(d_t < 0, 1.0, np.where(d_t == 0, tie_label, -1.0))
    upper = np.triu(np.ones_like(d_s, dtype=bool), k=1)
    return np.mean(np.maximum(label * d_s + margin, 0.0)[upper])


def np_mrl(s, t, dims):
    sims = [np_sim(s[:, :d], t) for d in dims]
    resims = [np_resim(s[:, :d], t) for d in dims]
    return np.mean(sims), np.mean(resims)


def np_logsumexp(x, axis):
    top = np.max(x, axis=axis, keepdims=True)
    return np.log(np.sum(np.exp(x - top), axis=axis)) + np.squeeze(top, axis)


def np_info_nce(q, p, temperature, symmetric=False):
    logits = np_normalize(q) @ np_normalize(p).T / temperature
    forward = np.mean(np_logsumexp(logits, 1) - np.diag(logits))
    if not symmetric:
        return forward
    return 0.5 * (forward + np.mean(np_logsumexp(logits, 0) - np.diag(logits)))


def np_gor(x):
    x = np_normalize(x)
    gram = x @ x.T
    off = ~np.eye(len(x), dtype=bool)
    return np.mean(gram[off] ** 2)


def naive_resim_jax(student, teacher, margin=MARGIN):
    """Literal P x P form in JAX: a second code path whose autodiff checks the custom VJP."""
    s, t = l2_normalize(student), jax.lax.stop_gradient(l2_normalize(teacher))
    rows, cols = np.triu_indices(s.shape[0], k=1)
    p_s, p_t = (s @ s.T)[rows, cols], (t @ t.T)[rows, cols]
    a, b = np.triu_indices(p_s.shape[0], k=1)
    label = jnp.where(p_t[b] - p_t[a] < 0, 1.0, -1.0)
    return jnp.mean(jax.nn.relu(label * (p_s[b] - p_s[a]) + margin))


def random_pair(batch, student_dim=12, teacher_dim=20, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(batch, student_dim)).astype(np.float32),
        rng.normal(size=(batch, teacher_dim)).astype(np.float32),
    )


def tied_teacher(batch, seed=0):
    """Rows with exactly two ones in 6 dims: cosines are exactly 0, 0.5 or 1, so many ties."""
    rng = np.random.default_rng(seed)
    teacher = np.zeros((batch, 6), np.float32)
    for row in teacher:
        row[rng.choice(6, size=2, replace=False)] = 1.0
    return teacher


# --- values --------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [2, 3, 5, 16, 33])
def test_losses_match_numpy(batch):
    s, t = random_pair(batch, seed=batch)
    t_full = random_pair(batch, student_dim=12, seed=batch + 100)[0]
    np.testing.assert_allclose(losses.cosine_loss(s, t_full), np_cosine(s, t_full), rtol=RTOL)
    np.testing.assert_allclose(losses.similarity_loss(s, t), np_sim(s, t), rtol=RTOL)
    if batch > 2:  # B = 2 has no pair-of-pairs terms; see test_resim_is_zero_without_terms
        np.testing.assert_allclose(losses.relative_similarity_loss(s, t), np_resim(s, t), rtol=RTOL)
    np.testing.assert_allclose(losses.global_orthogonal_regularizer(s), np_gor(s), rtol=RTOL)


@pytest.mark.parametrize("batch", [5, 16, 33])
def test_resim_with_teacher_ties_matches_reference(batch):
    s, _ = random_pair(batch, seed=batch)
    t = tied_teacher(batch, seed=batch)
    expected = np_resim(s, t)
    np.testing.assert_allclose(losses.relative_similarity_loss(s, t), expected, rtol=RTOL)
    # The data really has ties: labelling them +1 instead of -1 gives another value.
    assert not np.isclose(np_resim(s, t, tie_label=1.0), expected, rtol=1e-3)


@pytest.mark.parametrize("block_size", [1, 7, 64, 119, 120, 121, 1000])
def test_resim_blockwise_equals_reference_for_any_block_size(block_size):
    s, t = random_pair(16, seed=3)  # P = 120 pairs; block sizes below, at and above P
    value = losses.relative_similarity_loss(s, t, block_size=block_size)
    np.testing.assert_allclose(value, np_resim(s, t), rtol=RTOL)


def test_bf16_inputs_accumulate_in_float32():
    s, t = random_pair(16, teacher_dim=12, seed=4)
    s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    s64, t64 = np.asarray(s16, np.float64), np.asarray(t16, np.float64)  # the same rounded values
    for loss, ref in [
        (losses.cosine_loss, np_cosine),
        (losses.similarity_loss, np_sim),
        (losses.relative_similarity_loss, np_resim),
    ]:
        value = loss(s16, t16)
        assert value.dtype == jnp.float32
        np.testing.assert_allclose(value, ref(s64, t64), rtol=RTOL)


def test_matryoshka_matches_numpy():
    s, t = random_pair(16, student_dim=32, teacher_dim=48, seed=5)
    dims = (8, 16, 32)
    sim, resim = losses.matryoshka_losses(s, t, dims, block_size=50)
    expected_sim, expected_resim = np_mrl(s, t, dims)
    np.testing.assert_allclose(sim, expected_sim, rtol=RTOL)
    np.testing.assert_allclose(resim, expected_resim, rtol=RTOL)


@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_matches_numpy(symmetric):
    q, p = random_pair(9, student_dim=16, teacher_dim=16, seed=6)
    value = losses.info_nce_loss(q, p, temperature=0.05, symmetric=symmetric)
    np.testing.assert_allclose(value, np_info_nce(q, p, 0.05, symmetric), rtol=RTOL)


def test_resim_is_zero_without_terms():
    # B = 2 has P = 1 pair and so no pair of pairs: 0 by definition (the reference gives NaN).
    s, t = random_pair(2, seed=7)
    assert losses.relative_similarity_loss(s, t) == 0.0
    grad = jax.grad(losses.relative_similarity_loss)(jnp.asarray(s), t)
    np.testing.assert_array_equal(grad, 0.0)
    # Fewer than 3 valid rows in a larger batch behaves the same way.
    s, t = random_pair(6, seed=7)
    mask = np.array([1, 0, 0, 1, 0, 0], bool)
    assert losses.relative_similarity_loss(s, t, mask=mask) == 0.0


# --- masks: a masked loss equals the loss of the batch without the invalid rows -------------


def test_masked_losses_equal_losses_on_valid_rows():
    s, t = random_pair(11, teacher_dim=12, seed=8)
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1], bool)
    s[~mask] = 1e3  # garbage in padded rows must not leak
    t[~mask] = 0.0  # zero rows (typical padding) must not produce NaN
    sv, tv = s[mask], t[mask]
    cases = [
        (losses.cosine_loss, np_cosine(sv, tv)),
        (losses.similarity_loss, np_sim(sv, tv)),
        (lambda a, b, mask: losses.relative_similarity_loss(a, b, block_size=9, mask=mask),
         np_resim(sv, tv)),
        (lambda a, b, mask: losses.info_nce_loss(a, b, 0.05, mask, symmetric=True),
         np_info_nce(sv, tv, 0.05, symmetric=True)),
        (lambda a, b, mask: losses.global_orthogonal_regularizer(a, mask), np_gor(sv)),
    ]  # fmt: skip
    for loss, expected in cases:
        np.testing.assert_allclose(loss(s, t, mask=mask), expected, rtol=RTOL)
    sim, resim = losses.matryoshka_losses(s, t, (4, 12), mask=mask)
    np.testing.assert_allclose([sim, resim], np_mrl(sv, tv, (4, 12)), rtol=RTOL)


def test_masked_rows_get_no_gradient():
    s, t = random_pair(8, seed=9)
    mask = np.array([1, 1, 1, 0, 1, 1, 1, 0], bool)
    loss = lambda x: (
        losses.similarity_loss(x, t, mask) + losses.relative_similarity_loss(x, t, mask=mask)
    )
    grad = np.asarray(jax.grad(loss)(jnp.asarray(s)))
    np.testing.assert_array_equal(grad[~mask], 0.0)
    assert np.all(np.isfinite(grad)) and np.any(grad[mask] != 0)


# --- gradients and jit ---------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [5, 64, None])
def test_resim_custom_gradient_equals_autodiff_of_naive_form(block_size):
    s, t = random_pair(12, seed=10)
    t = np.concatenate([t[:6], t[:6]])  # duplicate rows: exact teacher ties
    ours = jax.value_and_grad(losses.relative_similarity_loss)
    naive = jax.value_and_grad(naive_resim_jax)
    (value, grad), (ref_value, ref_grad) = ours(s, t, block_size=block_size), naive(s, t)
    np.testing.assert_allclose(value, ref_value, rtol=RTOL)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_matryoshka_gradient_equals_per_dim_autodiff():
    s, t = random_pair(10, student_dim=16, seed=11)
    dims = (4, 16)
    ours = jax.grad(lambda x: losses.matryoshka_losses(x, t, dims, block_size=17)[1])(s)
    ref = jax.grad(lambda x: jnp.mean(jnp.stack([naive_resim_jax(x[:, :d], t) for d in dims])))(s)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7)


def test_teacher_gets_no_gradient_and_jit_matches_eager():
    s, t = random_pair(7, teacher_dim=12, seed=12)
    for loss in [losses.cosine_loss, losses.similarity_loss, losses.relative_similarity_loss]:
        grad_t = jax.grad(loss, argnums=1)(jnp.asarray(s), jnp.asarray(t))
        np.testing.assert_array_equal(grad_t, 0.0)
        np.testing.assert_allclose(jax.jit(loss)(s, t), loss(s, t), rtol=1e-6)


def test_resim_memory_at_batch_512_is_bounded():
    """Compiled (not run) forward + backward at B = 512: the naive form needs ~70 GB."""
    s = jax.ShapeDtypeStruct((512, 64), jnp.float32)
    t = jax.ShapeDtypeStruct((512, 96), jnp.float32)
    step = jax.jit(jax.value_and_grad(losses.relative_similarity_loss))
    stats = step.lower(s, t).compile().memory_analysis()
    assert stats.temp_size_in_bytes < 256 * 2**20  # the target is 2 GiB; we use ~20 MiB


@pytest.mark.slow
def test_resim_batch_512_forward_backward_runs():
    s, t = random_pair(512, student_dim=64, teacher_dim=96, seed=13)
    value, grad = jax.jit(jax.value_and_grad(losses.relative_similarity_loss))(s, t)
    assert np.isfinite(value) and 0.0 < value < 1.0
    assert np.all(np.isfinite(grad))


# --- the combined objective ------------------------------------------------------------------


def test_distillation_loss_combines_heads_as_documented():
    rng = np.random.default_rng(14)
    teacher = rng.normal(size=(9, 24)).astype(np.float32)
    heads = {name: rng.normal(size=(9, d)).astype(np.float32) for name, d in
             [("fc1", 24), ("fc2", 8), ("fc3", 4)]}  # fmt: skip
    total, metrics = losses.distillation_loss(heads, teacher)
    per_head = [200 * np_sim(x, teacher) + 20 * np_resim(x, teacher) for x in heads.values()]
    expected = 10 * np_cosine(heads["fc1"], teacher) + np.mean(per_head)
    np.testing.assert_allclose(total, expected, rtol=RTOL)
    assert set(metrics) == {"cos/fc1", "total"} | {f"{k}/{h}" for k in ("sim", "resim")
                                                      for h in heads}  # fmt: skip
    np.testing.assert_allclose(metrics["resim/fc3"], np_resim(heads["fc3"], teacher), rtol=RTOL)
    grads = jax.grad(lambda h: losses.distillation_loss(h, teacher)[0])(heads)
    assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in grads.values())


def test_distillation_loss_mrl_infonce_gor_and_jit():
    s, t = random_pair(8, student_dim=16, teacher_dim=16, seed=15)
    q, p = random_pair(6, student_dim=5, teacher_dim=5, seed=16)
    config = losses.LossConfig(mrl_dims=(4, 16), infonce_weight=0.5, gor_weight=2.0)
    run = jax.jit(lambda s, t, q, p: losses.distillation_loss({"full": s}, t, config, pairs=(q, p)))
    total, metrics = run(s, t, q, p)
    sim, resim = np_mrl(s, t, (4, 16))
    expected = 10 * np_cosine(s, t) + 200 * sim + 20 * resim
    expected += 0.5 * np_info_nce(q, p, 0.05) + 2.0 * np_gor(s)
    np.testing.assert_allclose(total, expected, rtol=RTOL)
    np.testing.assert_allclose(metrics["resim/full"], resim, rtol=RTOL)


def test_distillation_loss_with_a_teacher_per_head_averages_heads():
    rng = np.random.default_rng(17)
    heads = {f"h{d}": rng.normal(size=(6, d)).astype(np.float32) for d in (8, 4)}
    teachers = {f"h{d}": rng.normal(size=(6, d)).astype(np.float32) for d in (8, 4)}
    total, metrics = losses.distillation_loss(heads, teachers)
    expected = np.mean([
        10 * np_cosine(heads[k], teachers[k]) + 200 * np_sim(heads[k], teachers[k])
        + 20 * np_resim(heads[k], teachers[k]) for k in heads
    ])  # fmt: skip
    np.testing.assert_allclose(total, expected, rtol=RTOL)
    assert "cos/h4" in metrics and "cos/h8" in metrics


# --- errors a person can act on --------------------------------------------------------------


def test_errors_name_the_problem():
    s, t = random_pair(4, student_dim=8, teacher_dim=12)
    with pytest.raises(ValueError, match="student dim 8 != teacher dim 12"):
        losses.cosine_loss(s, t)
    with pytest.raises(ValueError, match="student batch 3 != teacher batch 4"):
        losses.similarity_loss(s[:3], t)
    with pytest.raises(ValueError, match="dims are empty"):
        losses.matryoshka_losses(s, t, ())
    with pytest.raises(ValueError, match=r"\[9\] are outside \[1, 8\]"):
        losses.matryoshka_losses(s, t, (4, 9))
    with pytest.raises(ValueError, match="mask must have shape"):
        losses.similarity_loss(s, t, mask=np.ones(5, bool))
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        losses.relative_similarity_loss(s, t, block_size=0)
    with pytest.raises(ValueError, match="LossConfig.mrl_dims is empty"):
        losses.LossConfig(mrl_dims=())
    with pytest.raises(ValueError, match="infonce_temperature"):
        losses.LossConfig(infonce_temperature=0.0)
    with pytest.raises(ValueError, match="no `pairs="):
        losses.distillation_loss({"a": s}, s, losses.LossConfig(infonce_weight=1.0))
    with pytest.raises(ValueError, match=r"no teacher vectors for heads \['b'\]"):
        losses.distillation_loss({"a": s, "b": s}, {"a": s})
