"""The Redis-backed competitors: a private ``redis-server``; Celery, RQ, huey and Dramatiq runners.

Each runner starts its framework's own worker command (the one its docs tell users to run) with
two worker processes, warms it up, then per run: empty the done list, submit ``n`` tasks doing
the run's work (``compare_common.Work``) the way a user would (bulk where the framework has a
bulk call), and poll the list's length until it reaches ``n``. A latency sample submits one task
that marks its start and blocks on the done list (``BLPOP``) until it ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.tasks.compare_common import DONE_KEY, QUEUE_NAME, REDIS_URL_ENV, STARTED_KEY, now
from bench.tasks.cpu import ProcessCpu

#: Worker processes per competitor: every system gets the same concurrency.
WORKERS = 2
#: How often the driver polls the done counter.
POLL_S = 0.005
#: A worker pool that does not come up within this many seconds is a failure.
READY_TIMEOUT_S = 60.0
#: Tasks submitted once per system before timing, so imports and connections are warm.
WARMUP_TASKS = 50
#: Dramatiq's prefetch per process. Its default is 2 x threads (2 here), and a consumer whose
#: prefetch is full sleeps with an exponential backoff: ~550 tasks/s here. 16 is the prefetch it
#: would have with its default 8 threads; execution stays one thread per process.
DRAMATIQ_PREFETCH = 16
#: Repository root: worker commands run there so ``bench.tasks.*`` imports.
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout_s)
            return
        except subprocess.TimeoutExpired:
            continue


class RedisServer:
    """A throw-away ``redis-server`` on a free port, without persistence (RDB and AOF off)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._log = open(workdir / "redis.log", "wb")  # noqa: SIM115 - closed in stop()
        self._proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not start; see redis.log") from None
                time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def version(self) -> str:
        info: dict[str, Any] = self.client.info("server")
        return str(info.get("redis_version", "?"))

    def stop(self) -> None:
        stop_process(self._proc)
        self._log.close()


@dataclass
class RunResult:
    """One timed run: submit ``n`` tasks, wait until all are done."""

    n: int
    submit_s: float
    total_s: float
    #: CPU seconds (user + system) of every process involved, children included.
    cpu_s: float = 0.0

    @property
    def tasks_per_s(self) -> float:
        return self.n / self.total_s

    @property
    def submit_per_s(self) -> float:
        return self.n / self.submit_s

    @property
    def cpu_ms_per_task(self) -> float:
        return self.cpu_s / self.n * 1000


@dataclass
class LatencySample:
    """One task alone: from the submit call to its start, and to the moment its end is seen."""

    to_start_s: float
    to_done_s: float


def wait_counter(client: redis.Redis, n: int, timeout_s: float, alive: Callable[[], None]) -> None:
    """Poll the done list until it holds ``n`` entries; ``alive`` raises if the workers died."""
    deadline = time.monotonic() + timeout_s
    while True:
        done = int(client.llen(DONE_KEY))
        if done >= n:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {done}/{n} tasks done after {timeout_s:.0f}s")
        alive()
        time.sleep(POLL_S)


class RedisCompetitor:
    """Base runner: worker processes from ``worker_commands``, tasks from ``submit``."""

    name = ""
    library = ""
    concurrency = ""
    submit_how = ""

    def __init__(self, server: RedisServer, workdir: Path, timeout_s: float) -> None:
        self.server = server
        self.workdir = workdir
        self.timeout_s = timeout_s
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[Any] = []

    # -- to override -------------------------------------------------------------------------
    def worker_commands(self) -> list[list[str]]:
        raise NotImplementedError

    def worker_env(self) -> dict[str, str]:
        """Extra environment for the worker processes."""
        return {}

    def submit(self, n: int, work: str, mark: bool = False) -> None:
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Start the workers and push a warm-up batch through them."""
        os.environ[REDIS_URL_ENV] = self.server.url
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
        env.update(self.worker_env())
        for i, cmd in enumerate(self.worker_commands()):
            log = open(self.workdir / f"{self.name}-worker{i}.log", "wb")  # noqa: SIM115
            self._logs.append(log)
            self._procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=REPO_ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        self.server.client.delete(DONE_KEY, STARTED_KEY)
        for work in ("noop", "true", "python"):  # imports of every kind, before any timing
            self.submit(WARMUP_TASKS // 3, work)
        wait_counter(self.server.client, 3 * (WARMUP_TASKS // 3), READY_TIMEOUT_S, self._alive)

    def run_once(self, n: int, work: str) -> RunResult:
        """Submit ``n`` tasks doing ``work``, wait for all of them; return the timings."""
        self.server.client.delete(DONE_KEY, STARTED_KEY)
        cpu = ProcessCpu([self.server.pid, *(p.pid for p in self._procs)])
        t0 = time.perf_counter()
        self.submit(n, work)
        t1 = time.perf_counter()
        wait_counter(self.server.client, n, self.timeout_s, self._alive)
        t2 = time.perf_counter()
        return RunResult(n=n, submit_s=t1 - t0, total_s=t2 - t0, cpu_s=cpu.used_s())

    def latency_once(self, work: str) -> LatencySample:
        """One task alone, marked at its start; its end is awaited with ``BLPOP``."""
        client = self.server.client
        client.delete(DONE_KEY, STARTED_KEY)
        t0 = now()
        self.submit(1, work, mark=True)
        popped = client.blpop([DONE_KEY], timeout=self.timeout_s)
        seen = now()
        if popped is None:
            self._alive()
            raise TimeoutError(f"one {work} task not done after {self.timeout_s:.0f}s")
        started = client.lpop(STARTED_KEY)
        to_start = float(started) - t0 if started is not None else float("nan")
        return LatencySample(to_start_s=to_start, to_done_s=seen - t0)

    def latency(self, work: str, samples: int) -> list[LatencySample]:
        """``samples`` tasks one after the other (after one untimed task)."""
        self.latency_once(work)
        return [self.latency_once(work) for _ in range(samples)]

    def teardown(self) -> None:
        for proc in self._procs:
            stop_process(proc)
        for log in self._logs:
            log.close()
        self.server.client.flushall()

    def _alive(self) -> None:
        for i, proc in enumerate(self._procs):
            if proc.poll() is not None:
                log = (self.workdir / f"{self.name}-worker{i}.log").read_text(errors="replace")
                raise RuntimeError(
                    f"{self.name} worker exited with {proc.returncode}:\n{log[-2000:]}"
                )


def _bin(name: str) -> str:
    """A console script of the venv running this benchmark."""
    return str(Path(sys.executable).parent / name)


class CeleryRunner(RedisCompetitor):
    name = "celery"
    library = "celery"
    concurrency = f"1 worker, prefork pool, --concurrency={WORKERS} (2 processes)"
    submit_how = "task.delay() per task"

    def worker_commands(self) -> list[list[str]]:
        return [
            [
                _bin("celery"),
                "-A",
                "bench.tasks.compare_celery_app",
                "worker",
                "--pool=prefork",
                f"--concurrency={WORKERS}",
                "--loglevel=WARNING",
                "--without-gossip",
                "--without-mingle",
                "-Q",
                QUEUE_NAME,
            ]
        ]

    def submit(self, n: int, work: str, mark: bool = False) -> None:
        from bench.tasks.compare_celery_app import work as task

        for _ in range(n):
            task.delay(work, mark)


class RqRunner(RedisCompetitor):
    name = "rq"
    library = "rq"
    concurrency = f"{WORKERS} `rq worker` processes (default Worker: forks a work horse per job)"
    submit_how = "Queue.enqueue_many (one pipeline)"

    def worker_commands(self) -> list[list[str]]:
        return [
            [
                _bin("rq"),
                "worker",
                "--url",
                self.server.url,
                "--logging_level",
                "WARNING",
                "--name",
                f"bench-{i}-{os.getpid()}",
                QUEUE_NAME,
            ]
            for i in range(WORKERS)
        ]

    def submit(self, n: int, work: str, mark: bool = False) -> None:
        from rq import Callback, Queue

        from bench.tasks.compare_rq_app import record_done
        from bench.tasks.compare_rq_app import work as job

        queue = Queue(QUEUE_NAME, connection=self.server.client)
        on_success = Callback(record_done)
        queue.enqueue_many(
            [Queue.prepare_data(job, args=(work, mark), on_success=on_success) for _ in range(n)]
        )


class HueyRunner(RedisCompetitor):
    name = "huey"
    library = "huey"
    concurrency = f"huey_consumer -k process -w {WORKERS} (2 processes)"
    submit_how = "calling the task (one enqueue per task)"

    def worker_commands(self) -> list[list[str]]:
        return [
            [
                _bin("huey_consumer"),
                "bench.tasks.compare_huey_app.huey",
                "-k",
                "process",
                "-w",
                str(WORKERS),
                "--quiet",
            ]
        ]

    def submit(self, n: int, work: str, mark: bool = False) -> None:
        from bench.tasks.compare_huey_app import work as task

        for _ in range(n):
            task(work, mark)


class DramatiqRunner(RedisCompetitor):
    name = "dramatiq"
    library = "dramatiq"
    concurrency = (
        f"dramatiq --processes {WORKERS} --threads 1 (2 processes), "
        f"dramatiq_queue_prefetch={DRAMATIQ_PREFETCH}"
    )
    submit_how = "actor.send() per task"

    def worker_env(self) -> dict[str, str]:
        return {"dramatiq_queue_prefetch": str(DRAMATIQ_PREFETCH)}

    def worker_commands(self) -> list[list[str]]:
        return [
            [
                _bin("dramatiq"),
                "bench.tasks.compare_dramatiq_app",
                "--processes",
                str(WORKERS),
                "--threads",
                "1",
                "--queues",
                QUEUE_NAME,
            ]
        ]

    def submit(self, n: int, work: str, mark: bool = False) -> None:
        from bench.tasks.compare_dramatiq_app import work as actor

        for _ in range(n):
            actor.send(work, mark)


COMPETITORS: dict[str, type[RedisCompetitor]] = {
    r.name: r for r in (CeleryRunner, RqRunner, HueyRunner, DramatiqRunner)
}
