"""The pool of machines (NATS JetStream) against the embedded queue and Celery, on the same work:
``cmd`` tasks whose process is ``true``, at the same concurrency on every side.

``python -m bench.tasks.pool [--tasks 300] [--workers 1,2,4] [--rounds 3] [--latency 50]
[--fast-interval S] [--json]``

For each worker count ``W`` (1, 2, 4), with ``SLOTS_PER_WORKER`` (2) task slots per worker, so a
total concurrency ``C = 2 W`` (2, 4, 8) on every side:

* **pool**: a fresh ``nats-server -js`` (file store in a temporary directory), one orchestrator
  (``vramancer serve`` with ``[nats] url``, no GPU of its own) and ``W`` ``vramancer worker``
  processes, each with one simulated GPU and ``slots_per_device = 2``;
* **embedded**: one ``vramancer serve`` without NATS, ``W`` simulated GPUs with
  ``slots_per_device = 2`` (the same slots, the same picker), its SQLite queue with
  ``synchronous = "normal"`` (no fsync per commit, as JetStream's file store does not fsync each
  write by default);
* **pool_fast** (only with ``--fast-interval S``): the same pool, its orchestrator with
  ``[tasks] dispatch_interval_s = S`` instead of the default 0.2 s (what limits the pool);
* **celery**: one ``celery worker --pool=prefork --concurrency=C`` on a private ``redis-server``
  (no persistence), a task that runs ``subprocess.run(["true"])``, submitted with ``delay()``.

A round submits ``--tasks`` tasks (VRAMancer: ``POST /api/tasks/submit_batch``, ``BATCH`` per
request) and waits until all are done (VRAMancer: ``GET /api/tasks/stats``; Celery: a Redis counter
bumped by ``task_postrun``): tasks/s = tasks / wall time from the first submit. Rounds alternate
pool, embedded, celery so the noise of a shared machine hits them alike; figures are medians.

Dispatch latency (``--latency`` tasks, pool and embedded at the first worker count): one task at a
time, each ``sh -c 'date +%s.%N > FILE'``; latency = the time the process wrote minus the time
just before its ``POST /api/tasks/submit``; the next task is submitted once the previous is done.

Every process started here (nats-server, serve, workers, redis, celery) is killed at the end, also
on Ctrl-C. Everything runs with the daemons' default timers (heartbeats, dispatch interval,
leases) except ``auto_maintenance = false``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from tests.helpers import free_port, wait_http
from tests.natsserver import NatsServer, nats_server_binary

from bench.tasks.compare_common import DONE_KEY, QUEUE_NAME, REDIS_URL_ENV

if TYPE_CHECKING:
    from bench.tasks.compare_redis import RedisServer

#: The repository root (the Celery workers import the benchmark's app from it).
REPO_ROOT = Path(__file__).resolve().parents[2]

#: Task slots per worker (per simulated GPU): the total concurrency is twice the worker count.
SLOTS_PER_WORKER = 2
#: Tasks per ``submit_batch`` request.
BATCH = 100
#: How often the driver polls ``/api/tasks/stats``.
POLL_S = 0.02
#: Tasks run once per side before timing: imports, connections, first spawns.
WARMUP_TASKS = 20
#: A round that does not end within this many seconds is a failure.
ROUND_TIMEOUT_S = 180.0
VRAMANCER = str(Path(sys.executable).parent / "vramancer")
CELERY = str(Path(sys.executable).parent / "celery")
TRUE_SPEC: dict[str, Any] = {"type": "cmd", "cmd": ["true"]}


def node_toml(
    node: str, *, nats_url: str | None, gpus: int, dispatch_interval_s: float | None = None
) -> str:
    """A node's config: default timers, ``gpus`` simulated GPUs of ``SLOTS_PER_WORKER`` slots."""
    lines = [f'node_name = "{node}"', ""]
    if nats_url is not None:
        lines += ["[nats]", f'url = "{nats_url}"', ""]
    lines += ["[tasks]", f"slots_per_device = {SLOTS_PER_WORKER}", "auto_maintenance = false"]
    if dispatch_interval_s is not None:
        lines += [f"dispatch_interval_s = {dispatch_interval_s}"]
    if nats_url is None:
        lines += ['synchronous = "normal"']
    for i in range(gpus):
        lines += ["", "[[devices.simulated]]", f'name = "{node}-sim{i}"', 'memory = "24GiB"']
    return "\n".join(lines) + "\n"


@dataclass
class Procs:
    """Processes started by one side; all killed (process group) by ``kill_all``."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, argv: list[str], workdir: Path, log: str, env: dict[str, str]) -> Any:
        with open(workdir / log, "ab") as out:
            proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        self.procs.clear()


def _vrm_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    return env | {
        "VRM_DATA_DIR": str(data_dir),
        "PYTHONUNBUFFERED": "1",
        "VRM_DISABLE_RATE_LIMIT": "1",
    }


class VramancerSide:
    """``vramancer serve`` (plus, for the pool, a nats-server and ``workers`` workers)."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        workers: int,
        *,
        pool: bool,
        dispatch_interval_s: float | None = None,
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.workers = workers
        self.pool = pool
        #: The orchestrator's (or embedded daemon's) ``[tasks] dispatch_interval_s``; None: default.
        self.dispatch_interval_s = dispatch_interval_s
        self.procs = Procs()
        self.nats: NatsServer | None = None
        self.url = ""
        self.client: httpx.Client | None = None
        self._done = 0

    def setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        nats_url = None
        if self.pool:
            binary = nats_server_binary()
            if binary is None:
                raise SystemExit("no nats-server (apt install nats-server)")
            self.nats = NatsServer(binary, self.workdir / "nats-store")
            self.nats.start()
            nats_url = self.nats.url
        gpus = 0 if self.pool else self.workers
        interval = self.dispatch_interval_s
        self._start_serve(
            node_toml("hub", nats_url=nats_url, gpus=gpus, dispatch_interval_s=interval)
        )
        if self.pool:
            for i in range(self.workers):
                self._start_worker(f"box{i}", nats_url)
            self._wait_nodes_up()
        self.run_once(WARMUP_TASKS)

    def _start_serve(self, config: str) -> None:
        port = free_port()
        (self.workdir / "hub.toml").write_text(config)
        argv = [VRAMANCER, "serve", "--port", str(port), "--config"]
        argv += [str(self.workdir / "hub.toml"), "--log-level", "warning"]
        proc = self.procs.start(argv, self.workdir, "hub.log", _vrm_env(self.workdir / "hub"))
        self.url = f"http://127.0.0.1:{port}"
        wait_http(self.url + "/healthz", timeout=60, proc=proc)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def _start_worker(self, name: str, nats_url: str | None) -> None:
        config = self.workdir / f"{name}.toml"
        config.write_text(node_toml(name, nats_url=nats_url, gpus=1))
        argv = [VRAMANCER, "worker", "--config", str(config), "--name", name]
        argv += ["--log-level", "warning"]
        self.procs.start(argv, self.workdir, f"{name}.log", _vrm_env(self.workdir / name))

    def _wait_nodes_up(self, timeout: float = 60.0) -> None:
        assert self.client is not None
        want = {f"box{i}" for i in range(self.workers)}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            nodes = self.client.get("/v1/cluster/nodes").json()["nodes"]
            if want <= {n["name"] for n in nodes if n["state"] == "up"}:
                return
            self._alive()
            time.sleep(0.2)
        raise TimeoutError(f"{self.name}: workers {sorted(want)} not up within {timeout}s")

    def _alive(self) -> None:
        for proc in self.procs.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{self.name}: {proc.args!r} exited with {proc.returncode}")

    def counts(self) -> dict[str, int]:
        assert self.client is not None
        answer = self.client.get("/api/tasks/stats")
        answer.raise_for_status()
        return {k: int(v) for k, v in answer.json()["counts"].items()}

    def wait_done(self, total: int, timeout_s: float = ROUND_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            counts = self.counts()
            if counts.get("failed", 0) or counts.get("cancelled", 0):
                raise RuntimeError(f"{self.name}: tasks did not succeed: {counts}")
            if counts.get("done", 0) >= total:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {counts} after {timeout_s:.0f}s, want {total}")
            self._alive()
            time.sleep(POLL_S)

    def submit(self, specs: list[dict[str, Any]]) -> None:
        assert self.client is not None
        for start in range(0, len(specs), BATCH):
            answer = self.client.post(
                "/api/tasks/submit_batch", json={"tasks": specs[start : start + BATCH]}
            )
            answer.raise_for_status()

    def run_once(self, n: int) -> float:
        """Seconds from the first submit until ``n`` ``true`` tasks are done."""
        t0 = time.perf_counter()
        self.submit([TRUE_SPEC] * n)
        self.wait_done(self._done + n)
        elapsed = time.perf_counter() - t0
        self._done += n
        return elapsed

    def latency(self, samples: int) -> list[float]:
        """Milliseconds from submit to the task's process start, one task at a time."""
        assert self.client is not None
        out_dir = self.workdir / "latency"
        out_dir.mkdir(exist_ok=True)
        found: list[float] = []
        for i in range(samples):
            stamp = out_dir / f"{i}.t"
            script = f"date +%s.%N > {stamp}.tmp; mv {stamp}.tmp {stamp}"
            spec = {"type": "cmd", "cmd": ["sh", "-c", script]}
            submitted = time.time()
            self.client.post("/api/tasks/submit", json=spec).raise_for_status()
            self.wait_done(self._done + 1, timeout_s=60)
            self._done += 1
            found.append((float(stamp.read_text()) - submitted) * 1000)
        return found

    def anomalies(self) -> dict[str, Any]:
        """Untimed, after the rounds: tasks whose lease ran out (their dispatch was lost and
        they were queued again) and the longest wait from submit to start, over every task."""
        assert self.client is not None
        lost, longest, cursor = 0, 0.0, None
        while True:
            params: dict[str, Any] = {"limit": 1000} | ({"cursor": cursor} if cursor else {})
            page = self.client.get("/api/tasks/history", params=params).json()
            for task in page["tasks"]:
                lost += int((task.get("lease_losses") or 0) > 0)
                if task["started_at"] is not None and task["submitted_at"] is not None:
                    longest = max(longest, task["started_at"] - task["submitted_at"])
            cursor = page["next_cursor"]
            if cursor is None:
                return {"tasks_with_lost_lease": lost, "longest_wait_s": round(longest, 2)}

    def teardown(self) -> None:
        if self.client is not None:
            self.client.close()
        self.procs.kill_all()
        if self.nats is not None:
            self.nats.stop(signal.SIGKILL)


class CelerySide:
    """One prefork Celery worker of ``concurrency`` processes on the run's private redis-server
    (one for the whole run: the Celery app reads its broker URL once, at import)."""

    name = "celery"

    def __init__(self, workdir: Path, concurrency: int, redis_server: RedisServer) -> None:
        self.workdir = workdir
        self.concurrency = concurrency
        self.redis = redis_server
        self.procs = Procs()

    def setup(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.redis.client.flushall()
        os.environ[REDIS_URL_ENV] = self.redis.url
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        argv = [CELERY, "-A", "bench.tasks.compare_celery_app", "worker", "--pool=prefork"]
        argv += [f"--concurrency={self.concurrency}", "--loglevel=WARNING", "--without-gossip"]
        argv += ["--without-mingle", "-Q", QUEUE_NAME]
        with contextlib.chdir(REPO_ROOT):
            self.procs.start(argv, self.workdir, "celery.log", env)
        self.run_once(WARMUP_TASKS)

    def _alive(self) -> None:
        for proc in self.procs.procs:
            if proc.poll() is not None:
                log = (self.workdir / "celery.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"celery worker exited with {proc.returncode}:\n{log}")

    def run_once(self, n: int) -> float:
        from bench.tasks.compare_celery_app import work as run_true

        self.redis.client.delete(DONE_KEY)
        t0 = time.perf_counter()
        for _ in range(n):
            run_true.delay("true")
        from bench.tasks.compare_redis import wait_counter  # the bench extra: redis

        wait_counter(self.redis.client, n, ROUND_TIMEOUT_S, self._alive)
        return time.perf_counter() - t0

    def teardown(self) -> None:
        for proc in self.procs.procs:
            from bench.tasks.compare_redis import stop_process

            stop_process(proc)
        self.procs.kill_all()


Side = VramancerSide | CelerySide


@contextlib.contextmanager
def running(sides: list[Side]) -> Iterator[list[Side]]:
    """Set every side up; tear every one down at the end, whatever happened."""
    try:
        for side in sides:
            side.setup()
        yield sides
    finally:
        for side in sides:
            with contextlib.suppress(Exception):
                side.teardown()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _latency_stats(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(_pct(values, 0.5), 1),
        "p99_ms": round(_pct(values, 0.99), 1),
        "max_ms": round(max(values), 1),
        "samples": len(values),
    }


def measure_level(
    root: Path, workers: int, args: argparse.Namespace, redis_server: RedisServer
) -> dict[str, Any]:
    """Throughput of the three sides at ``workers`` workers' worth of slots (and latency)."""
    concurrency = workers * SLOTS_PER_WORKER
    sides: list[Side] = [VramancerSide("pool", root / f"pool-{workers}", workers, pool=True)]
    if args.fast_interval:
        fast_dir = root / f"pool-fast-{workers}"
        fast = VramancerSide(
            "pool_fast", fast_dir, workers, pool=True, dispatch_interval_s=args.fast_interval
        )
        sides.append(fast)
    sides += [
        VramancerSide("embedded", root / f"embedded-{workers}", workers, pool=False),
        CelerySide(root / f"celery-{workers}", concurrency, redis_server),
    ]
    runs: dict[str, list[float]] = {s.name: [] for s in sides}
    result: dict[str, Any] = {"workers": workers, "concurrency": concurrency}
    with running(sides):
        for _ in range(args.rounds):
            for side in sides:
                runs[side.name].append(args.tasks / side.run_once(args.tasks))
        if args.latency and workers == args.workers[0]:
            result["latency"] = {
                s.name: _latency_stats(s.latency(args.latency))
                for s in sides
                if isinstance(s, VramancerSide)
            }
        result["anomalies"] = {s.name: s.anomalies() for s in sides if isinstance(s, VramancerSide)}
    for name, values in runs.items():
        result[name] = {
            "tasks_per_s": round(statistics.median(values), 1),
            "runs": [round(v, 1) for v in values],
        }
    for name in [s.name for s in sides if isinstance(s, VramancerSide) and s.pool]:
        rate = result[name]["tasks_per_s"]
        result[f"{name}_vs_embedded"] = round(rate / result["embedded"]["tasks_per_s"], 2)
        result[f"{name}_vs_celery"] = round(rate / result["celery"]["tasks_per_s"], 2)
    return result


def measure(args: argparse.Namespace) -> dict[str, Any]:
    levels = []
    with tempfile.TemporaryDirectory(prefix="vrm-bench-pool-") as tmp:
        from bench.tasks.compare_redis import RedisServer  # the bench extra: redis

        redis_server = RedisServer(Path(tmp))
        try:
            for workers in args.workers:
                levels.append(measure_level(Path(tmp), workers, args, redis_server))
                print(json.dumps(levels[-1]), file=sys.stderr, flush=True)
        finally:
            redis_server.stop()
    return {
        "tasks": args.tasks,
        "rounds": args.rounds,
        "slots_per_worker": SLOTS_PER_WORKER,
        "batch": BATCH,
        "pool_fast_dispatch_interval_s": args.fast_interval or None,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "levels": levels,
    }


def _worker_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--workers: not a list of integers: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"--workers: give counts >= 1, e.g. 1,2,4 (got {text!r})")
    return counts


def _print_table(result: dict[str, Any]) -> None:
    print(f"{result['tasks']} x true, median of {result['rounds']} rounds (tasks/s)")
    for level in result["levels"]:
        rates = ", ".join(
            f"{name} {level[name]['tasks_per_s']}"
            for name in ("pool", "pool_fast", "embedded", "celery")
            if name in level
        )
        ratios = ", ".join(
            f"{k} {v}" for k, v in level.items() if k.endswith(("_embedded", "_celery"))
        )
        print(f"{level['workers']} workers, {level['concurrency']} slots: {rates} ({ratios})")
        for name, stats in level.get("latency", {}).items():
            print(f"  latency {name}: p50 {stats['p50_ms']} ms, p99 {stats['p99_ms']} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--workers", type=_worker_counts, default=[1, 2, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency", type=int, default=50, help="latency samples (0: none)")
    parser.add_argument(
        "--fast-interval",
        type=float,
        default=0.0,
        help="also run a pool whose orchestrator has this dispatch_interval_s (0: not)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)


if __name__ == "__main__":
    main()
