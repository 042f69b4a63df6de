"""The VRAMancer side of the task-queue comparison: embedded (Python API) and over HTTP.

Both use the library the way a user would:

* embedded: ``async with Runtime(Settings(data_dir=<tmp>, tasks={...})) as rt`` then
  ``rt.tasks.submit_batch([...])`` and ``rt.tasks.wait(ids)``; a fresh runtime and data
  directory per run (start-up is not timed), a warm-up batch first;
* HTTP: one real ``vramancer serve`` (started like ``tests.helpers.start_server``, with
  ``VRM_DISABLE_RATE_LIMIT=1``), ``POST /api/tasks/submit_batch``, then polling
  ``GET /api/tasks/stats`` until every task is done.

The work of a task (``compare_common.Work``) is a ``noop`` task, a ``cmd`` task ``["true"]`` or
a ``python`` task calling ``bench.tasks.compare_common:pyfunc``; ``cmd`` and ``python`` tasks run
on the CPU-only host's ``host_slots`` (2 by default: the competitors' two worker processes).

``noop`` is a maintenance task: VRAMancer runs it in-process, in batches, only after the devices
were idle for ``[tasks] maintenance_idle_s`` (5 s by default), while the host CPU is not busier
than ``maintenance_max_cpu_ratio`` (0.9), and never ahead of a user task. The benchmark sets
``maintenance_idle_s = 0`` and ``maintenance_max_cpu_ratio = 1.0`` (the benchmark itself keeps
the CPU busy) so the queue, not the idle window, is measured.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx

from bench.tasks.compare_common import Work, now
from bench.tasks.compare_redis import REPO_ROOT, LatencySample, RunResult
from bench.tasks.cpu import ProcessCpu
from vramancer import Runtime, Settings
from vramancer.tasks.settings import Synchronous, TasksSettings

_T = TypeVar("_T")

#: Tasks pushed through before the timed part of each run.
WARMUP_TASKS = 50
#: ``[tasks]`` settings the benchmark changes from the defaults (nothing else). The warm Python
#: runner preloads the module of the benchmark's function, as the peers' workers import it
#: once: what a user running many tasks of one module configures.
BENCH_TASKS_SETTINGS: dict[str, Any] = {
    "maintenance_idle_s": 0,
    "maintenance_max_cpu_ratio": 1.0,
    "warm_preload": ["bench.tasks.compare_common"],
}
#: How often the HTTP runner asks whether the tasks are done.
HTTP_POLL_S = 0.01


def _describe_durability(synchronous: Synchronous) -> str:
    """What an acknowledged task survives, from the queue's ``synchronous`` setting.

    As ``vramancer/tasks/sqlite_queue.py`` documents it: commits group several operations;
    with FULL the ones that answer a user (submission, cancel, a task's end) are fsynced, the
    dispatcher's bookkeeping (leases, running marks, heartbeats) is not (a power cut that loses
    a lease only makes the task run again).
    """
    fsync = (
        "synchronous=FULL: the group commit holding a submission is fsynced before "
        "submit_batch answers, so every acknowledged task survives a daemon crash and a power "
        "cut; a task's end (done) is fsynced too; leases are committed without fsync"
        if synchronous is Synchronous.FULL
        else "synchronous=NORMAL: WAL written, never fsynced; an acknowledged task survives a "
        "daemon crash, a power cut may lose the last commits"
    )
    return (
        f"SQLite WAL file in the data directory, group commit (one transaction per writer "
        f"wake-up); {fsync}. At-least-once: a dead daemon's leases are taken back at restart "
        "and those tasks run again; completion is idempotent."
    )


def _spec(work: str) -> dict[str, Any]:
    """The task body doing ``work``, as a user would submit it."""
    if work == Work.TRUE.value:
        return {"type": "cmd", "cmd": ["true"]}
    if work == Work.PYTHON.value:
        return {
            "type": "python",
            "python": "bench.tasks.compare_common:pyfunc",
            "cwd": str(REPO_ROOT),
        }
    return {"type": "noop"}


def _specs(n: int, work: str) -> list[dict[str, Any]]:
    return [_spec(work) for _ in range(n)]


def _chunks(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]


class EmbeddedRunner:
    """VRAMancer's ``TaskService`` driven through ``Runtime`` in this process, on asyncio's own
    event loop (``asyncio.run``: what a plain script gets)."""

    name = "vramancer"
    library = "vramancer"
    submit_how = "rt.tasks.submit_batch (one call per max_batch tasks), rt.tasks.wait(ids)"
    loop_name = "asyncio"

    def __init__(self, workdir: Path, timeout_s: float, batch: int | None = None) -> None:
        self.workdir = workdir
        self.timeout_s = timeout_s
        self.tasks_settings = TasksSettings(**BENCH_TASKS_SETTINGS)
        self.batch = min(batch or self.tasks_settings.max_batch, self.tasks_settings.max_batch)
        self.durability = _describe_durability(self.tasks_settings.synchronous)
        self.concurrency = (
            f"{self.loop_name} event loop, "
            f"{self.tasks_settings.host_slots} host slots (a process per cmd/python task; "
            "python forks from the warm runner, which preloaded the function's module); "
            "noop: the in-process maintenance runner, "
            f"leased batches of up to {self.tasks_settings.maintenance_batch}"
        )
        self._runs = itertools.count()

    def setup(self) -> None:
        self.run_once(WARMUP_TASKS, Work.NOOP.value)  # imports, SQLite and pydantic warm-up

    def teardown(self) -> None:
        return None

    def run_once(self, n: int, work: str) -> RunResult:
        data_dir = self.workdir / f"{self.name}-embedded-{next(self._runs)}"
        return self._run_loop(self._run(n, work, data_dir))

    def latency(self, work: str, samples: int) -> list[LatencySample]:
        """``samples`` tasks one at a time through one fresh runtime (after a warm-up task)."""
        data_dir = self.workdir / f"{self.name}-latency-{next(self._runs)}"
        return self._run_loop(self._latency(work, samples, data_dir))

    def _run_loop(self, main: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run(main)

    async def _latency(self, work: str, samples: int, data_dir: Path) -> list[LatencySample]:
        result: list[LatencySample] = []
        async with Runtime(self._settings(data_dir)) as rt:
            for i in range(samples + 1):
                t0 = now()
                spec = await rt.tasks.submit(_spec(work))
                await rt.tasks.wait([spec.task_id], timeout_s=self.timeout_s)
                seen = now()
                record = await rt.tasks.status(spec.task_id)
                started = record.started_at if record.started_at is not None else float("nan")
                if i:  # the first one warms the runtime up
                    result.append(LatencySample(to_start_s=started - t0, to_done_s=seen - t0))
        return result

    def _settings(self, data_dir: Path) -> Settings:
        return Settings(
            data_dir=data_dir,
            tasks=self.tasks_settings,
            disable_rate_limit=True,
        )

    async def _run(self, n: int, work: str, data_dir: Path) -> RunResult:
        async with Runtime(self._settings(data_dir)) as rt:
            warm = await rt.tasks.submit_batch(_specs(WARMUP_TASKS, work))
            await rt.tasks.wait([s.task_id for s in warm], timeout_s=self.timeout_s)
            cpu = ProcessCpu([])
            t0 = time.perf_counter()
            ids: list[str] = []
            for size in _chunks(n, self.batch):
                ids.extend(s.task_id for s in await rt.tasks.submit_batch(_specs(size, work)))
            t1 = time.perf_counter()
            await rt.tasks.wait(ids, timeout_s=self.timeout_s)
            t2 = time.perf_counter()
            cpu_s = cpu.used_s()
            done = rt.tasks.counts()["done"]
            if done != n + WARMUP_TASKS:
                raise RuntimeError(f"expected {n + WARMUP_TASKS} tasks done, counted {done}")
        return RunResult(n=n, submit_s=t1 - t0, total_s=t2 - t0, cpu_s=cpu_s)


class UvloopRunner(EmbeddedRunner):
    """The same, on uvloop's event loop (``uvloop.run``): the loop ``vramancer serve`` and
    ``vramancer pool worker`` run on, and the one to give an embedded runtime."""

    name = "vramancer_uvloop"
    loop_name = "uvloop"

    def _run_loop(self, main: Coroutine[Any, Any, _T]) -> _T:
        import uvloop

        return uvloop.run(main)


class HttpRunner:
    """VRAMancer over HTTP: ``POST /api/tasks/submit_batch`` to a real ``vramancer serve``."""

    name = "vramancer_http"
    library = "vramancer"
    submit_how = "POST /api/tasks/submit_batch (max_batch tasks per request), then polling"

    def __init__(self, workdir: Path, timeout_s: float, batch: int | None = None) -> None:
        self.workdir = workdir / "vramancer-http"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.timeout_s = timeout_s
        self.tasks_settings = TasksSettings(**BENCH_TASKS_SETTINGS)
        self.batch = min(batch or self.tasks_settings.max_batch, self.tasks_settings.max_batch)
        self.durability = _describe_durability(self.tasks_settings.synchronous)
        self.concurrency = (
            f"vramancer serve (1 uvicorn process), {self.tasks_settings.host_slots} host slots; "
            "noop: the in-process maintenance runner"
        )
        self._server: Any = None
        self._client: httpx.Client | None = None
        self._done_before = 0

    def setup(self) -> None:
        from tests.helpers import start_server

        config = "[tasks]\n" + "".join(f"{k} = {v!r}\n" for k, v in BENCH_TASKS_SETTINGS.items())
        self._server = start_server(
            self.workdir, config, env={"VRM_DISABLE_RATE_LIMIT": "1"}, timeout=60
        )
        self._client = httpx.Client(base_url=self._server.url, timeout=self.timeout_s)
        self.run_once(WARMUP_TASKS, Work.NOOP.value)

    def teardown(self) -> None:
        if self._client is not None:
            self._client.close()
        if self._server is not None:
            self._server.stop()
            if self._server.proc.stdout:
                self._server.proc.stdout.close()

    def run_once(self, n: int, work: str) -> RunResult:
        assert self._client is not None and self._server is not None
        client = self._client
        cpu = ProcessCpu([self._server.proc.pid])
        t0 = time.perf_counter()
        ids: list[str] = []
        for size in _chunks(n, self.batch):
            answer = client.post("/api/tasks/submit_batch", json={"tasks": _specs(size, work)})
            answer.raise_for_status()
            ids.extend(answer.json()["task_ids"])
        t1 = time.perf_counter()
        self._wait_done(client, self._done_before + n)
        t2 = time.perf_counter()
        self._done_before += n
        if len(ids) != n:
            raise RuntimeError(f"submitted {n} tasks, got {len(ids)} ids back")
        cpu_s = cpu.used_s()
        self._check_done(client, ids)
        return RunResult(n=n, submit_s=t1 - t0, total_s=t2 - t0, cpu_s=cpu_s)

    def _wait_done(self, client: httpx.Client, total: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            done = self._count_done(client)
            if done >= total:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {done}/{total} tasks done after {self.timeout_s:.0f}s")
            time.sleep(HTTP_POLL_S)

    def _count_done(self, client: httpx.Client) -> int:
        """Tasks ended ``done``, from ``GET /api/tasks/stats`` (counts per state)."""
        answer = client.get("/api/tasks/stats")
        answer.raise_for_status()
        return int(answer.json()["counts"]["done"])

    def _check_done(self, client: httpx.Client, ids: list[str]) -> None:
        """Untimed check: the first and last task of the run report ``done``."""
        for task_id in (ids[0], ids[-1]):
            answer = client.get("/api/tasks/status", params={"task_id": task_id})
            answer.raise_for_status()
            state = answer.json()["state"]
            if state != "done":
                raise RuntimeError(f"task {task_id} is {state} after the run")
