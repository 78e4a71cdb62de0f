"""Shared by the benchmarks: the machine's load, printing a table, appending it to results.md.

A speed figure is only worth keeping when nothing else used the CPU while it was taken. At
import this module notes the load average, the CPU time the whole machine has spent
(`/proc/stat`) and the CPU time of this process; `report` compares them again, so it knows how
many cores *other* processes used during the run. A busy run is printed but not appended to
`results.md`, unless `JASPER_BENCH_ALLOW_BUSY=1` (and then the row says it was busy).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import resource
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("results.md")
# Cores other processes may use during a run before it counts as busy. (The load average is
# printed too, but it also holds this process's own recent work and decays over minutes: a run
# started just after another benchmark would read busy with nothing else running.)
BUSY_CORES = 0.25


@dataclasses.dataclass(frozen=True)
class CpuSnapshot:
    """Wall time, the machine's busy CPU seconds, and this process tree's CPU seconds."""

    wall: float
    machine_busy: float
    own: float
    load: float


def _machine_busy_seconds() -> float:
    """CPU seconds all processes spent not idle since boot (user+nice+system+irq+softirq+steal)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def snapshot() -> CpuSnapshot:
    own = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        own += usage.ru_utime + usage.ru_stime
    return CpuSnapshot(time.monotonic(), _machine_busy_seconds(), own, os.getloadavg()[0])


START = snapshot()


@dataclasses.dataclass(frozen=True)
class Load:
    """How quiet the machine was between two snapshots."""

    load_before: float
    load_after: float
    other_cores: float  # mean cores used by processes other than this one (and its children)

    @property
    def busy(self) -> bool:
        return self.other_cores > BUSY_CORES

    def line(self) -> str:
        state = "BUSY" if self.busy else "quiet"
        return (
            f"load average {self.load_before:.2f} before, {self.load_after:.2f} after (this "
            f"run's own work included); other processes used {self.other_cores:.2f} cores "
            f"during the run: {state}"
        )


def load_since(start: CpuSnapshot = START) -> Load:
    now = snapshot()
    wall = max(now.wall - start.wall, 1e-9)
    others = (now.machine_busy - start.machine_busy) - (now.own - start.own)
    return Load(start.load, now.load, max(others, 0.0) / wall)


def memory_mb(field: str = "VmRSS") -> float:
    """This process's memory figure `field` of /proc/self/status in MB (VmRSS: now; VmHWM: the
    peak since start or since "5" was written to /proc/self/clear_refs). Linux only."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_model() -> str:
    """The CPU as /proc/cpuinfo names it, with family and model numbers: VMs of one name can
    be different generations (an "AMD EPYC" of family 25 runs AVX-512 at half the width of
    one of family 26), so figures from different runs compare only on the same line."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                name, _, value = line.partition(":")
                fields[name.strip()] = value.strip()
    except OSError:
        return platform.processor() or platform.machine()
    return (
        f"{fields.get('model name', platform.machine())} (family {fields.get('cpu family', '?')}"
        f", model {fields.get('model', '?')})"
    )


def machine() -> str:
    import jax

    devices = jax.devices()
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {len(devices)} x {devices[0].device_kind}"
    )


def table(headers: list[str], rows: list[list[object]]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, headers: list[str], rows: list[list[object]], note: str = "") -> bool:
    """Prints the table with the machine's load; appends it, dated, to results.md when the
    machine was quiet (or `JASPER_BENCH_ALLOW_BUSY=1`). Returns whether it was appended."""
    load = load_since()
    text = table(headers, rows)
    print(f"\n{title}\n{text}\n{note}\n{load.line()}")
    if load.busy and os.environ.get("JASPER_BENCH_ALLOW_BUSY") != "1":
        print(
            "not appended to results.md: the machine was busy, so these figures are not the "
            "project's speed; re-run on a quiet machine (or set JASPER_BENCH_ALLOW_BUSY=1)"
        )
        return False
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(f"\n## {title}\n{stamp}; {machine()}\n\n{text}\n{note}\n{load.line()}\n")
    return True
