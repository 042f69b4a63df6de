"""Task-queue comparison: VRAMancer against Celery, RQ, huey and Dramatiq on the same work.

``python -m bench.tasks.compare [--work true,python,noop] [--n-process 1000] [--n 10000]
[--runs 5] [--latency 30] [--json]`` runs, for each kind of work, tasks end to end (submit all,
then wait until all are done) and then single tasks one at a time (submit -> start and
submit -> done latency) through

* VRAMancer embedded: ``Runtime(...).tasks`` of a fresh runtime with a temporary data directory;
* VRAMancer over HTTP: ``POST /api/tasks/submit_batch`` against a real ``vramancer serve``;
* Celery, RQ, huey and Dramatiq, each with a Redis broker on a private ``redis-server``
  (started here on a free port without persistence, stopped at the end), two worker processes each.

The work (``compare_common.Work``) is the same on every side: ``true`` starts the program
``true`` as a process per task (VRAMancer: a ``cmd`` task; the others: ``subprocess.run`` in
their worker), ``python`` calls one Python function per task (VRAMancer: a ``python`` task, which
starts an interpreter per task; the others call it in their warm worker), ``noop`` does nothing
(VRAMancer runs it inside the daemon, in batches: a queue figure, not a process one). Every
system runs two tasks at a time (two worker processes; VRAMancer's two host slots).

All systems are set up first, then measured round-robin (run 1 of every system, run 2 of every
system ...) so that the noise of a shared machine hits them alike. Figures are medians of the
runs; CPU per task counts every process involved (driver, daemon or workers and their children,
Redis). RQ (which forks a process per job) gets a smaller ``--rq-n`` for ``noop``, and the table
says so. Beside every figure stands what the system guarantees about an acknowledged task.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

from bench.tasks.compare_common import Work
from bench.tasks.compare_redis import COMPETITORS, LatencySample, RedisServer, RunResult

#: VRAMancer embedded's aim on ``noop`` tasks, in tasks per second.
TARGET_EMBEDDED_PER_S = 2000.0
#: VRAMancer's aim on one task alone: submit -> done p50 within this factor of the fastest peer.
TARGET_LATENCY_FACTOR = 1.5
#: Systems in table order.
SYSTEM_ORDER = (
    "vramancer",
    "vramancer_uvloop",
    "vramancer_http",
    "celery",
    "rq",
    "huey",
    "dramatiq",
)

#: Common to the four Redis-based systems, as run here.
_REDIS_NOTE = (
    "Redis here runs with --save '' --appendonly no: a queued task lives only in Redis memory and "
    "a Redis crash or restart loses every one of them (default RDB snapshots would lose minutes, "
    "AOF everysec up to ~1 s)."
)
#: What each competitor promises about a task it has accepted, read from its code and docs.
DURABILITY: dict[str, str] = {
    "celery": (
        "In Redis memory only. Default acks_late=False: the worker acks when it takes a task, so "
        "a worker crash loses the prefetched and running tasks. " + _REDIS_NOTE
    ),
    "rq": (
        "In Redis memory only. A job whose worker dies stays in StartedJobRegistry until its "
        "timeout, then moves to FailedJobRegistry (not re-run unless a Retry was given). "
        + _REDIS_NOTE
    ),
    "huey": (
        "In Redis memory only. The consumer pops a task with BRPOP and never acks: a consumer "
        "crash loses the tasks it holds. " + _REDIS_NOTE
    ),
    "dramatiq": (
        "In Redis memory only. Acked after processing; a dead worker's unacked messages are "
        "re-queued after the heartbeat timeout (at least once, while Redis survives). "
        + _REDIS_NOTE
    ),
}


class System(Protocol):
    """What the driver needs from a benchmarked system."""

    name: str
    library: str
    concurrency: str
    submit_how: str

    def setup(self) -> None: ...

    def run_once(self, n: int, work: str) -> RunResult: ...

    def teardown(self) -> None: ...


@dataclass
class SystemReport:
    """Everything printed for one system and one kind of work."""

    name: str
    work: str
    library: str
    n: int
    concurrency: str
    submit_how: str
    durability: str
    runs: list[RunResult] = field(default_factory=list)
    latencies: list[LatencySample] = field(default_factory=list)
    error: str | None = None

    @property
    def tasks_per_s(self) -> float | None:
        return statistics.median(r.tasks_per_s for r in self.runs) if self.runs else None

    @property
    def submit_per_s(self) -> float | None:
        return statistics.median(r.submit_per_s for r in self.runs) if self.runs else None

    @property
    def cpu_ms_per_task(self) -> float | None:
        return statistics.median(r.cpu_ms_per_task for r in self.runs) if self.runs else None

    def latency_ms(self, which: str, q: float) -> float | None:
        """Quantile ``q`` (0.5, 0.99) of submit -> ``which`` ("start" or "done"), in ms."""
        values = sorted(getattr(x, f"to_{which}_s") for x in self.latencies)
        values = [v for v in values if v == v]  # drop NaN (a start that was not recorded)
        if not values:
            return None
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    def as_json(self) -> dict[str, Any]:
        return {
            "library": self.library,
            "version": _version(self.library),
            "work": self.work,
            "n": self.n,
            "tasks_per_s_median": _round(self.tasks_per_s),
            "submit_per_s_median": _round(self.submit_per_s),
            "cpu_ms_per_task_median": _round(self.cpu_ms_per_task, 3),
            "runs_tasks_per_s": [round(r.tasks_per_s, 1) for r in self.runs],
            "runs_total_s": [round(r.total_s, 4) for r in self.runs],
            "latency_samples": len(self.latencies),
            "submit_to_start_ms": {
                "p50": _round(self.latency_ms("start", 0.5), 2),
                "p99": _round(self.latency_ms("start", 0.99), 2),
            },
            "submit_to_done_ms": {
                "p50": _round(self.latency_ms("done", 0.5), 2),
                "p99": _round(self.latency_ms("done", 0.99), 2),
            },
            "worker_concurrency": self.concurrency,
            "submit": self.submit_how,
            "durability": self.durability,
            "error": self.error,
        }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def filesystem_of(path: Path) -> str:
    """``<fstype> on <mount point>`` for ``path``, from ``/proc/mounts`` (Linux)."""
    best = ("", "?")
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if (
                    len(parts) > 2
                    and str(path).startswith(parts[1])
                    and len(parts[1]) >= len(best[0])
                ):
                    best = (parts[1], parts[2])
    except OSError:
        return "?"
    return f"{best[1]} on {best[0]}"


def fsync_ms(path: Path, samples: int = 20) -> float:
    """Median time of one 4 KiB write + fsync in ``path``: what a durable commit costs here."""
    times: list[float] = []
    probe = path / "fsync-probe"
    with open(probe, "wb") as fh:
        for _ in range(samples):
            fh.write(b"\0" * 4096)
            fh.flush()
            t0 = time.perf_counter()
            os.fsync(fh.fileno())
            times.append(time.perf_counter() - t0)
    probe.unlink()
    return round(statistics.median(times) * 1000, 3)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_systems(
    names: list[str], workdir: Path, redis_server: Callable[[], RedisServer], timeout_s: float
) -> list[System]:
    """Instantiate the runners asked for; Redis starts only if a competitor needs it."""
    systems: list[System] = []
    for name in names:
        if name in COMPETITORS:
            systems.append(COMPETITORS[name](redis_server(), workdir, timeout_s))
        elif name == "vramancer":
            from bench.tasks.compare_vramancer import EmbeddedRunner

            systems.append(EmbeddedRunner(workdir, timeout_s))
        elif name == "vramancer_uvloop":
            from bench.tasks.compare_vramancer import UvloopRunner

            systems.append(UvloopRunner(workdir, timeout_s))
        elif name == "vramancer_http":
            from bench.tasks.compare_vramancer import HttpRunner

            systems.append(HttpRunner(workdir, timeout_s))
        else:
            raise SystemExit(
                f"--systems: unknown system {name!r}; known: {', '.join(SYSTEM_ORDER)}"
            )
    return systems


def durability_of(system: System) -> str:
    text = DURABILITY.get(system.name)
    return text if text is not None else str(getattr(system, "durability", ""))


def _setup_all(systems: list[System]) -> tuple[list[System], dict[str, str]]:
    """Set every system up; the ones that failed come back with their error."""
    ready: list[System] = []
    failed: dict[str, str] = {}
    for system in systems:
        _log(f"setting up {system.name} ...")
        try:
            system.setup()
            ready.append(system)
        except Exception as exc:  # report it, keep measuring the others
            failed[system.name] = f"setup failed: {exc!r}"
            _log(f"  {system.name}: {failed[system.name]}")
    return ready, failed


def _throughput_round(ready: list[System], reports: dict[tuple[str, str], SystemReport]) -> None:
    for work in dict.fromkeys(w for _, w in reports):
        for system in ready:
            report = reports[(system.name, work)]
            if report.error:
                continue
            try:
                result = system.run_once(report.n, work)
            except Exception as exc:
                report.error = f"run {len(report.runs) + 1} failed: {exc!r}"
                _log(f"  {system.name}/{work}: {report.error}")
                continue
            report.runs.append(result)
            _log(
                f"{work:6s} {system.name:15s} n={report.n:6d} {result.tasks_per_s:9.0f} tasks/s "
                f"(submit {result.submit_per_s:.0f}/s, {result.cpu_ms_per_task:.2f} ms CPU/task)"
            )


def _latency_round(
    ready: list[System], reports: dict[tuple[str, str], SystemReport], samples: int
) -> None:
    for work in dict.fromkeys(w for _, w in reports):
        for system in ready:
            latency = getattr(system, "latency", None)
            report = reports[(system.name, work)]
            if latency is None or report.error:
                continue
            try:
                report.latencies.extend(latency(work, samples))
            except Exception as exc:
                report.error = f"latency failed: {exc!r}"
                _log(f"  {system.name}/{work}: {report.error}")


def measure(
    systems: list[System],
    works: list[str],
    n_of: dict[tuple[str, str], int],
    runs: int,
    latency_samples: int,
) -> list[SystemReport]:
    """Set every system up, run them round-robin ``runs`` times per work, tear them down."""
    reports = {
        (s.name, w): SystemReport(
            s.name, w, s.library, n_of[(s.name, w)], s.concurrency, s.submit_how, durability_of(s)
        )
        for w in works
        for s in systems
    }
    ready, failed = _setup_all(systems)
    for (name, _), report in reports.items():
        report.error = failed.get(name)
    try:
        for _ in range(runs):
            _throughput_round(ready, reports)
        per_round = max(1, latency_samples // runs) if latency_samples else 0
        for _ in range(runs if per_round else 0):
            _latency_round(ready, reports, per_round)
    finally:
        for system in reversed(ready):
            try:
                system.teardown()
            except Exception as exc:
                _log(f"teardown of {system.name} failed: {exc!r}")
    return list(reports.values())


def _verdict_of(work_reports: list[SystemReport], name: str = "vramancer") -> dict[str, Any]:
    by_name = {r.name: r for r in work_reports}
    ours = by_name.get(name)
    peers = [r for r in work_reports if r.library != "vramancer"]
    speed = ours.tasks_per_s if ours else None
    ratios = {
        f"{name}_vs_{r.name}": round(speed / r.tasks_per_s, 2)
        for r in work_reports
        if r.name != name and speed and r.tasks_per_s
    }
    peer_speeds = [r.tasks_per_s for r in peers if r.tasks_per_s]
    peer_p50 = [x for r in peers if (x := r.latency_ms("done", 0.5)) is not None]
    ours_p50 = ours.latency_ms("done", 0.5) if ours else None
    return {
        "ratios": ratios,
        "above_every_peer": (speed > max(peer_speeds)) if speed and peer_speeds else None,
        "submit_to_done_p50_vs_fastest_peer": (
            round(ours_p50 / min(peer_p50), 2) if ours_p50 and peer_p50 else None
        ),
        "within_latency_target": (
            ours_p50 <= TARGET_LATENCY_FACTOR * min(peer_p50) if ours_p50 and peer_p50 else None
        ),
    }


def verdict(reports: list[SystemReport]) -> dict[str, Any]:
    """Per work: VRAMancer embedded's ratio to every other system, and the targets (and the
    same for the embedded runtime on uvloop, under ``on_uvloop``)."""
    works = dict.fromkeys(r.work for r in reports)
    result = {w: _verdict_of([r for r in reports if r.work == w]) for w in works}
    for w in works:  # the same verdict on uvloop, where it ran
        on_uvloop = [r for r in reports if r.work == w]
        if any(r.name == "vramancer_uvloop" for r in on_uvloop):
            result[w]["on_uvloop"] = _verdict_of(on_uvloop, "vramancer_uvloop")
    noop = next((r for r in reports if r.work == "noop" and r.name == "vramancer"), None)
    if noop is not None and noop.tasks_per_s is not None:
        result["noop"]["embedded_at_least_2000_per_s"] = noop.tasks_per_s >= TARGET_EMBEDDED_PER_S
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _quantiles(report: SystemReport, which: str) -> str:
    p50, p99 = report.latency_ms(which, 0.5), report.latency_ms(which, 0.99)
    return f"{_fmt(p50, '.1f')}/{_fmt(p99, '.1f')}"


def render_table(reports: list[SystemReport], runs: int) -> str:
    """A plain-text table per work: one row per system, durability on the line below."""
    head = (
        f"{'system':15s} {'n':>6s} {'tasks/s':>8s} {'min-max':>11s} {'CPU ms/task':>11s} "
        f"{'start p50/p99 ms':>17s} {'done p50/p99 ms':>16s}  workers"
    )
    lines: list[str] = []
    for work in dict.fromkeys(r.work for r in reports):
        lines += ["", f"work: {work}", head, "-" * len(head)]
        for r in (x for x in reports if x.work == work):
            speeds = [x.tasks_per_s for x in r.runs]
            span = f"{min(speeds):.0f}-{max(speeds):.0f}" if speeds else ""
            start, done = _quantiles(r, "start"), _quantiles(r, "done")
            partial = f" ({len(r.runs)}/{runs} runs: {r.error})" if r.error else ""
            lines.append(
                f"{r.name:15s} {r.n:6d} {_fmt(r.tasks_per_s, '8.0f')} {span:>11s} "
                f"{_fmt(r.cpu_ms_per_task, '11.2f')} {start:>17s} {done:>16s}  "
                f"{r.concurrency}{partial}"
            )
            lines.append(f"{'':15s} durability: {r.durability}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tasks.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--work",
        default="true,python,noop",
        help="comma-separated kinds of work: " + ", ".join(w.value for w in Work),
    )
    parser.add_argument("--n", type=int, default=10_000, help="noop tasks per run")
    parser.add_argument(
        "--n-process", type=int, default=1_000, help="true and python tasks per run"
    )
    parser.add_argument(
        "--rq-n",
        type=int,
        default=2_000,
        help="noop tasks per run for RQ, which forks per job (0: same as --n)",
    )
    parser.add_argument("--runs", type=int, default=5, help="timed runs per system (median)")
    parser.add_argument(
        "--latency", type=int, default=30, help="single tasks timed per system and work (0: none)"
    )
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEM_ORDER),
        help="comma-separated subset of " + ", ".join(SYSTEM_ORDER),
    )
    parser.add_argument(
        "--timeout-s", type=float, default=600.0, help="longest wait for one run to finish"
    )
    parser.add_argument(
        "--workdir", default=None, help="where data directories go (default: the temp dir)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--save", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)
    if args.n < 1 or args.n_process < 1 or args.runs < 1 or args.rq_n < 0 or args.latency < 0:
        parser.error("--n, --n-process and --runs must be >= 1, --rq-n and --latency >= 0")
    known = {w.value for w in Work}
    args.works = [w.strip() for w in args.work.split(",") if w.strip()]
    if not args.works or any(w not in known for w in args.works):
        parser.error(f"--work: expected a comma-separated subset of {', '.join(sorted(known))}")
    return args


def sizes(names: list[str], args: argparse.Namespace) -> dict[tuple[str, str], int]:
    """Tasks per run for every (system, work)."""
    n_of: dict[tuple[str, str], int] = {}
    for name in names:
        for work in args.works:
            n = args.n if work == Work.NOOP.value else args.n_process
            if name == "rq" and work == Work.NOOP.value and args.rq_n:
                n = min(args.rq_n, n)
            n_of[(name, work)] = n
    return n_of


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="vrm-bench-tasks-", dir=args.workdir) as tmp:
        workdir = Path(tmp)
        storage = {"filesystem": filesystem_of(workdir), "fsync_ms_median": fsync_ms(workdir)}
        redis_box: list[RedisServer] = []

        def redis_server() -> RedisServer:
            if not redis_box:
                redis_box.append(RedisServer(workdir))
            return redis_box[0]

        try:
            systems = build_systems(names, workdir, redis_server, args.timeout_s)
            reports = measure(systems, args.works, sizes(names, args), args.runs, args.latency)
            redis_version = redis_box[0].version() if redis_box else None
        finally:
            for server in redis_box:
                server.stop()
    result = {
        "benchmark": "tasks.compare",
        "works": args.works,
        "runs": args.runs,
        "latency_samples": args.latency,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.node()} ({os.cpu_count()} CPUs)",
        "redis_server": redis_version,
        "data_dir_storage": storage,
        "wall_s": round(time.time() - started, 1),
        "systems": [r.as_json() | {"system": r.name} for r in reports],
        "verdict": verdict(reports),
    }
    if args.save:
        Path(args.save).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render_table(reports, args.runs))
        print()
        print("storage of the data directories:", json.dumps(storage))
        print("verdict:", json.dumps(result["verdict"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
