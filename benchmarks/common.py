"""Shared by the benchmarks: printing a table and appending it to `benchmarks/results.md`."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).with_name("results.md")


def machine() -> str:
    import jax

    devices = jax.devices()
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"jax {jax.__version__} on {len(devices)} x {devices[0].device_kind}"
    )


def table(headers: list[str], rows: list[list[object]]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def report(title: str, headers: list[str], rows: list[list[object]], note: str = "") -> None:
    """Prints the table and appends it, dated and with the machine, to results.md."""
    text = table(headers, rows)
    print(f"\n{title}\n{text}\n{note}")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with RESULTS.open("a", encoding="utf-8") as f:
        f.write(f"\n## {title}\n{stamp}; {machine()}\n\n{text}\n{note}\n")
