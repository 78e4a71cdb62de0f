"""Activation sharding constraints (issue 20 part 4): the encoders pin the batch axis of their
hidden states to the `act_batch` rule on the ambient mesh; that changes the layout only, never
a number."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from jasper_jax import sharding
from jasper_jax.losses import LossConfig
from jasper_jax.models.embedder import Embedder, EmbedderConfig, abstract_params
from jasper_jax.train.state import init_state
from jasper_jax.train.step import make_train_step, text_forward
from tests.test_attention import encoder_cases

MESH = (2, 2, 2)  # (data, fsdp, tensor): act_batch -> ("data", "fsdp"), 4-way


def rows(n=8, length=13, vocab=50):
    rng = np.random.RandomState(0)
    mask = (np.arange(length)[None] < rng.randint(1, length + 1, (n, 1))).astype(np.int32)
    ids = np.where(mask, rng.randint(2, vocab, mask.shape), 1).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(mask)


def placed(cfg, mesh, ids, mask):
    params = nn.meta.unbox(Embedder(cfg).init(jax.random.key(1), ids[:1], mask[:1])["params"])
    params = jax.device_put(params, sharding.param_shardings(abstract_params(cfg), mesh))
    batch = [jax.device_put(x, sharding.batch_sharding(mesh, 2)) for x in (ids, mask)]
    return params, batch


def constraints_in(lowered) -> int:
    return lowered.as_text().count("sharding_constraint")


@pytest.mark.parametrize("name", ["bert", "mpnet", "qwen2"])
def test_encoder_outputs_equal_with_and_without_constraints(name):
    _, encoder = encoder_cases()[name]
    cfg = EmbedderConfig(encoder=encoder, heads=(8,))
    mesh = sharding.make_mesh(MESH)
    params, (ids, mask) = placed(cfg, mesh, *rows())
    model = Embedder(cfg)

    def run(params, ids, mask, ambient):
        with sharding.mesh_context(mesh if ambient else None):
            return model.apply({"params": params}, ids, mask, heads=("pooled", "dense_8"))

    fns = {a: jax.jit(lambda *x, a=a: run(*x, a)) for a in (True, False)}
    # one constraint on the embeddings and one per layer, only with the mesh in context
    layers = encoder.num_hidden_layers
    assert constraints_in(fns[True].lower(params, ids, mask)) == layers + 1
    assert constraints_in(fns[False].lower(params, ids, mask)) == 0
    got, want = fns[True](params, ids, mask), fns[False](params, ids, mask)
    for head in want:
        np.testing.assert_allclose(got[head], want[head], atol=1e-6, rtol=1e-6)


def test_train_step_equal_with_and_without_constraints():
    _, encoder = encoder_cases()["qwen2"]
    cfg = EmbedderConfig(encoder=encoder, heads=(8,))
    mesh = sharding.make_mesh(MESH)
    ids, mask = rows()
    params, (ids, mask) = placed(cfg, mesh, ids, mask)
    teacher = jax.device_put(
        np.random.RandomState(2).randn(8, 8).astype(np.float32), sharding.batch_sharding(mesh, 2)
    )
    batch = {"input_ids": ids, "attention_mask": mask, "teacher": teacher}
    paths = frozenset(traverse_util.flatten_dict(params))
    tx = optax.sgd(1.0)  # the parameter change is minus the gradient (Adam would amplify the
    # float32 noise of near-zero gradients)
    forward = text_forward(Embedder(cfg, remat="full"), cfg.head_names, dropout=False)
    state = jax.jit(lambda p: init_state(p, paths, tx, seed=0))(params)
    out = {}
    for ambient in (True, False):
        step = make_train_step(
            forward,
            LossConfig(cosine_weight=1.0, similarity_weight=1.0, resim_weight=1.0),
            tx,
            paths,
            optax.constant_schedule(1.0),
            mesh=mesh if ambient else None,
        )
        fn = jax.jit(step)
        assert (constraints_in(fn.lower(state, batch)) > 0) == ambient
        new_state, metrics = fn(state, batch)
        out[ambient] = (jax.tree.map(np.asarray, new_state.params), metrics)
    (p_on, m_on), (p_off, m_off) = out[True], out[False]
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(m_on[key], m_off[key], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p_on), jax.tree.leaves(p_off), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)


def test_constraint_is_a_no_op_where_nothing_applies():
    x = jnp.ones((3, 5, 4))
    assert sharding.constrain_activation(x, ("act_batch", None, None)) is x  # no mesh
    with sharding.mesh_context(sharding.make_mesh((1, 1, 1))):
        assert sharding.constrain_activation(x, ("act_batch", None, None)) is x  # one device
    mesh = sharding.make_mesh(MESH)

    def lowered(n):
        def f(x):
            with sharding.mesh_context(mesh):
                return sharding.constrain_activation(x, ("act_batch", None, None)) * 2

        return jax.jit(f).lower(jax.device_put(jnp.ones((n, 5, 4)), sharding.replicated(mesh)))

    assert constraints_in(lowered(3)) == 0  # 3 rows: no batch axis divides, nothing pinned
    assert constraints_in(lowered(8)) == 1
    # the batch dimension pinned over (data, fsdp); the rest left to XLA
    assert '{"data", "fsdp"}, {?}, {?}' in lowered(8).as_text()
