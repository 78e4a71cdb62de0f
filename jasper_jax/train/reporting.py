"""Progress lines (step, losses, steps/s, tokens/s, ETA, MFU) and TensorBoard scalars."""

from __future__ import annotations

import datetime
import json
import logging
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
    """FLOPs of one step from XLA's cost analysis of the compiled step (None if unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # not every backend implements it
        return None
    cost = cost[0] if isinstance(cost, list) else cost
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


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
    """Rates over the interval since the previous report; ETA from the latest rate."""

    def __init__(self, label: str, total_steps: int, start_step: int):
        self.label, self.total = label, total_steps
        self._last_step, self._last_time = start_step, time.perf_counter()
        self._tokens, self._flops = 0.0, 0.0
        peak = peak_flops_per_device(jax.devices()[0].device_kind)
        self._peak = peak * jax.device_count() if peak else None

    def add_step(self, tokens: float, flops: float | None) -> None:
        """One step's tokens and FLOPs (None: the backend gave no cost analysis, so no MFU)."""
        self._tokens += tokens
        self._flops = None if flops is None or self._flops is None else self._flops + flops

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` (e.g. compiling a new batch shape) out of the current interval."""
        self._last_time += seconds

    def report(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        steps_per_s = (step - self._last_step) / elapsed
        rates = {"steps_per_s": steps_per_s, "tokens_per_s": self._tokens / elapsed}
        if self._flops and self._peak:
            rates["mfu"] = self._flops / elapsed / self._peak
        eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("nan")
        losses = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k.split("/")[0] in _SHOWN)
        mfu = f" | MFU {rates['mfu']:.1%}" if "mfu" in rates else ""
        log.info(
            "%s step %d/%d | %s | %.2f steps/s %.0f tokens/s | ETA %s%s",
            self.label,
            step,
            self.total,
            losses,
            steps_per_s,
            rates["tokens_per_s"],
            datetime.timedelta(seconds=round(eta)) if eta == eta else "?",
            mfu,
        )
        self._last_step, self._last_time, self._tokens, self._flops = step, now, 0.0, 0.0
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
