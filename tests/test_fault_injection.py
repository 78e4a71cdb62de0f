"""Fault injection, quick: `teachers` and `train` CLI runs killed (SIGKILL, SIGTERM) and resumed
end bit-identical to an uninterrupted run (benchmarks/fault_injection.py has the long run)."""

import random

import pytest

from benchmarks import fault_injection as fi

# Kill times as fractions of the expected run time, or as soon as a run makes progress: so that
# every signal hits a running process, however loaded the machine.
QUICK = dict(max_rounds=3, measure_rerun=False, window=(0.3, 0.8), on_progress=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple:
    root = tmp_path_factory.mktemp("faults")
    texts = 2 * fi._chunk_size() + 50  # three resumable chunks, then the combine step
    return root, fi.make_setup(root, texts, train_texts=128), texts


def _check(result: dict, kills: int) -> None:
    assert result["kills"] >= kills, result
    assert result["identical"], [r["differences"] for r in result["rounds"]]
    for r in result["rounds"]:
        for a in r["attempts"]:
            assert a["rc"] in (0, 130, 143) or (a["rc"] is not None and a["rc"] < 0), a
            assert a["stragglers"] == 0, a
    assert not result["leftovers"], result["leftovers"]


def test_killed_teachers_runs_end_identical(setup):
    root, paths, texts = setup
    job = fi.teachers_job(paths, texts)
    result = fi.fault_injection(job, root, 1, random.Random(0), **QUICK)
    _check(result, 1)


def test_killed_train_runs_end_identical(setup):
    root, paths, _ = setup
    job = fi.train_job(paths, steps=6, checkpoint_every=2, head_init="random")
    result = fi.fault_injection(job, root, 2, random.Random(1), **QUICK)
    _check(result, 2)
    assert result["sigkill"] >= 1 and result["sigterm"] >= 1
