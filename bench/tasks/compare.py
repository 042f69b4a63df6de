"""Task-queue comparison (issue 5): VRAMancer against Celery, RQ, huey and Dramatiq on no-op tasks.

``python -m bench.tasks.compare [--n 10000] [--runs 3] [--json]`` pushes ``n`` ``noop`` tasks end
to end (submit all, then wait until all are done) through

* VRAMancer embedded: ``Runtime(...).tasks`` of a fresh runtime with a temporary data directory;
* VRAMancer over HTTP: ``POST /api/tasks/submit_batch`` against a real ``vramancer serve``;
* Celery, RQ, huey and Dramatiq, each with a Redis broker on a private ``redis-server``
  (started here on a free port without persistence, stopped at the end), two worker processes each.

All systems are set up first, then measured round-robin (run 1 of every system, run 2 of every
system ...) so that the noise of a shared machine hits them alike. Figures are medians of the runs;
RQ (which forks a process per job) gets a smaller ``--rq-n`` by default, and the table says so.
Beside every figure stands what the system guarantees about an acknowledged task.
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

from bench.tasks.compare_redis import COMPETITORS, RedisServer, RunResult

#: What the issue asks of VRAMancer embedded, in tasks per second.
TARGET_EMBEDDED_PER_S = 2000.0
#: Systems in table order.
SYSTEM_ORDER = ("vramancer", "vramancer_http", "celery", "rq", "huey", "dramatiq")

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

    def run_once(self, n: int) -> RunResult: ...

    def teardown(self) -> None: ...


@dataclass
class SystemReport:
    """Everything printed for one system."""

    name: str
    library: str
    n: int
    concurrency: str
    submit_how: str
    durability: str
    runs: list[RunResult] = field(default_factory=list)
    error: str | None = None

    @property
    def tasks_per_s(self) -> float | None:
        return statistics.median(r.tasks_per_s for r in self.runs) if self.runs else None

    @property
    def submit_per_s(self) -> float | None:
        return statistics.median(r.submit_per_s for r in self.runs) if self.runs else None

    def as_json(self) -> dict[str, Any]:
        return {
            "library": self.library,
            "version": _version(self.library),
            "n": self.n,
            "tasks_per_s_median": _round(self.tasks_per_s),
            "submit_per_s_median": _round(self.submit_per_s),
            "runs_tasks_per_s": [round(r.tasks_per_s, 1) for r in self.runs],
            "runs_total_s": [round(r.total_s, 4) for r in self.runs],
            "worker_concurrency": self.concurrency,
            "submit": self.submit_how,
            "durability": self.durability,
            "error": self.error,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


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


def measure(systems: list[System], n_of: dict[str, int], runs: int) -> list[SystemReport]:
    """Set every system up, run them round-robin ``runs`` times, tear them down."""
    reports = {
        s.name: SystemReport(s.name, s.library, n_of[s.name], s.concurrency, s.submit_how, "")
        for s in systems
    }
    ready: list[System] = []
    try:
        for system in systems:
            _log(f"setting up {system.name} ...")
            try:
                system.setup()
                ready.append(system)
            except Exception as exc:  # report it, keep measuring the others
                reports[system.name].error = f"setup failed: {exc!r}"
                _log(f"  {system.name}: {reports[system.name].error}")
            reports[system.name].durability = durability_of(system)
        for run in range(runs):
            for system in ready:
                report = reports[system.name]
                if report.error:
                    continue
                try:
                    result = system.run_once(report.n)
                except Exception as exc:
                    report.error = f"run {run + 1} failed: {exc!r}"
                    _log(f"  {system.name}: {report.error}")
                    continue
                report.runs.append(result)
                _log(
                    f"run {run + 1}/{runs} {system.name:15s} n={report.n:6d} "
                    f"{result.tasks_per_s:9.0f} tasks/s (submit {result.submit_per_s:.0f}/s)"
                )
    finally:
        for system in reversed(ready):
            try:
                system.teardown()
            except Exception as exc:
                _log(f"teardown of {system.name} failed: {exc!r}")
    return [reports[s.name] for s in systems]


def verdict(reports: list[SystemReport]) -> dict[str, Any]:
    """Ratios of VRAMancer embedded to every other system, and the issue's targets."""
    by_name = {r.name: r.tasks_per_s for r in reports}
    ours = by_name.get("vramancer")
    ratios = {
        f"vramancer_vs_{name}": round(ours / other, 2)
        for name, other in by_name.items()
        if name != "vramancer" and ours and other
    }

    def above(name: str) -> bool | None:
        other = by_name.get(name)
        return None if ours is None or other is None else ours > other

    return {
        "ratios": ratios,
        "embedded_at_least_2000_per_s": None if ours is None else ours >= TARGET_EMBEDDED_PER_S,
        "above_celery": above("celery"),
        "above_rq": above("rq"),
        "above_huey": above("huey"),
        "above_dramatiq": above("dramatiq"),
    }


def render_table(reports: list[SystemReport], runs: int) -> str:
    """A plain-text table: one row per system, durability on the line below."""
    head = (
        f"{'system':16s} {'n':>6s} {'tasks/s (median)':>17s} {'min-max':>15s} "
        f"{'submit/s':>10s}  workers"
    )
    lines = [head, "-" * len(head)]
    for r in reports:
        if r.tasks_per_s is None:
            lines.append(f"{r.name:16s} {r.n:6d} {'-':>17s} {'':>15s} {'':>10s}  {r.error}")
            continue
        speeds = [x.tasks_per_s for x in r.runs]
        span = f"{min(speeds):.0f}-{max(speeds):.0f}"
        partial = f" ({len(r.runs)}/{runs} runs: {r.error})" if r.error else ""
        lines.append(
            f"{r.name:16s} {r.n:6d} {r.tasks_per_s:17.0f} {span:>15s} "
            f"{r.submit_per_s or 0:10.0f}  {r.concurrency}{partial}"
        )
        lines.append(f"{'':16s} durability: {r.durability}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.tasks.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--n", type=int, default=10_000, help="no-op tasks per run")
    parser.add_argument(
        "--rq-n",
        type=int,
        default=2_000,
        help="tasks per run for RQ, which forks per job (0: same as --n)",
    )
    parser.add_argument("--runs", type=int, default=3, help="timed runs per system (median)")
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
    if args.n < 1 or args.runs < 1 or args.rq_n < 0:
        parser.error("--n and --runs must be >= 1, --rq-n >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    n_of = {name: args.n for name in names}
    if "rq" in n_of and args.rq_n:
        n_of["rq"] = min(args.rq_n, args.n)
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
            reports = measure(systems, n_of, args.runs)
            redis_version = redis_box[0].version() if redis_box else None
        finally:
            for server in redis_box:
                server.stop()
    result = {
        "benchmark": "tasks.compare",
        "n": args.n,
        "runs": args.runs,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.node()}",
        "redis_server": redis_version,
        "data_dir_storage": storage,
        "wall_s": round(time.time() - started, 1),
        "systems": {r.name: r.as_json() for r in reports},
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
