"""``TaskService``: the GPU task scheduler of one machine, a facade over one module per concept.

* ``admission`` (pure): whether a submission may be queued (bounds, body, allow-list, devices,
  models, viewer limits) and what the queue stores of it;
* the durable queue behind the ``TaskQueue`` Protocol (``SqliteQueue`` by default, in
  ``<data_dir>/tasks.sqlite``); what becomes of a task is ``transitions.next_state`` (pure);
* ``dispatch`` (pure): one dispatch round, from device views (``picker``) built from the latest
  device snapshot, what the arbiter can still grant and our own running tasks: which ready tasks
  start where (priority, then expected run time from the ``RuntimeEstimator``, then submission
  order; aging first), which wait and why; ``rounds`` carries a round out (reads, leases,
  starts or hands over);
* ``workers``: one asyncio task per running user task, at most ``slots_per_device`` per GPU
  (``host_slots`` on the host of a machine without GPUs), with its VRAM reserved in the arbiter
  and, when it names a model, the model held (``models.use``) while it runs; ``launch`` (pure)
  says what its process is (argv, environment, cwd, ``CUDA_VISIBLE_DEVICES``);
* ``maintenance``: the in-process lane of maintenance tasks (idle windows, deadline, the
  daemon's own upkeep);
* ``logs``: each attempt's output, readable by the task's owner and admins;
* ``telemetry``: events, metrics and the counts per state, from the queue's ``Change``s.

This class owns the lifecycle (the data directory's lock and modes, taking back the leases of a
previous daemon, the loops), the dispatch loop (``run_once`` is one round, for deterministic
tests), lease heartbeats, back-off promotion, lease expiry and the retention purge.

Execution is at-least-once: the leases a crashed daemon held are taken back at the next start
(their leftover processes killed) and the tasks run again; completion is idempotent (see
``queue.py``), so each task ends as done at most once.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from vramancer.clock import Clock
from vramancer.errors import BackendUnavailable, Conflict, InvalidInput, NotFound
from vramancer.events import EventBus
from vramancer.files import (
    FILE_MODE,
    open_private,
    private_dir,
    tighten,
    tighten_tree,
    touch_private,
)
from vramancer.observability.metrics import Metrics
from vramancer.plugins import load_object
from vramancer.tasks import admission, logs, task_ids
from vramancer.tasks.admission import HIJACK_ENV, resolve_programs
from vramancer.tasks.blocks import BlockReader
from vramancer.tasks.device_views import LocalViews, waiting_reasons
from vramancer.tasks.errors import PayloadTooLarge
from vramancer.tasks.estimator import HistoryEstimator, RuntimeEstimator, as_runtime_estimator
from vramancer.tasks.launch import ENV_TASK_ID
from vramancer.tasks.logs import MAX_LOG_OFFSET
from vramancer.tasks.maintenance import AUTO_MAINTENANCE, MaintenanceLane
from vramancer.tasks.model import (
    LOCAL_OWNER,
    Change,
    HistoryPage,
    Submitted,
    TaskRecord,
    TaskSpec,
    TaskState,
)
from vramancer.tasks.picker import (
    PickerPolicy,
)
from vramancer.tasks.ports import (
    ArbiterPort,
    DevicesPort,
    MemoryPort,
    ModelsPort,
    PoolPort,
    ReleasesPort,
)
from vramancer.tasks.queue import TaskQueue
from vramancer.tasks.rounds import UserRounds
from vramancer.tasks.runner import kill_orphan
from vramancer.tasks.settings import TasksSettings
from vramancer.tasks.sqlite_queue import SqliteQueue
from vramancer.tasks.telemetry import TIME_BUCKETS, Telemetry
from vramancer.tasks.warm import WarmUnavailable
from vramancer.tasks.workers import Workers

__all__ = [
    "AUTO_MAINTENANCE",
    "ENV_TASK_ID",
    "HIJACK_ENV",
    "MAX_LOG_OFFSET",
    "TIME_BUCKETS",
    "PayloadTooLarge",
    "TaskService",
    "resolve_programs",
]

log = logging.getLogger(__name__)

#: Ended tasks deleted per purge (one write transaction; the next batch comes a round later).
PURGE_BATCH = 2000
#: Seconds between retention purges once there is no backlog.
PURGE_INTERVAL_S = 3600.0
#: A history cursor is a ``seq`` (a positive SQLite integer).
_CURSOR = re.compile(r"[0-9]{1,18}")


class TaskService:
    """Submit, schedule, run, retry and report tasks. See the module docstring."""

    def __init__(
        self,
        settings: TasksSettings,
        *,
        data_dir: Path,
        devices: DevicesPort,
        arbiter: ArbiterPort,
        memory: MemoryPort,
        events: EventBus,
        metrics: Metrics,
        clock: Clock,
        queue: TaskQueue | None = None,
        estimator: RuntimeEstimator | None = None,
        models: ModelsPort | None = None,
        pool: PoolPort | None = None,
        node: str | None = None,
        shared_queue: bool | None = None,
        releases: ReleasesPort | None = None,
    ) -> None:
        self.settings = settings
        #: The pool of machines this daemon schedules over (None: this machine alone).
        self.pool = pool
        #: The queue is shared by the nodes of a pool (a pool's orchestrator, or a worker): its
        #: leases belong to their nodes and are never all taken back at a start.
        self.shared_queue = pool is not None if shared_queue is None else shared_queue
        #: This node's name (``node_name``).
        self.node = node if node is not None else (pool.node if pool is not None else None)
        #: The model manager tasks may name a ``model`` of (None: tasks cannot).
        self.models = models
        self.data_dir = Path(data_dir)
        self.devices = devices
        self.arbiter = arbiter
        self.memory = memory
        self.events = events
        self.clock = clock
        self.queue: TaskQueue = queue or SqliteQueue(
            self.data_dir / "tasks.sqlite",
            synchronous=settings.synchronous,
            estimate_alpha=settings.estimate_alpha,
        )
        if estimator is None and settings.runtime_estimator:
            estimator = as_runtime_estimator(
                load_object(
                    settings.runtime_estimator, method="estimate", key="tasks.runtime_estimator"
                )
            )
        self._estimator_given = estimator
        self.estimator: RuntimeEstimator = estimator or HistoryEstimator(
            settings.default_estimate_s, settings.estimate_alpha
        )
        self.policy = PickerPolicy.from_settings(settings)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._waiters: list[tuple[set[str], asyncio.Event]] = []
        self.telemetry = Telemetry(
            metrics,
            events,
            observe=lambda key, run_s: self.estimator.observe(key, run_s),
            on_end=self._notify_end,
        )
        self.workers = Workers(
            settings,
            data_dir=self.data_dir,
            arbiter=arbiter,
            models=models,
            queue=self.queue,
            clock=clock,
            telemetry=self.telemetry,
            backoff=self.retry_delay,
            poke=self._poke,
            blocks=memory if isinstance(memory, BlockReader) else None,
            releases=releases,
        )
        #: What the dispatcher sees of this node's GPUs (``tasks/device_views.py``).
        self.views = LocalViews(devices, arbiter, self.workers.loads, settings, clock)
        #: The user lane's dispatch rounds (``tasks/rounds.py``).
        self.rounds = UserRounds(
            settings,
            queue=self.queue,
            workers=self.workers,
            views=self.views,
            policy=self.policy,
            telemetry=self.telemetry,
            worker_id=self.worker_id,
            pool=pool,
        )
        self.lane = MaintenanceLane(
            settings,
            idle_busy_ratio=self.policy.idle_busy_ratio,
            snapshot=lambda: self.devices.snapshot(),
            memory=memory,
            queue=self.queue,
            clock=clock,
            telemetry=self.telemetry,
            worker_id=self.worker_id,
            backoff=self.retry_delay,
            submit=lambda specs, owner: self.submit_batch(specs, owner=owner),
            poke=self._poke,
        )
        self._wake: asyncio.Event | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._lock_file: IO[bytes] | None = None
        self._started = False
        self._stopping = False
        #: Absolute paths of ``allowed_commands``, resolved at start from the daemon's PATH.
        self._programs: dict[str, str] = {}
        self._last_housekeep = -math.inf
        self._next_purge = -math.inf

    # ----------------------------------------------------------------------------- lifecycle

    async def start(self, *, dispatch: bool = True) -> None:
        """Open the queue, take back the leases of a previous daemon, start the loops.

        ``dispatch=False`` starts nothing in the background: tests drive ``run_once()``.
        """
        if self._started:
            return
        self._programs = resolve_programs(self.settings.allowed_commands)
        self.workers.programs = self._programs
        self.workers.closing = False
        await asyncio.to_thread(self._private_files)
        self._lock()
        try:
            await self.queue.open()
            self.telemetry.reset(await self.queue.counts())
            if self._estimator_given is None:
                learned = await self.queue.learned_durations()
                self.estimator = HistoryEstimator(
                    self.settings.default_estimate_s, self.settings.estimate_alpha, learned
                )
            # A pool's leases belong to its nodes: they run out by time, never at a start.
            changes, orphans = (
                await self.queue.expire_leases(
                    self.clock.time(),
                    all_leases=True,
                    max_lease_losses=self.settings.max_lease_losses,
                )
                if not self.shared_queue
                else ([], [])
            )
        except BaseException:
            self._unlock()
            raise
        for orphan in orphans:
            if kill_orphan(orphan.pid, orphan.pid_started, orphan.task_id):
                log.warning(
                    "killed leftover process group %d of task %s", orphan.pid, orphan.task_id
                )
        if changes:
            log.warning("requeued %d task(s) a previous daemon was running", len(changes))
        self._wake = asyncio.Event()
        self.telemetry.publish(changes)
        self._started = True
        self._stopping = self.lane.stopping = False
        if dispatch:
            self._loops = [
                asyncio.create_task(self._dispatch_loop(), name="tasks-dispatch"),
                asyncio.create_task(self._heartbeat_loop(), name="tasks-heartbeat"),
            ]
            if self.workers.warm is not None and self.settings.warm_preload:
                self._loops.append(asyncio.create_task(self._start_warm(), name="tasks-warm"))

    async def _start_warm(self) -> None:
        """Start the warm runner now, so the first ``python`` task finds its imports done."""
        assert self.workers.warm is not None
        with contextlib.suppress(WarmUnavailable):  # logged by the runner; tasks start cold
            await self.workers.warm.start()

    async def stop(self) -> None:
        """Stop dispatching; running tasks are stopped and queued again (not counted as tries)."""
        if not self._started:
            return
        self._stopping = self.lane.stopping = True
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        self._loops = []
        self.workers.release_all("daemon stopping")
        await self.drain(timeout_s=self.settings.kill_grace_s + 5)
        if self.workers.warm is not None:
            await self.workers.warm.stop()
        await self.queue.close()
        self._unlock()
        self._started = False

    def _private_files(self) -> None:
        """The data directory, the queue's database, logs and scratch space: this user's only
        (0700 / 0600), including what an earlier version created too open."""
        private_dir(self.data_dir)
        for name in ("tasks.sqlite", "tasks.sqlite-wal", "tasks.sqlite-shm", "tasks.lock"):
            tighten(self.data_dir / name, FILE_MODE)
        if isinstance(self.queue, SqliteQueue) and not self.queue.path.exists():
            # SQLite gives the -wal and -shm files the database's mode: create it 0600 first.
            touch_private(self.queue.path)
        for folder in ("task-logs", "scratch"):
            tighten_tree(self.data_dir / folder)

    def _lock(self) -> None:
        path = self.data_dir / "tasks.lock"
        handle = os.fdopen(open_private(path, append=True), "ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise Conflict(
                f"another VRAMancer daemon is using the task queue in {self.data_dir}"
            ) from None
        self._lock_file = handle

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # ----------------------------------------------------------------------------- submit

    async def submit(
        self,
        spec: TaskSpec | Mapping[str, Any],
        *,
        owner: str = LOCAL_OWNER,
        viewer: bool = False,
    ) -> Submitted:
        """Queue one task (durable when this returns); see ``submit_batch``."""
        return (await self.submit_batch([spec], owner=owner, viewer=viewer))[0]

    async def submit_batch(
        self,
        specs: Sequence[TaskSpec | Mapping[str, Any] | Any],
        *,
        owner: str = LOCAL_OWNER,
        viewer: bool = False,
    ) -> list[Submitted]:
        """Queue tasks in one transaction. Any bad task refuses the whole batch (nothing queued).

        ``owner`` (``model.owner_of``) owns the tasks: an idempotency key or task id of
        another owner's task is refused (``IdempotencyKeyTaken``, ``TaskIdTaken``, 409).
        ``viewer``: the caller has only the viewer role: ``[tasks] viewer_max_queued`` and
        ``viewer_max_payload_bytes`` apply (``QuotaExceeded`` 429, ``InvalidInput``).
        Raises ``InvalidInput`` (bad body, unknown GPU, VRAM no GPU can grant, a batch over
        ``[tasks] max_batch``, checked before any item is looked at), ``PayloadTooLarge``,
        ``Forbidden`` (a command ``[tasks] allowed_commands`` does not list). The caller
        checks roles (``admission.needs_operator``).
        """
        self._require_started()
        models = self.models
        ctx = admission.Context(
            settings=self.settings,
            programs=self._programs,
            snapshot=self.devices.snapshot(),
            budgets=lambda: self.arbiter.budget.devices,
            model_names=models.names if models is not None else None,
            estimate=self.estimator.estimate,
            node=self.node,
            pool=self.pool,
        )
        decision = admission.admit(specs, ctx, owner=owner, viewer=viewer)
        results, changes = await self.queue.submit(
            decision.tasks,
            self.clock.time(),
            max_open_maintenance=decision.max_open_maintenance,
        )
        self.telemetry.publish(changes)
        self._poke()
        return results

    # ----------------------------------------------------------------------------- queries

    async def status(self, task_id: str) -> TaskRecord:
        """The task ``task_id`` names: its full id or a unique start of it (``task_ids``); a
        ``waiting_gpu`` one with the reason it waits now."""
        record = await task_ids.find(self.queue, task_id)
        return self._live(record, self.waiting_reasons([record]))

    async def history(
        self,
        *,
        state: TaskState | None = None,
        since: float | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> HistoryPage:
        if cursor is not None and not _CURSOR.fullmatch(cursor):
            raise InvalidInput(
                f"cursor must be the next_cursor of a previous page (got {cursor!r})",
                field="cursor",
            )
        if not 1 <= limit <= 1000:
            raise InvalidInput(f"limit must be between 1 and 1000 (got {limit})")
        page = await self.queue.history(state=state, since=since, cursor=cursor, limit=limit)
        reasons = self.waiting_reasons(page.tasks)
        if reasons:
            page = replace(page, tasks=[self._live(r, reasons) for r in page.tasks])
        return page

    async def cancel(self, task_id: str) -> TaskRecord:
        """Cancel a task: at once when it waits; a running one is killed (then ``cancelled``).
        ``task_id``: its full id or a unique start of it (``task_ids``)."""
        task_id = (await self.status(task_id)).task_id
        record, changes = await self.queue.cancel(task_id, self.clock.time())
        if record is None:
            raise NotFound(f"no task {task_id!r}")
        if not changes and record.state.terminal:
            raise Conflict(f"task {task_id} already ended ({record.state})", state=record.state)
        self.telemetry.publish(changes)
        self.workers.cancel(task_id)
        return record

    async def logs(
        self,
        task_id: str,
        max_bytes: int | None = None,
        *,
        stdout_offset: int = 0,
        stderr_offset: int = 0,
        attempt: int | None = None,
        reader: str | None = None,
    ) -> dict[str, Any]:
        """stdout and stderr of one attempt (default: the latest), from byte offsets (bounded);
        ``stdout_next``/``stderr_next`` are the offsets to ask for next time (to follow a
        running task). See ``tasks/logs.py``.

        ``reader``: the owner id (``owner_of``) of a caller who may read only its own tasks'
        logs (None: any task's, an admin); another owner's task is ``Forbidden`` (403).
        """
        logs.check_query(max_bytes, stdout_offset, stderr_offset)
        record = await self.status(task_id)
        logs.check_reader(record, reader)
        if self.pool is not None and record.node not in (None, self.pool.node):
            query = {"max_bytes": max_bytes, "stdout_offset": stdout_offset}
            query |= {"stderr_offset": stderr_offset, "attempt": attempt}
            return await self.pool.logs(record, query)
        return await logs.read_logs(
            self.data_dir,
            record,
            max_output_bytes=self.settings.max_output_bytes,
            max_bytes=max_bytes,
            stdout_offset=stdout_offset,
            stderr_offset=stderr_offset,
            attempt=attempt,
        )

    def counts(self) -> dict[str, int]:
        """Tasks per state (both lanes)."""
        return self.telemetry.by_state()

    def maintenance_window(self) -> dict[str, Any]:
        """What maintenance waits for now (``MaintenanceLane.window``)."""
        return self.lane.window()

    async def wait(self, task_ids: Iterable[str], timeout_s: float | None = None) -> None:
        """Return once every task in ``task_ids`` has ended (raises ``TimeoutError``)."""
        pending = set(task_ids)
        event = asyncio.Event()
        entry = (pending, event)
        self._waiters.append(entry)
        try:
            states = await self.queue.states(list(pending))
            for task_id in list(pending):
                state = states.get(task_id)
                if state is None or state.terminal:
                    pending.discard(task_id)
            if pending:
                await asyncio.wait_for(event.wait(), timeout_s)
        finally:
            self._waiters.remove(entry)

    def retry_delay(self, attempts: int) -> float:
        """Back-off before the next try after ``attempts`` attempts: base × 2^(attempts-1)."""
        s = self.settings
        return min(s.backoff_max_s, s.backoff_base_s * 2.0 ** max(0, attempts - 1))

    # ----------------------------------------------------------------------------- dispatch

    async def run_once(self) -> int:
        """One dispatcher round: back-offs and leases, user tasks, maintenance. Returns started."""
        self._require_started()
        now = self.clock.time()
        await self._housekeep(now)
        return await self._round(now)

    async def _round(self, now: float) -> int:
        started = await self.rounds.run(now)
        await self.lane.queue_upkeep()
        return started + await self.lane.dispatch(now)

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait until every task this daemon started has ended."""
        tasks = self.workers.running()
        if self.lane.running is not None:
            tasks.append(self.lane.running)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def run_until_idle(self, max_rounds: int = 10_000) -> None:
        """Burst mode: rounds until nothing more can start and nothing runs (tests, benches)."""
        for _ in range(max_rounds):
            started = await self.run_once()
            running = bool(self.workers.active) or self.lane.running is not None
            await self.drain()
            if not started and not running:
                return

    async def _dispatch_loop(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            started = 0
            # Cleared before the round, not after: a wake-up that comes during the round
            # (a submission, a task that ended) starts the next one at once.
            self._wake.clear()
            try:
                now = self.clock.time()
                since = self.clock.monotonic() - self._last_housekeep
                if since >= self.settings.dispatch_interval_s:
                    await self._housekeep(now)
                started = await self._round(now)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task dispatch round failed")
            if started and self.rounds.room_left:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.dispatch_interval_s)

    async def _heartbeat_loop(self) -> None:
        period = max(0.05, self.settings.lease_s / 3)
        while not self._stopping:
            await asyncio.sleep(period)
            try:
                await self.queue.heartbeat(
                    self.worker_id, now=self.clock.time(), lease_s=self.settings.lease_s
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task lease heartbeat failed")

    async def _housekeep(self, now: float) -> None:
        self._last_housekeep = self.clock.monotonic()
        if self.pool is not None:
            await self._housekeep_pool(now)
            return
        promoted, (expired, orphans) = await asyncio.gather(
            self.queue.promote_due(now),
            self.queue.expire_leases(now, max_lease_losses=self.settings.max_lease_losses),
        )
        for change in expired:
            self.workers.lost(change.task_id)
        for orphan in orphans:
            if orphan.task_id not in self.workers.active:
                kill_orphan(orphan.pid, orphan.pid_started, orphan.task_id)
        self.telemetry.publish([*promoted, *expired])
        await self._purge(now)

    async def _housekeep_pool(self, now: float) -> None:
        """In a pool only the orchestrator holding the dispatch lease promotes back-offs and
        takes back the leases of nodes that stopped renewing them; their processes run on
        other hosts, so nothing is killed here (a node stops what it lost itself)."""
        assert self.pool is not None
        if not self.pool.may_dispatch():
            return
        promoted = await self.queue.promote_due(now)
        expired: list[Change] = []
        if self.pool.may_take_back():
            expired, _ = await self.queue.expire_leases(
                now, max_lease_losses=self.settings.max_lease_losses
            )
        self.telemetry.publish([*promoted, *expired])
        await self._purge(now)

    async def _purge(self, now: float) -> int:
        """Retention: delete tasks that ended over ``retention_s`` ago, and their logs, in
        batches of ``PURGE_BATCH`` (one per round while there is a backlog, then hourly)."""
        retention = self.settings.retention_s
        mono = self.clock.monotonic()
        if retention <= 0 or mono < self._next_purge:
            return 0
        purged = await self.queue.purge(ended_before=now - retention, limit=PURGE_BATCH)
        self._next_purge = mono if len(purged) == PURGE_BATCH else mono + PURGE_INTERVAL_S
        if not purged:
            return 0
        self.telemetry.purged(purged)
        await asyncio.to_thread(logs.remove_logs, self.data_dir, purged)
        log.info(
            "retention: deleted %d task(s) that ended before the last %gs", len(purged), retention
        )
        return len(purged)

    def waiting_reason(self, record: TaskRecord) -> str | None:
        """Why ``record`` waits for a device, from the state now (the dispatcher's rule,
        ``picker.ineligibility``): None unless it is ``waiting_gpu``."""
        return self.waiting_reasons([record]).get(record.task_id)

    def waiting_reasons(self, records: Sequence[TaskRecord]) -> dict[str, str]:
        """:meth:`waiting_reason` of each ``waiting_gpu`` record, by task id (views read once)."""
        if not any(r.state is TaskState.WAITING_GPU for r in records):
            return {}
        if self.pool is not None:
            return waiting_reasons(
                records, self.pool.views(self.clock.time()), self.policy, pool=True
            )
        return waiting_reasons(records, self.views.now(), self.policy, pool=False)

    def _live(self, record: TaskRecord, reasons: Mapping[str, str]) -> TaskRecord:
        reason = reasons.get(record.task_id)
        return record if reason is None else replace(record, error=reason)

    # ----------------------------------------------------------------------------- plumbing

    def _notify_end(self, task_id: str) -> None:
        for pending, event in self._waiters:
            if task_id in pending:
                pending.discard(task_id)
                if not pending:
                    event.set()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def wake(self) -> None:
        """Run a dispatch round now (something changed that may let a task start)."""
        self._poke()

    def _require_started(self) -> None:
        if not self._started:
            raise BackendUnavailable("the task service is not started")
