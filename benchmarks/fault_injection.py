"""Fault injection: kill `train` and `teachers` at random points, resume, compare bit for bit.

Builds a tiny set-up in WORKDIR/setup (no downloads): a random 2-layer, 32-wide BERT saved as
an HF folder (the teacher `teachers` loads by path), a random 4-layer student, a corpus .txt of
embedded train texts, and small train/validation teacher datasets for `train`. Each command is
a real CLI subprocess (`python -m jasper_jax.cli ...`), so the signals hit the real process:

- `teachers`: --teacher-texts texts; the CLI does not expose the chunk size, so the number of
  resumable units is the number of 4096-row chunks (`build_teacher_dataset`'s default), then the
  combine step (TFDS write, rename, `_parts` removed).
- `train`: embedded_default stage 3 shrunk to the tiny student, --train-steps steps with a
  checkpoint every --checkpoint-every steps (kills land between and during saves).

For each command: one uninterrupted reference run (timed, T), a re-run of the finished job
(timed, S: start-up plus whatever a finished job still does; it must change nothing), then
rounds in a fresh output folder: start, sleep a seeded uniform time in [0.3, 1.1] x E, send
SIGKILL or SIGTERM (alternating), wait, restart; a round ends when a run exits 0. E is the
expected duration of the current attempt, S + (T - S) x (1 - progress), progress read from the
output folder (checkpoint steps, finished chunks), so kills also land late in a resumed job.
Rounds repeat until --kills kills have hit a running process. Each finished round is compared
with the reference: the last checkpoint's params (every leaf, `np.array_equal`) and step, or
the teacher dataset (rows sorted by `index`: text, teacher bytes; metadata), and its output
folder is searched for leftovers of interrupted work. Prints each kill and a summary, with the
load average before and after; writes WORKDIR/fault_injection.json.

    python -m benchmarks.fault_injection --kills 10 --seed 0 --workdir /tmp/fault_injection
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import functools
import inspect
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.common import report

REPO = Path(__file__).resolve().parent.parent
TEACHER_DIM = 32  # the tiny teacher's hidden size (mean pooled)
LOW, HIGH = 0.3, 1.1  # kill time as a fraction of the expected duration of the attempt
# Names that must not remain in an output folder after a successful run.
LEFTOVER_PATTERNS = (
    "*.orbax-checkpoint-tmp*",
    "_parts",
    ".build-*",
    "tmp*.npy",
    ".jasper-tmp-*",
    ".retired-*",
    ".plan.json.*",
    "damaged-*",
    ".jasper-jax.lock*",
)


def _chunk_size() -> int:
    """Rows per resumable unit of `teachers` (the CLI leaves `build_teacher_dataset`'s
    default)."""
    from jasper_jax.data.teacher_dataset import build_teacher_dataset

    return inspect.signature(build_teacher_dataset).parameters["chunk_size"].default


def subprocess_env(root: Path) -> dict[str, str]:
    """The environment of every run: CPU, offline, one device, a private cache."""
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["JASPER_JAX_CACHE"] = str(root / "cache")
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def make_setup(root: Path, teacher_texts: int, train_texts: int = 512) -> dict:
    """Teacher and student folders, corpus .txt, train/validation datasets under root/setup
    (kept and reused when complete)."""
    from jasper_jax.data.corpus import load_corpus
    from jasper_jax.data.teacher_dataset import build_teacher_dataset
    from tests.train_fixtures import make_tiny_student

    setup = root / "setup"
    paths = {
        "teacher": setup / "teacher",
        "student": setup / "student",
        "corpus": setup / f"corpus-{teacher_texts}.txt",
        "train": setup / f"train-{train_texts}",
        "validation": setup / "validation",
    }
    if not (paths["teacher"] / "config.json").is_file():
        make_tiny_student(paths["teacher"], layers=2)
    if not (paths["student"] / "config.json").is_file():
        make_tiny_student(paths["student"], layers=4)
    if not paths["corpus"].is_file():
        texts = load_corpus("embedded", split="train")[:teacher_texts]
        tmp = paths["corpus"].with_suffix(".partial")
        tmp.write_text("\n".join(texts) + "\n", encoding="utf-8")
        os.replace(tmp, paths["corpus"])
    for split, n in (("train", train_texts), ("validation", 64)):
        if not (paths[split] / "dataset" / "dataset_info.json").is_file():
            texts = load_corpus("embedded", split=split)[:n]
            build_teacher_dataset(texts, [str(paths["teacher"])], paths[split], progress=False)
    return {k: str(v) for k, v in paths.items()}


@dataclasses.dataclass
class Job:
    """One command under test: `argv(output)` runs it into `output`."""

    name: str
    argv: Callable[[Path], list[str]]
    progress: Callable[[Path], float]  # fraction of the work found done in an output folder
    compare: Callable[[Path, Path], list[str]]  # (reference, output) -> differences
    # A finer count that grows while the command works (train steps logged, chunk files), for
    # kills placed mid-work rather than by the clock.
    activity: Callable[[Path], int] = lambda output: 0


def teachers_job(setup: dict, texts: int) -> Job:
    chunks = math.ceil(texts / _chunk_size())

    def argv(output: Path) -> list[str]:
        return [
            *("teachers", "--corpus", setup["corpus"], "--teacher", setup["teacher"]),
            *("--output", str(output), "--limit", str(texts), "--max-length", "16"),
        ]

    def progress(output: Path) -> float:
        if (output / "dataset" / "dataset_info.json").is_file():
            return 1.0
        return len(list((output / "_parts").glob("rows-*.npy"))) / (chunks + 1)

    def activity(output: Path) -> int:
        return (
            len(list((output / "_parts").glob("rows-*.npy"))) if (output / "_parts").is_dir() else 0
        )

    return Job("teachers", argv, progress, compare_datasets, activity)


def train_job(setup: dict, steps: int, checkpoint_every: int, head_init: str = "lstsq") -> Job:
    fields = {
        "model.init_hf": setup["student"],
        "model.heads": (TEACHER_DIM, 16),
        "model.trainable_last_layers": 2,
        "model.head_init": head_init,
        "model.head_init_texts": 64,
        "data.train_dir": setup["train"],
        "data.eval_dir": setup["validation"],
        "data.batch_size": 8,
        "data.max_length": 16,
        "data.eval_texts": 64,
        "train.steps": steps,
        "train.log_every": 1,
        "train.checkpoint_every": checkpoint_every,
        "mesh_shape": (1, 1, 1),
    }

    def argv(output: Path) -> list[str]:
        overrides = [f"--config.{k}={v}".replace(" ", "") for k, v in fields.items()]
        return ["train", "--config", "configs/embedded_default.py:3", "--workdir", str(output)] + (
            overrides
        )

    def progress(output: Path) -> float:
        saved = [int(p.name) for p in (output / "checkpoints").glob("*") if p.name.isdigit()]
        return max(saved, default=0) / steps

    def activity(output: Path) -> int:
        path = output / "tb" / "metrics.jsonl"
        return path.read_text().count('"train/loss"') if path.is_file() else 0

    return Job("train", argv, progress, compare_checkpoints, activity)


@dataclasses.dataclass
class Attempt:
    """One start of a command: killed after `delay` s with `signal` (None: left to finish)."""

    rc: int | None  # None: timed out (and then killed)
    seconds: float
    delay: float | None = None
    signal: str | None = None
    sent: bool = False  # the signal reached a still running process
    sent_at: float | None = None  # seconds after the start
    progress_before: float = 0.0
    progress_after: float = 0.0
    stragglers: int = 0  # processes of its group still alive after it ended (then killed)
    log: str = ""
    mid_work: bool = False  # `delay` counted from the first new activity, not the start

    @property
    def killed(self) -> bool:
        """The signal hit a running process and ended it (by the signal, or a graceful
        preemption exit 143 / interrupt 130)."""
        if not self.sent or self.rc is None:
            return False
        return self.rc < 0 or self.rc in (130, 143)


def run_command(
    job: Job,
    output: Path,
    root: Path,
    log: Path,
    delay: float | None = None,
    sig: signal.Signals | None = None,
    timeout: float = 600.0,
    on_progress: bool = False,
    mid_work: bool = False,
) -> Attempt:
    """Runs the job's command once; with `delay`, sends `sig` after that many seconds if it is
    still running (with `on_progress`, as soon as the output folder shows new progress if that
    comes first; with `mid_work`, `delay` seconds after the command first shows activity, so
    the signal lands among steps, saves and chunk writes rather than in start-up). The command
    runs in a session of its own; what survives it is killed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    before = job.progress(output)
    active_before = job.activity(output)
    start = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "jasper_jax.cli", *job.argv(output)],
            cwd=REPO,
            env=subprocess_env(root),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        sent, sent_at = False, None
        try:
            if delay is not None and mid_work:  # the clock starts at the first new activity
                while proc.poll() is None and job.activity(output) <= active_before:
                    if time.perf_counter() - start > timeout:
                        break
                    time.sleep(0.02)
                start_clock = time.perf_counter()
            else:
                start_clock = start
            if delay is not None:
                deadline = start_clock + delay
                while proc.poll() is None and time.perf_counter() < deadline:
                    if on_progress and job.progress(output) > before:
                        break
                    time.sleep(min(0.05, max(0.0, deadline - time.perf_counter())))
                if proc.poll() is None:
                    proc.send_signal(sig)
                    sent, sent_at = True, time.perf_counter() - start
            rc = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
    seconds = time.perf_counter() - start
    stragglers = _kill_group(proc.pid)
    return Attempt(
        rc,
        seconds,
        delay,
        sig.name if sig is not None else None,
        sent,
        sent_at,
        before,
        job.progress(output),
        stragglers,
        str(log),
        mid_work,
    )


def _kill_group(pgid: int) -> int:
    """SIGKILLs what is left of the process group `pgid` (children of a killed run); returns
    how many processes were left."""
    left = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            left += 1
    if left:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    return left


def tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def reference_run(job: Job, root: Path, measure_rerun: bool = True) -> dict:
    """The uninterrupted run in root/NAME-reference: its duration T and, with
    `measure_rerun`, the duration S of running the finished job again (it must exit 0)."""
    output = root / f"{job.name}-reference"
    if output.exists():
        raise SystemExit(f"{output} exists: use a new --workdir")
    first = run_command(job, output, root, root / "logs" / f"{job.name}-reference.log")
    if first.rc != 0:
        raise RuntimeError(f"reference {job.name} failed (rc {first.rc}):\n{tail(first.log)}")
    result = {"output": str(output), "seconds": first.seconds, "rerun_seconds": None}
    if measure_rerun:
        again = run_command(job, output, root, root / "logs" / f"{job.name}-rerun.log")
        if again.rc != 0:
            raise RuntimeError(f"re-run of {job.name} failed (rc {again.rc}):\n{tail(again.log)}")
        result["rerun_seconds"] = again.seconds
    return result


def expected_seconds(total: float, restart: float, progress: float) -> float:
    """Expected duration of an attempt that starts with `progress` of the work done."""
    restart = min(restart, total)
    return restart + (total - restart) * (1.0 - min(max(progress, 0.0), 1.0))


def kill_round(
    job: Job,
    output: Path,
    root: Path,
    rng: random.Random,
    total: float,
    restart: float,
    kills_wanted: int,
    first_kill: int = 0,
    max_attempts: int = 200,
    echo: Callable[[str], None] = print,
    window: tuple[float, float] = (LOW, HIGH),
    on_progress: bool = False,
    mid_work_seconds: float = 0.0,
) -> list[Attempt]:
    """Starts the job in `output` and kills it at random points until it exits 0 (after
    `kills_wanted` kills it is left to finish). Stops early on any other exit. `on_progress`:
    kill as soon as an attempt makes progress, if before its random time (quick tests)."""
    attempts: list[Attempt] = []
    tag = output.name
    while len(attempts) < max_attempts:
        hits = sum(a.killed for a in attempts)
        n = len(attempts)
        log = root / "logs" / f"{tag}-{n:03d}.log"
        timeout = 10 * total + 60
        if hits < kills_wanted:
            sig = signal.SIGKILL if (first_kill + hits) % 2 == 0 else signal.SIGTERM
            # Half the kills by the clock (start-up, restore, compile, work), half a random
            # moment into the work once it has visibly resumed.
            mid_work = mid_work_seconds > 0 and rng.random() < 0.5
            if mid_work:
                delay = rng.uniform(0.0, mid_work_seconds)
            else:
                delay = rng.uniform(*window) * expected_seconds(
                    total, restart, job.progress(output)
                )
            attempt = run_command(
                job, output, root, log, delay, sig, timeout, on_progress, mid_work
            )
        else:
            attempt = run_command(job, output, root, log, timeout=timeout)
        attempts.append(attempt)
        what = "no signal"
        if attempt.delay is not None:
            what = f"{attempt.signal} at {attempt.sent_at or attempt.delay:6.2f} s"

        hit = "hit" if attempt.killed else ("" if attempt.sent or not attempt.delay else "done")
        echo(
            f"  {job.name:8s} {tag} #{n:<3d} {what:20s} {hit:4s} rc={attempt.rc} "
            f"after {attempt.seconds:6.2f} s, progress {attempt.progress_before:.2f} -> "
            f"{attempt.progress_after:.2f}"
            + (f", {attempt.stragglers} stragglers" if attempt.stragglers else "")
        )
        if attempt.rc == 0:
            break
        if not attempt.killed:
            echo(
                f"  {job.name}: unexpected exit {attempt.rc}; log {attempt.log}:\n"
                + tail(attempt.log)
            )
            break
    return attempts


def compare_checkpoints(reference: Path, output: Path) -> list[str]:
    """Differences between the latest checkpoints' params (bit for bit) and steps."""
    from flax import traverse_util

    from jasper_jax.run_folder import load_params

    (ref, ref_step), (got, got_step) = load_params(reference), load_params(output)
    diffs = [] if ref_step == got_step else [f"last step {got_step}, reference {ref_step}"]
    ref, got = traverse_util.flatten_dict(ref), traverse_util.flatten_dict(got)
    if set(ref) != set(got):
        diffs.append(f"param names differ: {sorted(set(ref) ^ set(got))[:5]}")
    for key in sorted(set(ref) & set(got)):
        a, b = np.asarray(ref[key]), np.asarray(got[key])
        if a.dtype != b.dtype or a.shape != b.shape or not np.array_equal(a, b):
            diffs.append(f"param {'/'.join(key)} differs")
    return diffs


def _rows(folder: Path) -> tuple[dict, list[dict]]:
    """(metadata, every row sorted by index) of a teacher dataset."""
    from jasper_jax.data.teacher_dataset import open_teacher_dataset

    source, metadata = open_teacher_dataset(folder)
    indices = list(range(len(source)))
    getitems = getattr(source, "__getitems__", None)  # one batched read: 4x faster
    rows = getitems(indices) if getitems else [source[i] for i in indices]
    return metadata, sorted(rows, key=lambda r: int(r["index"]))


@functools.lru_cache(maxsize=2)
def _reference_rows(folder: str, stamp: int) -> tuple[dict, list[dict]]:
    del stamp  # part of the key only: a rebuilt reference is read again
    return _rows(Path(folder))


def compare_datasets(reference: Path, output: Path) -> list[str]:
    """Differences between two teacher datasets: rows by index (text, teacher bytes) and
    metadata."""
    info = Path(reference) / "dataset" / "dataset_info.json"
    stamp = info.stat().st_mtime_ns if info.is_file() else 0
    (ref_meta, ref), (got_meta, got) = _reference_rows(str(reference), stamp), _rows(output)
    diffs = [] if ref_meta == got_meta else ["metadata differs"]
    if len(ref) != len(got):
        diffs.append(f"{len(got)} rows, reference {len(ref)}")
    bad = []
    for a, b in zip(ref, got, strict=False):
        same = (
            int(a["index"]) == int(b["index"])
            and a["text"] == b["text"]
            and a["teacher"].dtype == b["teacher"].dtype
            and a["teacher"].tobytes() == b["teacher"].tobytes()
        )
        if not same:
            bad.append(int(a["index"]))
    if bad:
        diffs.append(f"{len(bad)} rows differ, e.g. index {bad[:5]}")
    return diffs


def leftovers(output: Path) -> list[str]:
    """Paths under `output` (relative) whose names mark unfinished or interrupted work."""
    found = []
    for dirpath, dirnames, filenames in os.walk(output):
        for name in dirnames + filenames:
            if any(fnmatch.fnmatch(name, p) for p in LEFTOVER_PATTERNS):
                found.append(os.path.relpath(os.path.join(dirpath, name), output))
    return sorted(found)


def fault_injection(
    job: Job,
    root: Path,
    kills: int,
    rng: random.Random,
    max_rounds: int = 5,
    measure_rerun: bool = True,
    echo: Callable[[str], None] = print,
    window: tuple[float, float] = (LOW, HIGH),
    on_progress: bool = False,
    mid_work_seconds: float = 2.0,
) -> dict:
    """Reference run, then kill rounds until `kills` kills hit (or `max_rounds`); returns the
    JSON-ready record of the command."""
    ref = reference_run(job, root, measure_rerun)
    total = ref["seconds"]
    restart = ref["rerun_seconds"] if ref["rerun_seconds"] is not None else total / 2
    echo(
        f"{job.name}: reference {total:.2f} s"
        + (f", re-run of the finished job {restart:.2f} s" if measure_rerun else "")
    )
    ref_leftovers = leftovers(Path(ref["output"]))
    rounds, hits = [], 0
    while hits < kills and len(rounds) < max_rounds:
        output = root / f"{job.name}-round{len(rounds)}"
        began = time.perf_counter()
        attempts = kill_round(
            job,
            output,
            root,
            rng,
            total,
            restart,
            kills - hits,
            hits,
            echo=echo,
            window=window,
            on_progress=on_progress,
            mid_work_seconds=mid_work_seconds,
        )
        round_hits = sum(a.killed for a in attempts)
        hits += round_hits
        finished = bool(attempts) and attempts[-1].rc == 0
        diffs = job.compare(Path(ref["output"]), output) if finished else ["did not finish"]
        left = leftovers(output)
        echo(
            f"{job.name} {output.name}: {round_hits} kills survived in "
            f"{time.perf_counter() - began:.1f} s; "
            + ("identical to the reference" if not diffs else "DIFFERENT: " + "; ".join(diffs))
            + (f"; leftovers {left}" if left else "; no leftovers")
        )
        rounds.append(
            {
                "output": str(output),
                "kills": round_hits,
                "seconds": time.perf_counter() - began,
                "finished": finished,
                "identical": finished and not diffs,
                "differences": diffs,
                "leftovers": left,
                "attempts": [dataclasses.asdict(a) | {"killed": a.killed} for a in attempts],
            }
        )
        if not finished:
            break
    return {
        "reference": ref | {"leftovers": ref_leftovers},
        "kills": hits,
        "sigkill": sum(
            a["killed"] and a["signal"] == "SIGKILL" for r in rounds for a in r["attempts"]
        ),
        "sigterm": sum(
            a["killed"] and a["signal"] == "SIGTERM" for r in rounds for a in r["attempts"]
        ),
        "graceful_143": sum(a["killed"] and a["rc"] == 143 for r in rounds for a in r["attempts"]),
        "mid_work": sum(a["killed"] and a["mid_work"] for r in rounds for a in r["attempts"]),
        "rounds": rounds,
        "identical": bool(rounds) and all(r["identical"] for r in rounds),
        "leftovers": sorted({x for r in rounds for x in r["leftovers"]}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="kills to land per command")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", required=True, help="a new folder for all runs")
    parser.add_argument("--commands", default="teachers,train")
    parser.add_argument("--teacher-texts", type=int, default=40000)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--max-rounds", type=int, default=5)
    parser.add_argument(
        "--mid-work-seconds",
        type=float,
        default=2.0,
        help="half the kills land up to this long after a run shows new work (0: clock only)",
    )
    args = parser.parse_args()
    load_before = os.getloadavg()
    began = time.perf_counter()
    root = Path(args.workdir).absolute()
    root.mkdir(parents=True, exist_ok=True)
    setup = make_setup(root, args.teacher_texts)
    jobs = {
        "teachers": teachers_job(setup, args.teacher_texts),
        "train": train_job(setup, args.train_steps, args.checkpoint_every),
    }
    rng = random.Random(args.seed)
    results = {}
    for name in args.commands.split(","):
        results[name] = fault_injection(
            jobs[name],
            root,
            args.kills,
            rng,
            args.max_rounds,
            mid_work_seconds=args.mid_work_seconds,
        )
    load_after = os.getloadavg()
    rows = [
        [
            name,
            r["kills"],
            f"{r['sigkill']} / {r['sigterm']} ({r['graceful_143']} exit 143)",
            r["mid_work"],
            len(r["rounds"]),
            f"{r['reference']['seconds']:.1f}",
            f"{sum(x['seconds'] for x in r['rounds']):.1f}",
            "yes" if r["identical"] else "NO",
            ", ".join(r["leftovers"]) or "none",
        ]
        for name, r in results.items()
    ]
    headers = [
        "command",
        "kills survived",
        "SIGKILL / SIGTERM",
        "of them mid-work",
        "rounds",
        "reference s",
        "rounds s",
        "identical",
        "leftovers",
    ]
    note = (
        f"seed {args.seed}, {args.kills} kills wanted per command; load average before "
        f"{load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    report("Fault injection: kill, resume, compare", headers, rows, note)
    print(f"{time.perf_counter() - began:.0f} s in all")
    record = {
        "args": vars(args),
        "load_before": load_before,
        "load_after": load_after,
        "seconds": time.perf_counter() - began,
        "commands": results,
        "identical": all(r["identical"] for r in results.values()),
    }
    (root / "fault_injection.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {root / 'fault_injection.json'}")
    sys.exit(0 if record["identical"] else 1)


if __name__ == "__main__":
    main()
