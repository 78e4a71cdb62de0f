"""MFU (issue 20 part 2): the analytic FLOP count against XLA's cost analysis of tiny loop-free
steps, MFU independent of the device count, and no figure (never a negative one) where the
FLOPs or the peak are unknown."""

import logging
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from jasper_jax import sharding
from jasper_jax.losses import LossConfig
from jasper_jax.models.attention import AttentionSettings
from jasper_jax.models.bert import BertConfig
from jasper_jax.models.embedder import Embedder, EmbedderConfig, abstract_params
from jasper_jax.models.qwen2 import Qwen2Config
from jasper_jax.train import reporting
from jasper_jax.train.flops import batch_flops, train_step_flops
from jasper_jax.train.loop import train_and_evaluate
from jasper_jax.train.state import init_state, is_trainable
from jasper_jax.train.step import make_train_step, text_forward
from tests.train_fixtures import read_metrics, tiny_settings, tiny_setup  # noqa: F401

LAYERS, ROWS, LENGTH, HEADS = 3, 8, 64, (64, 16)
MODES = ("heads", "heads+last_layers", "all")  # stages 1, 2, 3 (last_layers=1 here)


def encoder(name: str, hidden: int = 512, mlp: int = 2048):
    """Tiny students; 512 wide so matmuls dominate XLA's count (it adds elementwise ops)."""
    if name == "bert":
        return BertConfig(
            vocab_size=64,
            hidden_size=hidden,
            num_hidden_layers=LAYERS,
            num_attention_heads=4,
            intermediate_size=mlp,
            max_position_embeddings=LENGTH,
        )
    return Qwen2Config(
        vocab_size=64,
        hidden_size=hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: K/V projections half as wide as Q
        intermediate_size=mlp,
        max_position_embeddings=LENGTH,
    )


def compiled_step(cfg, mode, rows=ROWS, mesh=None, remat="none", gradcache=1):
    """(compiled train step, trainable paths, batch) on abstract inputs: dense attention,
    relative similarity off (its tile scan is a loop), no dropout."""
    model = Embedder(cfg, remat=remat, attention=AttentionSettings("dense"))
    params = nn.meta.unbox(abstract_params(cfg))
    flat = traverse_util.flatten_dict(params)
    paths = frozenset(p for p in flat if is_trainable(p, mode, LAYERS, 1))
    tx = optax.adam(1e-3)
    state = jax.eval_shape(lambda p: init_state(p, paths, tx, 0), params)
    ids = jax.ShapeDtypeStruct((rows, LENGTH), jnp.int32)
    batch = {
        "input_ids": ids,
        "attention_mask": ids,
        "teacher": jax.ShapeDtypeStruct((rows, HEADS[0]), jnp.float32),
    }
    if mesh is not None:
        rep = sharding.replicated(mesh)
        state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
        batch = {
            k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, 2))
            for k, x in batch.items()
        }
    step = make_train_step(
        text_forward(model, cfg.head_names, dropout=False),
        LossConfig(resim_weight=0.0),
        tx,
        paths,
        optax.constant_schedule(1e-3),
        gradcache_chunks=gradcache,
    )
    return jax.jit(step).lower(state, batch).compile(), paths, batch


_DEFINED = re.compile(r"%([\w.\-]+) = \w+\[([\d,]*)\]")
_DOT = re.compile(r"= \w+\[([\d,]*)\]\S* dot\(%([\w.\-]+), .*?lhs_contracting_dims=\{([\d,]*)\}")


def hlo_dot_flops(hlo: str) -> float:
    """2 x output size x contracted size, summed over the dots of optimised HLO text."""
    dims = lambda text: [int(d) for d in text.split(",") if d]
    shapes = {m.group(1): dims(m.group(2)) for m in _DEFINED.finditer(hlo)}
    total = 0.0
    for m in _DOT.finditer(hlo):
        lhs = shapes[m.group(2)]
        total += 2.0 * math.prod(dims(m.group(1))) * math.prod(lhs[i] for i in dims(m.group(3)))
    return total


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["bert", "qwen2"])
def test_analytic_count_matches_xla(name, mode):
    cfg = EmbedderConfig(encoder=encoder(name), heads=HEADS)
    compiled, paths, batch = compiled_step(cfg, mode)
    hlo = compiled.as_text()
    assert not re.search(r"\swhile\(", hlo)  # loop-free: XLA counts every op once
    analytic = batch_flops(cfg, paths, batch).total
    assert analytic == train_step_flops(cfg, paths, ROWS, LENGTH).total
    xla = reporting.step_flops(compiled)
    # XLA's count adds norms, softmax, GELU, Adam: within 5% at this width
    assert abs(analytic / xla - 1) < 0.05, (analytic, xla)
    # its matmuls alone: the backward rules (dW where a weight trains, dX where anything
    # earlier does) are exactly what XLA keeps; the rest is the loss's small Gram matrices
    dots = hlo_dot_flops(hlo)
    assert abs(analytic / dots - 1) < 1e-3, (analytic, dots)


def test_stage_counts_follow_the_6n_rule():
    """All trained: 6 x matmul params x tokens + 12 x layers x length x tokens x attention width
    (PaLM's formula); only the heads trained: the encoder runs forward only."""
    cfg = EmbedderConfig(encoder=Qwen2Config(), heads=(12288,))  # the paper's 1.5B student
    e, rows, length = cfg.encoder, 128, 512
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract_params(cfg)))
    tokens, width = rows * length, e.num_attention_heads * e.head_dim
    n_layer = sum(
        math.prod(v.shape) for p, v in flat.items() if p[-1] == "kernel" and p[0] == "encoder"
    )
    head = e.hidden_size * 12288
    for mode, want in [
        ("all", 6 * n_layer * tokens + 12 * e.num_hidden_layers * length * tokens * width),
        ("heads", 2 * n_layer * tokens + 4 * e.num_hidden_layers * length * tokens * width),
    ]:
        paths = [p for p in flat if is_trainable(p, mode, e.num_hidden_layers, 3)]
        got = train_step_flops(cfg, paths, rows, length)
        heads = (6 if mode == "all" else 4) * head * rows
        assert got.total == pytest.approx(want + heads, rel=1e-12)
    # pair batches [n, m, L] are n * m texts; stage 4's vision task is not counted
    shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
    assert batch_flops(cfg, paths, {"input_ids": shape(16, 8, 512)}) == got
    assert batch_flops(object(), paths, {"input_ids": shape(128, 512)}) is None


def test_remat_counts_as_hfu_and_loops_are_lower_bounds():
    cfg = EmbedderConfig(encoder=encoder("qwen2", 64, 128), heads=HEADS)
    compiled, paths, batch = compiled_step(cfg, "all", remat="full")
    analytic = batch_flops(cfg, paths, batch).total
    cost = reporting.step_cost(compiled, analytic, "full")
    assert cost.xla_label == "HFU" and not cost.loops
    # the forward runs twice: XLA's matmuls exceed the model's by about a third
    assert hlo_dot_flops(compiled.as_text()) > 1.25 * analytic
    compiled, _, _ = compiled_step(cfg, "all", gradcache=2)
    cost = reporting.step_cost(compiled, analytic, "none")
    assert cost.xla_label == "XLA" and cost.loops  # chunk scans: XLA counts one chunk


def _fake_clock(monkeypatch, seconds: float) -> None:
    """Each report interval lasts `seconds`."""
    ticks = iter(np.arange(0.0, 1000.0 * seconds, seconds))
    monkeypatch.setattr(reporting.time, "perf_counter", lambda: float(next(ticks)))


def test_mfu_does_not_depend_on_the_device_count(monkeypatch):
    """2 rows on 1 device vs 16 rows over 8 (the same per-device work), same step time."""
    cfg = EmbedderConfig(encoder=encoder("qwen2", 128, 256), heads=HEADS)
    rates, per_device = {}, {}
    for devices in (1, 8):
        mesh = sharding.make_mesh((devices, 1, 1), jax.devices()[:devices])
        compiled, paths, batch = compiled_step(cfg, "all", rows=2 * devices, mesh=mesh)
        cost = reporting.step_cost(compiled, batch_flops(cfg, paths, batch).total)
        assert cost.devices == devices
        per_device[devices] = reporting.step_flops(compiled)
        _fake_clock(monkeypatch, 0.5)
        progress = reporting.Progress("t", 10, 0, peak_per_chip=1e12)
        progress.add_step(2.0 * devices * LENGTH, cost)
        rates[devices] = progress.report(1, {})
    assert rates[8]["mfu"] == pytest.approx(rates[1]["mfu"], rel=1e-12)
    assert 0 < rates[1]["mfu"] < 1
    # XLA's module is per device: the same count for the same per-device work (the old
    # figure, divided by the device count, was 8x too small on 8)
    assert per_device[8] == pytest.approx(per_device[1], rel=0.02)
    assert rates[8]["xla_util"] == pytest.approx(rates[1]["xla_util"], rel=0.02)


class _Compiled:
    """A compiled step whose backend reports `cost` (or raises)."""

    def __init__(self, cost):
        self.cost = cost

    def cost_analysis(self):
        if isinstance(self.cost, Exception):
            raise self.cost
        return self.cost

    def as_text(self):
        return "HloModule m"


@pytest.mark.parametrize(
    "cost",
    [{"flops": -1.0}, [{"flops": -1.0}], {}, None, {"flops": float("nan")}, NotImplementedError()],
)
def test_unknown_flops_give_no_figure(cost, monkeypatch, caplog):
    assert reporting.step_flops(_Compiled(cost)) is None
    step = reporting.step_cost(_Compiled(cost), model_flops=-1.0)
    assert step.model is None and step.xla is None
    _fake_clock(monkeypatch, 1.0)
    progress = reporting.Progress("t", 10, 0, peak_per_chip=1e12)
    progress.add_step(100.0, step)
    with caplog.at_level(logging.INFO, logger="jasper_jax.train"):
        rates = progress.report(1, {"loss": 1.0})
    assert not {"mfu", "hfu", "xla_util"} & set(rates)
    assert "MFU" not in caplog.text and "XLA" not in caplog.text and "%" not in caplog.text


def test_progress_line_and_unknown_peak(monkeypatch, caplog):
    cost = reporting.StepCost(model=4.1e11, xla=4.31e11, devices=2)
    _fake_clock(monkeypatch, 1.0)
    progress = reporting.Progress("t", 10, 0, peak_per_chip=5e11)
    for _ in range(2):
        progress.add_step(10.0, cost)
    caplog.set_level(logging.INFO, logger="jasper_jax.train")
    rates = progress.report(2, {})
    assert "MFU 82.0% (XLA 86.2%)" in caplog.text
    assert rates["mfu"] == pytest.approx(0.82) and rates["xla_util"] == pytest.approx(0.862)
    hfu = reporting.StepCost(model=None, xla=1e11, devices=1, xla_label="HFU", loops=True)
    progress.add_step(10.0, hfu)
    assert progress.report(3, {}) == {"steps_per_s": 1.0, "tokens_per_s": 10.0, "hfu": 0.2}
    assert "| HFU >=20.0%" in caplog.text
    monkeypatch.setattr(reporting, "peak_flops_per_device", lambda kind: None)  # CPU
    progress = reporting.Progress("t", 10, 0)
    progress.add_step(10.0, cost)
    assert set(progress.report(1, {})) == {"steps_per_s", "tokens_per_s"}


def test_loop_reports_mfu_beside_xla(tiny_setup, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(reporting.PEAK_FLOPS, jax.devices()[0].device_kind, 1e11)
    s = tiny_settings(tiny_setup, 2, **{"train.steps": 2, "data.length_groups": 1})
    assert train_and_evaluate(s, tmp_path / "run")["status"] == "finished"
    for record in read_metrics(tmp_path / "run"):
        assert 0 < record["train/mfu"] < 1 and record["train/xla_util"] > 0
