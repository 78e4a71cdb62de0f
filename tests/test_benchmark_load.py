"""benchmarks/common.py: a run while other processes use the CPU is seen and not recorded."""

from __future__ import annotations

import subprocess
import sys
import time

from benchmarks import common


def test_other_processes_cpu_is_seen():
    start = common.snapshot()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.5)
        load = common.load_since(start)
    finally:
        spinner.kill()
        spinner.wait()
    assert load.other_cores > 0.5, load
    assert load.busy
    assert "BUSY" in load.line()


def test_own_work_is_not_counted_as_others():
    start = common.snapshot()
    end = time.process_time() + 1.0
    while time.process_time() < end:  # this process: one core busy for 1 s of its own CPU
        pass
    load = common.load_since(start)
    # Whatever else runs beside the test (other test workers) adds to this; our own second of
    # CPU must not: with it counted, a lone run would read >= 0.9.
    assert load.other_cores < 0.9 + _others_now(), load


def _others_now() -> float:
    start = common.snapshot()
    time.sleep(0.5)
    return common.load_since(start).other_cores


def test_busy_run_is_printed_but_not_appended(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results.md"
    monkeypatch.setattr(common, "RESULTS", results)
    busy = common.Load(load_before=1.8, load_after=2.5, other_cores=1.0)
    monkeypatch.setattr(common, "load_since", lambda: busy)
    monkeypatch.delenv("JASPER_BENCH_ALLOW_BUSY", raising=False)
    assert not common.report("t", ["a"], [[1.0]])
    assert not results.exists()
    assert "not appended" in capsys.readouterr().out

    monkeypatch.setenv("JASPER_BENCH_ALLOW_BUSY", "1")
    assert common.report("t", ["a"], [[1.0]])
    assert "BUSY" in results.read_text()

    monkeypatch.delenv("JASPER_BENCH_ALLOW_BUSY")
    quiet = common.Load(load_before=0.1, load_after=1.9, other_cores=0.05)
    monkeypatch.setattr(common, "load_since", lambda: quiet)
    assert common.report("t2", ["a"], [[2.0]])
    assert "quiet" in results.read_text().split("## t2")[1]
