"""``TaskService``: the GPU task scheduler of one machine (seed 004 MAESTRO + per-GPU workers).

Pieces, each replaceable:

* a durable queue behind the ``TaskQueue`` Protocol (``SqliteQueue`` by default, in
  ``<data_dir>/tasks.sqlite``);
* the device picker (``picker.pick``), a pure function of device views built from the latest
  device snapshot, the arbiter's reservations and our own running tasks;
* local workers: one asyncio task per running task, at most ``slots_per_device`` per GPU
  (``host_slots`` on the host of a machine without GPUs); each runs its process (``runner``)
  with ``CUDA_VISIBLE_DEVICES`` set, in a scratch directory, with its VRAM reserved in the
  arbiter while it runs;
* a dispatcher loop (``run_once`` is one round, for deterministic tests) that takes ready tasks
  in order (priority, then expected run time from the ``RuntimeEstimator``, then submission
  order), places them, and leases them; plus a heartbeat loop that keeps the leases alive;
* a task that names a ``model`` (a managed model) runs inside ``models.use(model)``: the model
  is loaded on demand before the process starts and held against the idle reaper and eviction
  until the process ends; a model that cannot be loaded fails the attempt (retry policy);
* maintenance tasks (warmup, compress, noop) run in-process, only after the devices were idle for
  ``maintenance_idle_s`` and while no user task waits or runs.

Execution is at-least-once: the leases a crashed daemon held are taken back at the next start
(their leftover processes killed) and the tasks run again; completion is idempotent (see
``queue.py``), so each task ends as done at most once.

``CUDA_VISIBLE_DEVICES`` is the GPU's CUDA index for a real CUDA GPU (with
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, the order NVML and the device manager number GPUs in), and the
empty string on a simulated GPU or the host (the task must not touch a GPU it was not given).
``VRM_TASK_ID``, ``VRM_TASK_ATTEMPT``, ``VRM_DEVICE`` (``gpu:N`` or ``host``) and
``VRM_SCRATCH_DIR`` are always set (``VRM_MODEL*`` too when the task names a model, see
``_model_env``); inherited ``VRM_*`` variables of the daemon (its API
token ...) are not passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from vramancer.arbiter.types import WorkloadType
from vramancer.clock import Clock
from vramancer.devices.types import SystemSnapshot
from vramancer.errors import (
    BackendUnavailable,
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
)
from vramancer.errors import ShuttingDown as VramancerShuttingDown
from vramancer.events import EventBus
from vramancer.observability.metrics import Metrics
from vramancer.tasks.dispatch import RoundPlan
from vramancer.tasks.estimator import HistoryEstimator, RuntimeEstimator
from vramancer.tasks.model import (
    LEASED_STATES,
    READY_STATES,
    Change,
    Grant,
    HistoryPage,
    NewTask,
    Outcome,
    OutcomeKind,
    Submitted,
    TaskRecord,
    TaskSpec,
    TaskState,
    TaskType,
)
from vramancer.tasks.picker import (
    HOST,
    DeviceView,
    LocalLoad,
    PickerPolicy,
    build_views,
    gpu_name,
)
from vramancer.tasks.ports import ArbiterPort, DevicesPort, MemoryPort, ModelsPort
from vramancer.tasks.queue import Purged, TaskQueue
from vramancer.tasks.runner import ProcessRun, RunRequest, RunResult, kill_orphan
from vramancer.tasks.settings import TasksSettings
from vramancer.tasks.sqlite_queue import SqliteQueue
from vramancer.units import format_size

log = logging.getLogger(__name__)

#: Histogram buckets (seconds) of task wait and run times.
TIME_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
#: Environment variables a task always gets (they override the task's own ``env``).
ENV_TASK_ID = "VRM_TASK_ID"
#: Environment variables of the daemon with this prefix are not passed to tasks.
_PRIVATE_ENV_PREFIX = "VRM_"
_TERMINAL = (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)
#: Variables (besides ``LD_*`` and ``DYLD_*``) that make a program load or run other code; a
#: task may not set them while ``allowed_commands`` restricts what runs.
HIJACK_ENV = frozenset(
    {
        "BASH_ENV",
        "ENV",
        "GCONV_PATH",
        "NODE_OPTIONS",
        "PERL5LIB",
        "PERL5OPT",
        "PERLLIB",
        "PYTHONHOME",
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "RUBYLIB",
        "RUBYOPT",
    }
)
#: Ended tasks deleted per purge (one write transaction; the next batch comes a round later).
PURGE_BATCH = 2000
#: Seconds between retention purges once there is no backlog.
PURGE_INTERVAL_S = 3600.0
#: Overdue tasks (aging) offered first per dispatch round, at most.
OVERDUE_MAX = 8
#: A history cursor is a ``seq`` (a positive SQLite integer).
_CURSOR = re.compile(r"[0-9]{1,18}")
#: Largest byte offset accepted when reading a task's logs.
MAX_LOG_OFFSET = 2**53


class PayloadTooLarge(InvalidInput):
    """A task body over ``[tasks] max_payload_bytes``."""

    code = "payload_too_large"
    http_status = 413


@dataclass
class _Active:
    """A user task this daemon runs now."""

    record: TaskRecord
    device: str
    cuda_index: int | None
    vram_bytes: int
    allocation_id: str | None = None
    run: ProcessRun | None = None
    pgid: int | None = None
    #: A user asked to cancel it.
    cancel: bool = False
    #: Stopped for a reason that is not the task's fault (shutdown, preemption): requeue it.
    release_reason: str | None = None
    #: Its lease was taken back: whatever it reports is stale.
    lost: bool = False
    task: asyncio.Task[None] | None = None
    #: ``VRM_MODEL*`` variables describing the held model (empty: the task names none).
    model_env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        if self.run is not None:
            self.run.cancel()


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
    ) -> None:
        self.settings = settings
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
        self._estimator_given = estimator
        self.estimator: RuntimeEstimator = estimator or HistoryEstimator(
            settings.default_estimate_s, settings.estimate_alpha
        )
        self.policy = PickerPolicy.from_settings(settings)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self._active: dict[str, _Active] = {}
        self._counts: dict[tuple[bool, TaskState], int] = {}
        self._waiters: list[tuple[set[str], asyncio.Event]] = []
        self._children: dict[tuple[int, str], Any] = {}
        self._wake: asyncio.Event | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._maintenance: asyncio.Task[None] | None = None
        self._lock_file: IO[bytes] | None = None
        self._started = False
        self._stopping = False
        self._idle_since: float | None = None
        self._last_housekeep = -math.inf
        self._next_purge = -math.inf
        self._m_submitted = metrics.counter(
            "vramancer_tasks_submitted_total", "Tasks accepted into the queue.", ["type"]
        )
        self._m_completed = metrics.counter(
            "vramancer_tasks_completed_total", "Tasks that ended done.", ["type"]
        )
        self._m_failed = metrics.counter(
            "vramancer_tasks_failed_total", "Tasks that ended failed after their retries.", ["type"]
        )
        self._m_running = metrics.gauge("vramancer_tasks_running", "Tasks running now.")
        self._m_purged = metrics.counter(
            "vramancer_tasks_purged_total", "Ended tasks deleted after [tasks] retention_s."
        )
        self._m_depth = metrics.gauge(
            "vramancer_tasks_queue_depth", "Tasks waiting to run (queued, waiting_gpu, retry)."
        )
        self._m_wait = metrics.histogram(
            "vramancer_tasks_wait_seconds",
            "Time from ready to running, per device.",
            ["device"],
            TIME_BUCKETS,
        )
        self._m_run = metrics.histogram(
            "vramancer_tasks_run_seconds",
            "Run time of an attempt, per device.",
            ["device"],
            TIME_BUCKETS,
        )

    # ----------------------------------------------------------------------------- lifecycle

    async def start(self, *, dispatch: bool = True) -> None:
        """Open the queue, take back the leases of a previous daemon, start the loops.

        ``dispatch=False`` starts nothing in the background: tests drive ``run_once()``.
        """
        if self._started:
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            await self.queue.open()
            self._counts = dict(await self.queue.counts())
            if self._estimator_given is None:
                learned = await self.queue.learned_durations()
                self.estimator = HistoryEstimator(
                    self.settings.default_estimate_s, self.settings.estimate_alpha, learned
                )
            changes, orphans = await self.queue.expire_leases(
                self.clock.time(),
                all_leases=True,
                max_lease_losses=self.settings.max_lease_losses,
            )
        except BaseException:
            self._unlock()
            raise
        for orphan in orphans:
            if kill_orphan(orphan.pid, orphan.pid_started):
                log.warning(
                    "killed leftover process group %d of task %s", orphan.pid, orphan.task_id
                )
        if changes:
            log.warning("requeued %d task(s) a previous daemon was running", len(changes))
        self._wake = asyncio.Event()
        self._publish(changes)
        self._started = True
        self._stopping = False
        if dispatch:
            self._loops = [
                asyncio.create_task(self._dispatch_loop(), name="tasks-dispatch"),
                asyncio.create_task(self._heartbeat_loop(), name="tasks-heartbeat"),
            ]

    async def stop(self) -> None:
        """Stop dispatching; running tasks are stopped and queued again (not counted as tries)."""
        if not self._started:
            return
        self._stopping = True
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        self._loops = []
        for active in list(self._active.values()):
            active.release_reason = "daemon stopping"
            active.stop()
        await self.drain(timeout_s=self.settings.kill_grace_s + 5)
        await self.queue.close()
        self._unlock()
        self._started = False

    def _lock(self) -> None:
        path = self.data_dir / "tasks.lock"
        handle = open(path, "ab")  # noqa: SIM115 - held until stop()
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

    async def submit(self, spec: TaskSpec | Mapping[str, Any]) -> Submitted:
        """Queue one task (durable when this returns); see ``submit_batch``."""
        return (await self.submit_batch([spec]))[0]

    async def submit_batch(self, specs: Sequence[TaskSpec | Mapping[str, Any]]) -> list[Submitted]:
        """Queue tasks in one transaction. Any bad task refuses the whole batch (nothing queued).

        Raises ``InvalidInput`` (bad body, unknown GPU, VRAM no GPU can grant),
        ``PayloadTooLarge``, ``Forbidden`` (a command ``[tasks] allowed_commands`` does not
        list). The caller checks roles (``TaskType.needs_operator``).
        """
        self._require_started()
        if not specs:
            raise InvalidInput("no tasks given")
        if len(specs) > self.settings.max_batch:
            raise InvalidInput(
                f"{len(specs)} tasks in one batch; at most {self.settings.max_batch} "
                "([tasks] max_batch)"
            )
        snapshot = self.devices.snapshot()
        prefix = len(specs) > 1
        new = [
            self._prepare(
                _as_spec(spec, f"tasks[{i}]: " if prefix else ""),
                snapshot,
                f"tasks[{i}]: " if prefix else "",
            )
            for i, spec in enumerate(specs)
        ]
        results, changes = await self.queue.submit(new, self.clock.time())
        self._publish(changes)
        self._poke()
        return results

    def _prepare(self, spec: TaskSpec, snapshot: SystemSnapshot, where: str) -> NewTask:
        s = self.settings
        task_id = spec.task_id
        if task_id is None:
            task_id = uuid.uuid4().hex[:20]
            spec = spec.model_copy(update={"task_id": task_id})
        spec_json = spec.model_dump_json(exclude_none=True)
        if len(spec_json) > s.max_payload_bytes:
            raise PayloadTooLarge(
                f"{where}the task body is {len(spec_json)} bytes; at most {s.max_payload_bytes} "
                "([tasks] max_payload_bytes)"
            )
        self._check_allowed(spec, where)
        self._check_devices(spec, snapshot, where)
        self._check_model(spec, where)
        return NewTask(
            task_id=task_id,
            spec=spec,
            spec_json=spec_json,
            priority_rank=spec.priority.rank,
            estimate_s=self.estimator.estimate(spec),
            estimate_key=spec.estimate_key(),
            max_retries=s.max_retries if spec.max_retries is None else spec.max_retries,
            timeout_s=s.default_timeout_s if spec.timeout is None else spec.timeout,
            maintenance=spec.type.maintenance,
        )

    def _check_allowed(self, spec: TaskSpec, where: str) -> None:
        allowed = self.settings.allowed_commands
        if not allowed or spec.type.maintenance:
            return
        program = spec.program()
        if program not in allowed:
            what = {"sh": "shell tasks (they run sh -c)", "python": "python tasks"}.get(
                program, f"command {program!r}"
            )
            raise Forbidden(
                f"{where}{what} not allowed here: [tasks] allowed_commands is {', '.join(allowed)}"
            )
        hijack = sorted(
            k for k in spec.env or {} if k in HIJACK_ENV or k.startswith(("LD_", "DYLD_"))
        )
        if hijack:
            raise Forbidden(
                f"{where}env: {', '.join(hijack)} would change what an allowed command runs "
                "(loader or interpreter hooks); refused while [tasks] allowed_commands is set",
                field="env",
            )

    def _check_model(self, spec: TaskSpec, where: str) -> None:
        """A named model must be one the model manager manages (else nothing is queued)."""
        if spec.model is None:
            return
        known = self.models.names() if self.models is not None else []
        if spec.model not in known:
            listed = ", ".join(known) or "none configured"
            raise InvalidInput(
                f"{where}model: no managed model {spec.model!r} (models: {listed})",
                field="model",
            )

    def _check_devices(self, spec: TaskSpec, snapshot: SystemSnapshot, where: str) -> None:
        gpus = snapshot.gpus
        present = ", ".join(str(g.index) for g in gpus) or "none"
        if spec.gpu is not None and snapshot.gpu(spec.gpu) is None:
            raise InvalidInput(
                f"{where}gpu {spec.gpu} does not exist (GPUs of this machine: {present})",
                field="gpu",
            )
        need = spec.vram_bytes
        if need <= 0:
            return
        candidates = [snapshot.gpu(spec.gpu)] if spec.gpu is not None else list(gpus)
        budget = self.arbiter.budget.devices
        largest = max(
            (
                min(g.memory_total_bytes, budget.get(gpu_name(g.index), g.memory_total_bytes))
                for g in candidates
                if g is not None
            ),
            default=0,
        )
        if need > largest:
            raise InvalidInput(
                f"{where}the task needs {format_size(need)} of VRAM; no GPU here can grant that "
                f"much (largest: {format_size(largest)})",
                field="vram",
            )

    # ----------------------------------------------------------------------------- queries

    async def status(self, task_id: str) -> TaskRecord:
        record = await self.queue.get(task_id)
        if record is None:
            raise NotFound(f"no task {task_id!r}")
        return record

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
        return await self.queue.history(state=state, since=since, cursor=cursor, limit=limit)

    async def cancel(self, task_id: str) -> TaskRecord:
        """Cancel a task: at once when it waits; a running one is killed (then ``cancelled``)."""
        record, changes = await self.queue.cancel(task_id, self.clock.time())
        if record is None:
            raise NotFound(f"no task {task_id!r}")
        if not changes and record.state.terminal:
            raise Conflict(f"task {task_id} already ended ({record.state})", state=record.state)
        self._publish(changes)
        active = self._active.get(task_id)
        if active is not None:
            active.cancel = True
            active.stop()
        return record

    async def logs(
        self,
        task_id: str,
        max_bytes: int | None = None,
        *,
        stdout_offset: int = 0,
        stderr_offset: int = 0,
        attempt: int | None = None,
    ) -> dict[str, Any]:
        """stdout and stderr of one attempt (default: the latest), from byte offsets (bounded).

        Each attempt has its own log files, so a retry does not hide why the previous attempt
        failed. ``stdout_next``/``stderr_next`` are the offsets to ask for next time (to follow
        a running task). An attempt that wrote no file (a maintenance task, no output) shows
        the tail kept in the database, which belongs to the last attempt that ended.
        """
        _check_log_query(max_bytes, stdout_offset, stderr_offset)
        record = await self.status(task_id)
        latest = max(record.attempts, 1)
        number = latest if attempt is None else attempt
        if not 1 <= number <= latest:
            raise InvalidInput(
                f"attempt must be between 1 and {latest} for task {task_id} (got {number})",
                field="attempt",
            )
        ended = number == record.attempts and record.state not in LEASED_STATES
        tails = (record.stdout_tail, record.stderr_tail) if ended else ("", "")
        # A log file holds at most max_output_bytes and the "dropped" note.
        cap = self.settings.max_output_bytes + 256
        limit = cap if max_bytes is None else min(max_bytes, cap)
        out_path, err_path = self._log_paths(task_id, number)
        (out, out_cut, out_next), (err, err_cut, err_next) = await asyncio.to_thread(
            lambda: (
                _read_log(out_path, stdout_offset, limit, tails[0]),
                _read_log(err_path, stderr_offset, limit, tails[1]),
            )
        )
        return {
            "task_id": task_id,
            "state": record.state.value,
            "attempts": record.attempts,
            "attempt": number,
            "stdout": out,
            "stderr": err,
            "truncated": out_cut or err_cut,
            "stdout_next": out_next,
            "stderr_next": err_next,
        }

    def counts(self) -> dict[str, int]:
        """Tasks per state (both lanes)."""
        out = {state.value: 0 for state in TaskState}
        for (_, state), n in self._counts.items():
            out[state.value] += n
        return out

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

    # ----------------------------------------------------------------------------- dispatch

    async def run_once(self) -> int:
        """One dispatcher round: back-offs and leases, user tasks, maintenance. Returns started."""
        self._require_started()
        now = self.clock.time()
        await self._housekeep(now)
        started = await self._dispatch_user(now)
        started += await self._dispatch_maintenance(now)
        return started

    async def drain(self, timeout_s: float | None = None) -> None:
        """Wait until every task this daemon started has ended."""
        tasks = [a.task for a in self._active.values() if a.task is not None]
        if self._maintenance is not None:
            tasks.append(self._maintenance)
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    async def run_until_idle(self, max_rounds: int = 10_000) -> None:
        """Burst mode: rounds until nothing more can start and nothing runs (tests, benches)."""
        for _ in range(max_rounds):
            started = await self.run_once()
            running = bool(self._active) or self._maintenance is not None
            await self.drain()
            if not started and not running:
                return

    async def _dispatch_loop(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            started = 0
            try:
                now = self.clock.time()
                since = self.clock.monotonic() - self._last_housekeep
                if since >= self.settings.dispatch_interval_s:
                    await self._housekeep(now)
                started = await self._dispatch_user(now)
                started += await self._dispatch_maintenance(now)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("task dispatch round failed")
            if started:
                continue
            self._wake.clear()
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
        promoted, (expired, orphans) = await asyncio.gather(
            self.queue.promote_due(now),
            self.queue.expire_leases(now, max_lease_losses=self.settings.max_lease_losses),
        )
        for change in expired:
            active = self._active.get(change.task_id)
            if active is not None:
                active.lost = True
                active.stop()
        for orphan in orphans:
            if orphan.task_id not in self._active:
                kill_orphan(orphan.pid, orphan.pid_started)
        self._publish([*promoted, *expired])
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
        for task in purged:
            key = (task.maintenance, task.state)
            self._counts[key] = self._counts.get(key, 0) - 1
        self._m_purged.inc(len(purged))
        await asyncio.to_thread(self._remove_logs, purged)
        log.info(
            "retention: deleted %d task(s) that ended before the last %gs", len(purged), retention
        )
        return len(purged)

    def _remove_logs(self, purged: Sequence[Purged]) -> None:
        for task in purged:
            for attempt in range(1, task.attempts + 1):
                for path in self._log_paths(task.task_id, attempt):
                    path.unlink(missing_ok=True)

    def _views(self, snapshot: SystemSnapshot) -> list[DeviceView]:
        local: dict[str, LocalLoad] = {}
        for active in self._active.values():
            load = local.get(active.device, LocalLoad())
            unseen = max(0, active.vram_bytes - _visible_bytes(snapshot, active))
            local[active.device] = LocalLoad(
                load.running + 1,
                load.unseen_bytes + unseen,
                load.reserved_bytes + active.vram_bytes,
            )
        return build_views(
            snapshot,
            self.clock.monotonic(),
            grantable=self._grantable(snapshot),
            local=local,
            slots_per_device=self.settings.slots_per_device,
            host_slots=self.settings.host_slots,
        )

    def _grantable(self, snapshot: SystemSnapshot) -> dict[str, int]:
        """What the arbiter can still grant per GPU: its per-GPU budget minus its grants,
        bounded by what is left of its total budget."""
        budget = self.arbiter.budget
        room_in_all = budget.total_bytes - self.arbiter.reserved_bytes(None)
        out = {}
        for gpu in snapshot.gpus:
            name = gpu_name(gpu.index)
            own = budget.devices.get(name, 0) - self.arbiter.reserved_bytes(name)
            out[name] = max(0, min(own, room_in_all))
        return out

    async def _dispatch_user(self, now: float) -> int:
        if not self._lane_count(False, READY_STATES):
            return 0
        plan = RoundPlan(self._views(self.devices.snapshot()), self.policy)
        if plan.free_slots == 0:
            return 0
        scan = self.settings.dispatch_scan
        page = min(scan, 8 + 2 * plan.free_slots)
        # Read only about what the free slots can take; read on when tasks did not fit.
        starvation = self.settings.starvation_s
        candidates, overdue = await self.queue.dispatch_view(
            limit=page,
            overdue_before=now - starvation if starvation > 0 else None,
            overdue_limit=OVERDUE_MAX,
        )
        for record in overdue:
            if plan.free_slots == 0:
                break
            plan.offer(record, overdue_after_s=self.settings.starvation_s)
        seen = 0
        while True:
            seen += len(candidates)
            for record in candidates:
                if plan.free_slots == 0 and not plan.holding:
                    break
                if record.task_id not in plan.offered:
                    plan.offer(record)
            if plan.free_slots == 0 or len(candidates) < page or seen >= scan:
                break
            page = min(scan - seen, 8 + 2 * plan.free_slots)
            candidates = await self.queue.ready(maintenance=False, limit=page, offset=seen)
        (leased, lease_changes), wait_changes = await asyncio.gather(
            self.queue.lease(
                plan.grants, worker=self.worker_id, now=now, lease_s=self.settings.lease_s
            ),
            self.queue.set_waiting(plan.waiting, now),
        )
        self._publish([*lease_changes, *wait_changes])
        started = 0
        for record in leased:
            if await self._launch(record, plan.cuda.get(record.task_id)):
                started += 1
        return started

    async def _launch(self, record: TaskRecord, cuda_index: int | None) -> bool:
        device = record.device or HOST
        active = _Active(record, device, cuda_index, record.vram_bytes)
        if record.vram_bytes > 0 and device != HOST:
            try:
                allocation = self.arbiter.request_allocation(
                    WorkloadType.OTHER,
                    record.priority,
                    record.vram_bytes,
                    device=device,
                    owner=f"task:{record.task_id}",
                    on_preempt=self._on_preempt(record.task_id),
                )
            except (Conflict, VramancerShuttingDown) as exc:
                # No room after all (or the arbiter is stopping): back to the queue, untried.
                outcome = record.outcome(
                    OutcomeKind.RELEASED,
                    error=f"waiting for a device: the arbiter refused: {exc.message}",
                )
                await self._finish(outcome, wake=False)
                return False
            except Exception as exc:  # a refusal that waiting will not cure: a failed try
                log.exception("task %s: reserving its VRAM failed", record.task_id)
                outcome = record.outcome(
                    OutcomeKind.ERROR,
                    error=f"cannot reserve {record.vram_bytes} bytes on {device}: {exc}",
                )
                await self._finish(outcome)
                return False
            active.allocation_id = allocation.id
        self._active[record.task_id] = active
        active.task = asyncio.create_task(self._execute(active), name=f"task-{record.task_id}")
        return True

    def _on_preempt(self, task_id: str) -> Any:
        loop = asyncio.get_running_loop()

        def preempted(_: Any) -> None:
            def stop() -> None:
                active = self._active.get(task_id)
                if active is not None:
                    active.allocation_id = None  # the arbiter took it back already
                    active.release_reason = "preempted by a higher-priority allocation"
                    active.stop()

            loop.call_soon_threadsafe(stop)

        return preempted

    async def _execute(self, active: _Active) -> None:
        record = active.record
        try:
            outcome = await self._run_with_model(active)
        except Exception as exc:
            log.exception("task %s: internal error", record.task_id)
            outcome = record.outcome(
                OutcomeKind.ERROR,
                error=f"internal error: {exc}",
            )
        finally:
            self._release(active)
            self._poke()  # a slot is free: the next task can start while this one is recorded
        if not active.lost:
            await self._finish(outcome)

    async def _run_with_model(self, active: _Active) -> Outcome:
        """Run the process, inside ``models.use(model)`` when the task names a model: loaded
        first (on demand), held against the reaper and eviction until the process ends. A model
        that cannot be loaded (backend down, no VRAM ...) fails the attempt with the reason."""
        record = active.record
        name = record.spec.get("model")
        if name is None:
            return await self._run_process(active)
        async with contextlib.AsyncExitStack() as stack:
            try:
                if self.models is None:
                    raise BackendUnavailable("this daemon has no model manager")
                handle = await stack.enter_async_context(self.models.use(name))
            except Exception as exc:
                reason = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                return record.outcome(
                    OutcomeKind.ERROR, error=f"model {name!r} could not be loaded: {reason}"
                )
            active.model_env = _model_env(name, handle)
            outcome = await self._run_process(active)
        return outcome

    async def _run_process(self, active: _Active) -> Outcome:
        record = active.record
        spec = record.task_spec()
        request = self._run_request(record, spec, active)
        run = ProcessRun(request)
        try:
            await run.start()
        except OSError as exc:
            return record.outcome(
                OutcomeKind.ERROR,
                error=f"cannot start {request.argv[0]}: {exc}",
            )
        active.run = run
        active.pgid = run.pid
        if active.cancel or active.release_reason or active.lost:
            run.cancel()
        # The running mark commits while the process runs; it is published as soon as it is
        # committed, and always before the task's end (the writer keeps their order).
        mark = asyncio.ensure_future(
            self.queue.mark_running(
                record.task_id,
                record.lease_token,
                pid=run.pid,
                pid_started=run.started_at,
                now=self.clock.time(),
            )
        )
        mark.add_done_callback(self._publish_marked)
        try:
            result = await run.wait()
        finally:
            await asyncio.wait([mark])
        return self._outcome(active, result)

    def _publish_marked(self, mark: asyncio.Future[list[Change]]) -> None:
        if mark.cancelled():
            return
        if mark.exception() is not None:
            log.error("recording a task as running failed: %s", mark.exception())
            return
        self._publish(mark.result())

    def _outcome(self, active: _Active, result: RunResult) -> Outcome:
        record = active.record
        if result.ok:
            kind = OutcomeKind.OK
            error = None
        elif result.cancelled and active.release_reason and not active.cancel:
            kind, error = OutcomeKind.RELEASED, active.release_reason
        elif result.cancelled:
            kind, error = OutcomeKind.CANCELLED, "cancelled"
        else:
            kind = OutcomeKind.ERROR
            error = result.error or f"exit code {result.exit_code}"
        return record.outcome(
            kind,
            exit_code=result.exit_code,
            error=error,
            stdout_tail=result.stdout_tail,
            stderr_tail=result.stderr_tail,
            run_s=result.run_s,
        )

    def _run_request(self, record: TaskRecord, spec: TaskSpec, active: _Active) -> RunRequest:
        s = self.settings
        scratch = self.data_dir / "scratch" / active.device.replace(":", "") / record.task_id
        scratch.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(_PRIVATE_ENV_PREFIX)}
        env.update(spec.env or {})
        env.update(
            {
                ENV_TASK_ID: record.task_id,
                "VRM_TASK_ATTEMPT": str(record.attempts),
                "VRM_DEVICE": active.device,
                "VRM_SCRATCH_DIR": str(scratch),
                "CUDA_VISIBLE_DEVICES": "" if active.cuda_index is None else str(active.cuda_index),
            }
        )
        env.update(active.model_env)
        if active.cuda_index is not None:
            # cuda_index is NVML's (PCI bus) order; CUDA's default order is fastest first.
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        out_path, err_path = self._log_paths(record.task_id, record.attempts)
        return RunRequest(
            argv=self._argv(spec),
            cwd=Path(spec.cwd) if spec.cwd else scratch,
            env=env,
            timeout_s=record.timeout_s,
            kill_grace_s=s.kill_grace_s,
            max_output_bytes=s.max_output_bytes,
            tail_bytes=s.output_tail_bytes,
            stdout_path=out_path,
            stderr_path=err_path,
        )

    def _argv(self, spec: TaskSpec) -> list[str]:
        if spec.type is TaskType.CMD and spec.cmd:
            argv = list(spec.cmd)
            if self.settings.allowed_commands and os.sep not in argv[0]:
                # Resolve with the daemon's PATH: the task's env cannot swap the program.
                argv[0] = shutil.which(argv[0]) or argv[0]
            return argv
        if spec.type is TaskType.SHELL and spec.shell:
            return ["/bin/sh", "-c", spec.shell]
        if spec.type is TaskType.PYTHON and spec.python:
            return [
                sys.executable,
                "-m",
                "vramancer.tasks.pyrun",
                spec.python,
                _dumps(spec.payload or {}),
            ]
        raise InvalidInput(f"{spec.type} tasks do not run a process")

    def _release(self, active: _Active) -> None:
        self._active.pop(active.record.task_id, None)
        if active.allocation_id is not None:
            try:
                self.arbiter.release_allocation(active.allocation_id)
            except Exception:
                log.exception("releasing the VRAM of task %s failed", active.record.task_id)
            active.allocation_id = None
        if not self.settings.keep_scratch:  # ours even when the task ran in its own cwd
            scratch = self.data_dir / "scratch" / active.device.replace(":", "")
            shutil.rmtree(scratch / active.record.task_id, ignore_errors=True)

    async def _finish(self, outcome: Outcome, *, wake: bool = True) -> None:
        try:
            changes = await self.queue.finish(
                [outcome], now=self.clock.time(), retry_delay=self.retry_delay
            )
        except Exception:
            log.exception("recording the end of task %s failed", outcome.task_id)
            return
        self._publish(changes)
        if wake:
            self._poke()

    def retry_delay(self, attempts: int) -> float:
        """Back-off before the next try after ``attempts`` attempts: base × 2^(attempts-1)."""
        s = self.settings
        return min(s.backoff_max_s, s.backoff_base_s * 2.0 ** max(0, attempts - 1))

    # ----------------------------------------------------------------------------- maintenance

    def _maintenance_allowed(self, snapshot: SystemSnapshot) -> bool:
        """Idle for ``maintenance_idle_s``: no user task waiting or running, no GPU busier than
        ``idle_busy_ratio``, the host CPU not busier than ``maintenance_max_cpu_ratio``."""
        mono = self.clock.monotonic()
        user_busy = self._lane_count(False, (*READY_STATES, *LEASED_STATES)) > 0
        gpus_busy = any(
            g.utilization_ratio is not None and g.utilization_ratio > self.policy.idle_busy_ratio
            for g in snapshot.gpus
        )
        cpu_limit = self.settings.maintenance_max_cpu_ratio
        cpu_busy = cpu_limit < 1.0 and snapshot.host.cpu_utilization_ratio > cpu_limit
        if user_busy or gpus_busy or cpu_busy:
            self._idle_since = None
            return False
        if self._idle_since is None:
            self._idle_since = mono
        return mono - self._idle_since >= self.settings.maintenance_idle_s

    async def _dispatch_maintenance(self, now: float) -> int:
        if self._maintenance is not None or not self._lane_count(True, READY_STATES):
            return 0
        if not self._maintenance_allowed(self.devices.snapshot()):
            return 0
        candidates = await self.queue.ready(maintenance=True, limit=self.settings.maintenance_batch)
        grants = [Grant(r.task_id, HOST, running=True, previous=r.state) for r in candidates]
        leased, changes = await self.queue.lease(
            grants, worker=self.worker_id, now=now, lease_s=self.settings.lease_s
        )
        self._publish(changes)
        if leased:
            self._maintenance = asyncio.create_task(self._run_maintenance(leased))
        return len(leased)

    async def _run_maintenance(self, records: list[TaskRecord]) -> None:
        outcomes: list[Outcome] = []
        try:
            for record in records:
                if self._stopping or self._lane_count(False, READY_STATES):
                    # A user task arrived: hand the rest back, untouched.
                    outcomes.append(
                        record.outcome(
                            OutcomeKind.RELEASED,
                            error="yielded to user tasks",
                        )
                    )
                    continue
                outcomes.append(await self._maintain(record))
            changes = await self.queue.finish(
                outcomes, now=self.clock.time(), retry_delay=self.retry_delay
            )
            self._publish(changes)
        except Exception:
            log.exception("maintenance batch failed")
        finally:
            self._maintenance = None
            self._poke()

    async def _maintain(self, record: TaskRecord) -> Outcome:
        t0 = self.clock.monotonic()
        message = ""
        try:
            if record.type is not TaskType.NOOP:
                payload = record.spec.get("payload") or {}
                blocks = int(payload.get("max_blocks", self.settings.maintenance_max_blocks))
                if record.type is TaskType.WARMUP:
                    done = await _call(self.memory.warmup, blocks)
                    message = f"warmed {done} block(s)"
                else:
                    done = await _call(self.memory.compress_cold, blocks)
                    message = f"compressed {done} block(s)"
        except Exception as exc:
            return record.outcome(
                OutcomeKind.ERROR,
                error=f"{record.type} failed: {type(exc).__name__}: {exc}",
                run_s=self.clock.monotonic() - t0,
            )
        return record.outcome(
            OutcomeKind.OK,
            exit_code=0,
            stdout_tail=message,
            run_s=self.clock.monotonic() - t0,
        )

    # ----------------------------------------------------------------------------- bookkeeping

    def _lane_count(self, maintenance: bool, states: Iterable[TaskState]) -> int:
        return sum(self._counts.get((maintenance, state), 0) for state in states)

    def _publish(self, changes: Sequence[Change]) -> None:
        """Count, measure, announce: one ``task_state`` event per committed change."""
        if not changes:
            return
        counts = self._counts
        for change in changes:
            kind = change.type or TaskType.CMD
            lane = kind.maintenance
            if change.previous is not None:
                counts[(lane, change.previous)] = counts.get((lane, change.previous), 0) - 1
            else:
                self._child(self._m_submitted, "type", kind.value).inc()
            counts[(lane, change.state)] = counts.get((lane, change.state), 0) + 1
            device = change.device or HOST
            if change.wait_s is not None:
                self._child(self._m_wait, "device", device).observe(change.wait_s)
            if change.run_s is not None:
                self._child(self._m_run, "device", device).observe(change.run_s)
            if change.state is TaskState.DONE:
                self._child(self._m_completed, "type", kind.value).inc()
                if change.estimate_key and change.run_s is not None:
                    observe = getattr(self.estimator, "observe", None)
                    if observe is not None:
                        observe(change.estimate_key, change.run_s)
            elif change.state is TaskState.FAILED:
                self._child(self._m_failed, "type", kind.value).inc()
            self.events.publish(
                "task_state",
                task_id=change.task_id,
                state=change.state.value,
                previous=change.previous.value if change.previous else None,
                attempts=change.attempts,
                device=change.device,
                exit_code=change.exit_code,
                error=change.error,
                type=kind.value,
            )
            if change.state in _TERMINAL:
                self._notify_end(change.task_id)
        self._m_running.set(
            self._lane_count(False, (TaskState.RUNNING,))
            + self._lane_count(True, (TaskState.RUNNING,))
        )
        depth_states = (*READY_STATES, TaskState.RETRY)
        self._m_depth.set(
            self._lane_count(False, depth_states) + self._lane_count(True, depth_states)
        )

    def _child(self, metric: Any, label: str, value: str) -> Any:
        """The labelled child of ``metric``, cached (``labels()`` is slow on the hot path)."""
        key = (id(metric), value)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(**{label: value})
        return child

    def _notify_end(self, task_id: str) -> None:
        for pending, event in self._waiters:
            if task_id in pending:
                pending.discard(task_id)
                if not pending:
                    event.set()

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _log_paths(self, task_id: str, attempt: int) -> tuple[Path, Path]:
        """``<data_dir>/task-logs/<id[:2]>/<id>.<attempt>.stdout`` (and ``.stderr``)."""
        folder = self.data_dir / "task-logs" / task_id[:2]
        return folder / f"{task_id}.{attempt}.stdout", folder / f"{task_id}.{attempt}.stderr"

    def _require_started(self) -> None:
        if not self._started:
            raise BackendUnavailable("the task service is not started")


def _as_spec(spec: TaskSpec | Mapping[str, Any], where: str) -> TaskSpec:
    if isinstance(spec, TaskSpec):
        return spec
    try:
        return TaskSpec.model_validate(spec)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: "
            f"{str(e['msg']).removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise InvalidInput(f"{where}{problems}") from None


def _check_log_query(max_bytes: int | None, stdout_offset: int, stderr_offset: int) -> None:
    for name, offset in (("stdout_offset", stdout_offset), ("stderr_offset", stderr_offset)):
        if not 0 <= offset <= MAX_LOG_OFFSET:
            raise InvalidInput(
                f"{name} must be between 0 and {MAX_LOG_OFFSET} (got {offset})", field=name
            )
    if max_bytes is not None and max_bytes < 1:
        raise InvalidInput(f"max_bytes must be at least 1 (got {max_bytes})", field="max_bytes")


def _read_log(path: Path, offset: int, limit: int, tail: str) -> tuple[str, bool, int]:
    """Up to ``limit`` bytes of ``path`` from ``offset``: (text, cut short, next offset).
    No file: ``tail`` (the database's copy) from ``offset``."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(limit + 1)
    except FileNotFoundError:
        data = tail.encode()[offset : offset + limit + 1]
    kept = data[:limit]
    return kept.decode("utf-8", errors="replace"), len(data) > limit, offset + len(kept)


def _model_env(name: str, handle: Any) -> dict[str, str]:
    """What a task learns of the model held for it: ``VRM_MODEL`` (its name),
    ``VRM_MODEL_DEVICE`` (``cpu``, ``cuda:N``) and, for an Ollama model, ``VRM_MODEL_ENDPOINT``
    and ``VRM_MODEL_BACKEND`` (the tag to ask Ollama for)."""
    env = {"VRM_MODEL": name}
    for var, attr in (
        ("VRM_MODEL_DEVICE", "device"),
        ("VRM_MODEL_ENDPOINT", "endpoint"),
        ("VRM_MODEL_BACKEND", "backend_model"),
    ):
        value = getattr(handle, attr, None)
        if value is not None:
            env[var] = str(value)
    return env


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _visible_bytes(snapshot: SystemSnapshot, active: _Active) -> int:
    """VRAM the driver shows for the task's process group on its GPU (0 when not visible)."""
    if active.pgid is None or active.device == HOST:
        return 0
    index = int(active.device.partition(":")[2])
    gpu = snapshot.gpu(index)
    if gpu is None:
        return 0
    total = 0
    for proc in gpu.processes:
        try:
            if os.getpgid(proc.pid) == active.pgid:
                total += proc.used_memory_bytes or 0
        except OSError:
            continue
    return total


async def _call(fn: Any, *args: Any) -> Any:
    result = await asyncio.to_thread(fn, *args)
    if inspect.isawaitable(result):
        result = await result
    return result
