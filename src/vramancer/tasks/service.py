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
from vramancer.tasks.errors import PayloadTooLarge
from vramancer.tasks.estimator import HistoryEstimator, RuntimeEstimator
from vramancer.tasks.files import (
    FILE_MODE,
    open_private,
    private_dir,
    tighten,
    tighten_tree,
    touch_private,
)
from vramancer.tasks.model import (
    LEASED_STATES,
    LOCAL_OWNER,
    READY_STATES,
    SYSTEM_OWNER,
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


#: The daemon's own maintenance (``[tasks] auto_maintenance``): one task of each kind at most.
AUTO_MAINTENANCE = (TaskType.WARMUP, TaskType.COMPRESS, TaskType.REBALANCE)
#: Names ``python`` and ``sh`` in ``allowed_commands`` stand for the task kinds, not a program.
_KIND_NAMES = frozenset({"python", "sh"})


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
        #: Why the last look found no idle window for maintenance ("" when it was idle).
        self._not_idle = ""
        #: Absolute paths of ``allowed_commands``, resolved at start from the daemon's PATH.
        self._programs: dict[str, str] = {}
        self._next_auto = -math.inf
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
        self._programs = resolve_programs(self.settings.allowed_commands)
        await asyncio.to_thread(self._private_files)
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
            if kill_orphan(orphan.pid, orphan.pid_started, orphan.task_id):
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
        checks roles (``TaskType.needs_operator``).
        """
        self._require_started()
        if not specs:
            raise InvalidInput("no tasks given", field="tasks")
        if len(specs) > self.settings.max_batch:
            raise InvalidInput(
                f"tasks: {len(specs)} tasks in one batch; at most {self.settings.max_batch} "
                "([tasks] max_batch)",
                field="tasks",
            )
        snapshot = self.devices.snapshot()
        prefix = len(specs) > 1
        new = []
        for i, raw in enumerate(specs):
            where = f"tasks[{i}]: " if prefix else ""
            spec = _as_spec(raw, where)
            if viewer:
                self._check_viewer(spec, where)
            new.append(self._prepare(spec, snapshot, where, owner))
        results, changes = await self.queue.submit(
            new,
            self.clock.time(),
            max_open_maintenance=self.settings.viewer_max_queued if viewer else None,
        )
        self._publish(changes)
        self._poke()
        return results

    def _check_viewer(self, spec: TaskSpec, where: str) -> None:
        limit = self.settings.viewer_max_payload_bytes
        if spec.payload is None:
            return
        size = len(_dumps(spec.payload))
        if size > limit:
            raise InvalidInput(
                f"{where}payload: {size} bytes as JSON; a viewer's task may carry at most "
                f"{limit} ([tasks] viewer_max_payload_bytes)",
                field="payload",
            )

    def _prepare(
        self, spec: TaskSpec, snapshot: SystemSnapshot, where: str, owner: str = LOCAL_OWNER
    ) -> NewTask:
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
            owner=owner,
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
        if spec.type is TaskType.CMD and program not in self._programs:
            raise InvalidInput(
                f"{where}cmd: {program!r} is allowed but the daemon found no such program on "
                "its own PATH at start-up (a task's env cannot choose where it comes from)",
                field="cmd",
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
        reader: str | None = None,
    ) -> dict[str, Any]:
        """stdout and stderr of one attempt (default: the latest), from byte offsets (bounded).

        ``reader``: the owner id (``owner_of``) of a caller who may read only its own tasks'
        logs (None: any task's, an admin); another owner's task is ``Forbidden`` (403): a
        task's output may hold what its command printed of its secrets.

        Each attempt has its own log files, so a retry does not hide why the previous attempt
        failed. ``stdout_next``/``stderr_next`` are the offsets to ask for next time (to follow
        a running task). An attempt that wrote no file (a maintenance task, no output) shows
        the tail kept in the database, which belongs to the last attempt that ended.
        """
        _check_log_query(max_bytes, stdout_offset, stderr_offset)
        record = await self.status(task_id)
        if reader is not None and record.owner != reader:
            raise Forbidden(
                f"the logs of task {task_id} are its owner's: only the caller that submitted "
                "it and admins may read them"
            )
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
        await self._queue_upkeep()
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
                await self._queue_upkeep()
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
                kill_orphan(orphan.pid, orphan.pid_started, orphan.task_id)
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
        private_dir(scratch)
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
            if self.settings.allowed_commands:
                # The absolute path resolved at start from the daemon's PATH: the task's own
                # env.PATH cannot change which program runs.
                resolved = self._programs.get(argv[0])
                if resolved is None:
                    raise InvalidInput(f"{argv[0]!r} is not an allowed program here")
                argv[0] = resolved
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

    def _busy_reason(self, snapshot: SystemSnapshot) -> str:
        """Why the machine is not idle for maintenance now ("" when it is): a user task
        waiting or running, a GPU busier than ``idle_busy_ratio``, the host CPU busier than
        ``maintenance_max_cpu_ratio``."""
        users = self._lane_count(False, (*READY_STATES, *LEASED_STATES))
        if users:
            return f"{users} user task(s) queued or running"
        idle_ratio = self.policy.idle_busy_ratio
        for g in snapshot.gpus:
            if g.utilization_ratio is not None and g.utilization_ratio > idle_ratio:
                return (
                    f"GPU {g.index} {g.utilization_ratio:.0%} busy > idle_busy_ratio "
                    f"{idle_ratio:.0%}"
                )
        cpu_limit = self.settings.maintenance_max_cpu_ratio
        cpu = snapshot.host.cpu_utilization_ratio
        if cpu_limit < 1.0 and cpu > cpu_limit:
            return f"CPU {cpu:.0%} > maintenance_max_cpu_ratio {cpu_limit:.0%}"
        return ""

    def _maintenance_allowed(self, snapshot: SystemSnapshot) -> bool:
        """Idle (``_busy_reason``) for ``maintenance_idle_s``; ``_not_idle`` says why not."""
        mono = self.clock.monotonic()
        reason = self._busy_reason(snapshot)
        if reason:
            self._idle_since = None
            self._not_idle = reason
            return False
        if self._idle_since is None:
            self._idle_since = mono
        idle_for = mono - self._idle_since
        needed = self.settings.maintenance_idle_s
        self._not_idle = (
            ""
            if idle_for >= needed
            else (f"idle for {idle_for:.1f} s of maintenance_idle_s {needed:g} s")
        )
        return not self._not_idle

    def maintenance_window(self) -> dict[str, Any]:
        """What maintenance waits for now: ``waiting`` (ready maintenance tasks), ``idle``
        (the machine is idle for maintenance), ``reason`` (why not, "" when idle) and
        ``max_wait_s`` (after which a waiting one runs anyway)."""
        reason = self._busy_reason(self.devices.snapshot())
        if not reason and self._idle_since is not None:
            reason = self._not_idle
        return {
            "waiting": self._lane_count(True, READY_STATES),
            "idle": not reason,
            "reason": reason,
            "max_wait_s": self.settings.maintenance_max_wait_s,
            "auto_maintenance": self.settings.auto_maintenance,
        }

    async def _dispatch_maintenance(self, now: float) -> int:
        """Lease ready maintenance tasks: all of a batch in an idle window; otherwise only
        those that waited ``maintenance_max_wait_s`` (they then no longer yield to users)."""
        if self._maintenance is not None or not self._lane_count(True, READY_STATES):
            return 0
        s = self.settings
        overdue = not self._maintenance_allowed(self.devices.snapshot())
        if not overdue:
            candidates = await self.queue.ready(maintenance=True, limit=s.maintenance_batch)
        elif s.maintenance_max_wait_s > 0:
            candidates = await self.queue.overdue_maintenance(
                ready_before=now - s.maintenance_max_wait_s, limit=s.maintenance_batch
            )
        else:
            return 0
        grants = [Grant(r.task_id, HOST, running=True, previous=r.state) for r in candidates]
        leased, changes = await self.queue.lease(
            grants, worker=self.worker_id, now=now, lease_s=s.lease_s
        )
        self._publish(changes)
        if leased:
            if overdue:
                log.info(
                    "running %d maintenance task(s) that waited over maintenance_max_wait_s (%s)",
                    len(leased),
                    self._not_idle,
                )
            self._maintenance = asyncio.create_task(
                self._run_maintenance(leased, yield_to_users=not overdue)
            )
        return len(leased)

    async def _queue_upkeep(self) -> int:
        """``auto_maintenance``: every ``auto_maintenance_interval_s``, when the machine is idle,
        queue the store's upkeep (``AUTO_MAINTENANCE``) as system-owned tasks, skipping a kind
        that still has one not ended. Returns how many were queued."""
        s = self.settings
        mono = self.clock.monotonic()
        if not s.auto_maintenance or mono < self._next_auto:
            return 0
        if math.isinf(self._next_auto):  # the first round comes one interval after start
            self._next_auto = mono + s.auto_maintenance_interval_s
            return 0
        if self._busy_reason(self.devices.snapshot()):
            return 0  # look again next round
        self._next_auto = mono + s.auto_maintenance_interval_s
        pending = await self.queue.open_tasks(SYSTEM_OWNER, limit=64)
        have = {record.type for record in pending}
        specs = [TaskSpec(type=kind) for kind in AUTO_MAINTENANCE if kind not in have]
        if not specs:
            return 0
        await self.submit_batch(specs, owner=SYSTEM_OWNER)
        return len(specs)

    async def _run_maintenance(
        self, records: list[TaskRecord], *, yield_to_users: bool = True
    ) -> None:
        outcomes: list[Outcome] = []
        try:
            for record in records:
                if self._stopping or (yield_to_users and self._lane_count(False, READY_STATES)):
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
        try:
            message = await self._maintenance_job(record)
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

    async def _maintenance_job(self, record: TaskRecord) -> str:
        """Run one maintenance task against the memory store; what it did, in words."""
        if record.type is TaskType.NOOP:
            return ""
        if record.type is TaskType.REBALANCE:
            maintain = getattr(self.memory, "maintain", None)
            if maintain is None:
                return "nothing to rebalance"
            await _call(maintain)
            return "rebalanced"
        payload = record.spec.get("payload") or {}
        blocks = int(payload.get("max_blocks", self.settings.maintenance_max_blocks))
        if record.type is TaskType.WARMUP:
            done = await _call(self.memory.warmup, blocks)
            return f"warmed {done} block(s)"
        done = await _call(self.memory.compress_cold, blocks)
        return f"compressed {done} block(s)"

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
                    self.estimator.observe(change.estimate_key, change.run_s)
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


def resolve_programs(allowed: Sequence[str]) -> dict[str, str]:
    """``allowed_commands`` entry -> the absolute path that runs for it: a name is looked up
    once in the daemon's own PATH, a path made absolute. Entries that resolve to nothing are
    left out (a task naming one is refused); ``sh`` and ``python`` also stand for shell and
    python tasks, which run ``/bin/sh`` and the daemon's Python."""
    path = os.environ.get("PATH", os.defpath)
    out: dict[str, str] = {}
    for name in allowed:
        found = shutil.which(name, path=path) if os.sep not in name else name
        if found is not None and os.access(found, os.X_OK) and os.path.isfile(found):
            out[name] = os.path.abspath(found)
        elif name not in _KIND_NAMES:
            log.warning("[tasks] allowed_commands: %r is not on the daemon's PATH", name)
    return out


def _as_spec(spec: TaskSpec | Mapping[str, Any] | Any, where: str) -> TaskSpec:
    if isinstance(spec, TaskSpec):
        return spec
    if not isinstance(spec, Mapping):
        raise InvalidInput(
            f"{where}a task body must be a JSON object (got {type(spec).__name__})",
            field=where.rstrip(": ") or "body",
        )
    try:
        return TaskSpec.model_validate(spec)
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: "
            f"{str(e['msg']).removeprefix('Value error, ')}"
            for e in errors
        )
        first = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        prefix = where.rstrip(": ")
        field = ".".join(part for part in (prefix, first) if part) or "body"
        raise InvalidInput(f"{where}{problems}", field=field) from None


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
