"""Progress lines (step, losses, steps/s, tokens/s, ETA, MFU beside XLA's utilisation) and
TensorBoard scalars."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import math
import re
import time

import jax

from jasper_jax.paths import PathLike, as_path, is_remote

log = logging.getLogger("jasper_jax.train")

# Dense bf16 peak FLOP/s per chip, from the vendors' spec sheets; unknown kinds report no MFU.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(device_kind: str) -> float | None:
    for kind, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if device_kind.startswith(kind):
            return flops
    return None


def step_flops(compiled) -> float | None:
    """FLOPs of one step on one device from XLA's cost analysis of the compiled step; None
    where the backend has none or reports a non-positive or non-finite count (some report -1).

    The compiled SPMD module has per-device shapes, so this is one device's share; loop bodies
    (scans: the gradient cache, blockwise attention, the relative-similarity tiles) count once,
    and remat recomputation is included."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    cost = cost[0] if isinstance(cost, list | tuple) and cost else cost
    try:
        flops = float((cost or {}).get("flops", 0.0))
    except (TypeError, ValueError):
        return None
    return flops if math.isfinite(flops) and flops > 0 else None


def _devices(compiled) -> int:
    """Devices the compiled step runs on (all of them where its shardings do not say)."""
    try:
        leaves = jax.tree.leaves(compiled.input_shardings)
        return max(len(s.device_set) for s in leaves) if leaves else jax.device_count()
    except Exception:  # an executable without sharding information
        return jax.device_count()


def _has_loops(compiled) -> bool:
    try:
        return _WHILE.search(compiled.as_text()) is not None
    except Exception:
        return False


_WHILE = re.compile(r"\swhile\(")


@dataclasses.dataclass(frozen=True)
class StepCost:
    """FLOPs of one compiled step, over all the devices it runs on.

    Attributes:
      model: analytic model FLOPs (`jasper_jax.train.flops`), the MFU numerator; None unknown.
      xla: XLA's per-device count x devices (hardware FLOPs incl. remat); None unknown.
      devices: chips the step runs on (the MFU denominator's chip count).
      xla_label: "HFU" where the XLA count includes remat recomputation, else "XLA".
      loops: the step has while loops, which XLA counts once: its figure is a lower bound.
    """

    model: float | None
    xla: float | None
    devices: int
    xla_label: str = "XLA"
    loops: bool = False


def step_cost(compiled, model_flops: float | None, remat: bool | str = "none") -> StepCost:
    """The `StepCost` of a compiled step, given its analytic FLOPs (None: unknown)."""
    devices = _devices(compiled)
    per_device = step_flops(compiled)
    remat_on = str(remat).lower() not in ("none", "false", "")
    return StepCost(
        model=model_flops if model_flops and model_flops > 0 else None,
        xla=per_device * devices if per_device else None,
        devices=devices,
        xla_label="HFU" if remat_on else "XLA",
        loops=_has_loops(compiled),
    )


class MetricWriter:
    """TensorBoard scalars under `logdir`, and the same as JSON lines in `logdir/metrics.jsonl`
    (process 0 only; other processes write nothing). `logdir` may be a gs:// URL: cloud
    objects cannot be appended to, so there the JSON lines file is rewritten whole each time."""

    def __init__(self, logdir: PathLike):
        self._writer = None
        self._jsonl_path = as_path(logdir) / "metrics.jsonl"
        self._lines: list[str] = []
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(logdir), flush_secs=10)
            if is_remote(logdir) and self._jsonl_path.exists():
                self._lines = self._jsonl_path.read_text().splitlines()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, value, step)
        line = json.dumps({"step": step, **values})
        if is_remote(self._jsonl_path):
            self._lines.append(line)
            self._jsonl_path.write_text("\n".join(self._lines) + "\n")
        else:
            with open(self._jsonl_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class Progress:
    """Rates over the interval since the previous report; ETA from the latest rate.

    MFU = analytic model FLOPs / (peak per chip x chips x seconds) (`StepCost.model`); beside it
    the same ratio for XLA's count ("HFU" with remat, else "XLA"; ">=" where while loops make
    XLA's count a lower bound). Either is left out where its FLOPs or the chip's peak are
    unknown (CPU, an unlisted accelerator), never shown as a negative number.
    """

    def __init__(
        self, label: str, total_steps: int, start_step: int, peak_per_chip: float | None = None
    ):
        self.label, self.total = label, total_steps
        self._last_step, self._last_time = start_step, time.perf_counter()
        self._peak = peak_per_chip or peak_flops_per_device(jax.devices()[0].device_kind)
        self._reset()

    def _reset(self) -> None:
        self._tokens = 0.0
        # Seconds the interval's FLOPs take at peak on their chips; None once one is unknown.
        self._at_peak: dict[str, float | None] = {"model": 0.0, "xla": 0.0}
        self._xla_label, self._loops = "XLA", False

    def add_step(self, tokens: float, cost: StepCost | None) -> None:
        """One step's tokens and FLOPs (None: no count, so no MFU for this interval)."""
        self._tokens += tokens
        for key in self._at_peak:
            flops = getattr(cost, key, None)
            if self._at_peak[key] is None or not flops or not self._peak:
                self._at_peak[key] = None
            else:
                self._at_peak[key] += flops / (self._peak * cost.devices)
        if cost is not None:
            self._xla_label, self._loops = cost.xla_label, self._loops or cost.loops

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` (e.g. compiling a new batch shape) out of the current interval."""
        self._last_time += seconds

    def _utilisation(self, elapsed: float) -> tuple[dict[str, float], str]:
        """({"mfu": .., "hfu" | "xla_util": ..} where known, the progress-line text)."""
        model, xla = self._at_peak["model"], self._at_peak["xla"]
        rates, parts = {}, []
        if model:
            rates["mfu"] = model / elapsed
            parts.append(f"MFU {rates['mfu']:.1%}")
        if xla:
            key = "hfu" if self._xla_label == "HFU" else "xla_util"
            rates[key] = xla / elapsed
            text = f"{self._xla_label} {'>=' if self._loops else ''}{rates[key]:.1%}"
            parts.append(f"({text})" if parts else text)
        return rates, (" | " + " ".join(parts)) if parts else ""

    def report(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        steps_per_s = (step - self._last_step) / elapsed
        rates = {"steps_per_s": steps_per_s, "tokens_per_s": self._tokens / elapsed}
        utilisation, shown = self._utilisation(elapsed)
        rates.update(utilisation)
        eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("nan")
        losses = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.split("/")[0] in _SHOWN)
        log.info(
            "%s step %d/%d | %s | %.2f steps/s %.0f tokens/s | ETA %s%s",
            self.label,
            step,
            self.total,
            losses,
            steps_per_s,
            rates["tokens_per_s"],
            datetime.timedelta(seconds=round(eta)) if eta == eta else "?",
            shown,
        )
        self._last_step, self._last_time = step, now
        self._reset()
        return rates


_SHOWN = (
    "loss",
    "cos",
    "sim",
    "resim",
    "gor",
    "infonce",
    "chunk_cos",
    "chunk_sim",
    "dropped_chunks",
    "skipped",
)
