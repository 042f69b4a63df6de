"""Local workers: one asyncio task per user task this daemon runs, from lease to outcome.

A leased task gets its VRAM reserved in the arbiter (a refusal sends it back to the queue
untried; a failure that waiting will not cure fails the attempt), then, when it names a model,
``models.use(model)`` loads the model on demand and holds it against the idle reaper and
eviction until the process ends (a model that cannot be loaded fails the attempt). The process
(``launch.run_request``, ``runner.ProcessRun``) runs in its own session; its ``running`` mark
commits while it runs. A process that cannot be started for a reason no retry can cure (a
missing or non-executable program, a working directory that does not exist) reports a
``fatal`` outcome: the task fails at once instead of using its retries. When it ends, its VRAM
is given back, its scratch directory removed (unless ``keep_scratch``) and its outcome reported
under its lease token, which the queue turns into the next state (``transitions.next_state``).
A stop that is not the task's fault (shutdown, preemption) reports it released: queued again,
not counted as a try.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vramancer.arbiter.types import AllocationRequest, PreemptCallback, WorkloadType
from vramancer.clock import Clock
from vramancer.devices.ids import DeviceId
from vramancer.devices.types import SystemSnapshot
from vramancer.errors import BackendUnavailable, Conflict, VramancerError
from vramancer.errors import ShuttingDown as VramancerShuttingDown
from vramancer.files import private_dir
from vramancer.tasks.blocks import BlockMissing, BlockReader, materialize
from vramancer.tasks.launch import model_env, run_request, scratch_dir
from vramancer.tasks.model import READY_STATES, Change, Outcome, OutcomeKind, TaskRecord
from vramancer.tasks.picker import HOST, LocalLoad
from vramancer.tasks.ports import ArbiterPort, ModelsPort, ReleasesPort
from vramancer.tasks.queue import TaskQueue
from vramancer.tasks.runner import ProcessRun, RunResult, in_spawner, to_spawner
from vramancer.tasks.settings import TasksSettings
from vramancer.tasks.telemetry import Telemetry
from vramancer.tasks.warm import WarmRunner
from vramancer.units import format_size

log = logging.getLogger(__name__)

#: Seconds before asking an unreachable queue again to record an outcome (doubling, up to the
#: second figure).
FINISH_RETRY_S = 0.25
FINISH_RETRY_MAX_S = 2.0
#: Seconds a task's process runs before its ``running`` mark is written. A task that ends
#: sooner has its mark written with its end (one group commit instead of two); the mark keeps
#: the time the process started either way.
MARK_DELAY_S = 0.05


@dataclass
class Active:
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
    #: When the process started (the ``running`` mark's time), None: it did not start.
    started_at: float | None = None
    #: Writes the ``running`` mark ``MARK_DELAY_S`` after the start, unless the task ended.
    mark_timer: asyncio.TimerHandle | None = None
    #: Writing (then publishing) the ``running`` mark.
    marking: asyncio.Task[None] | None = None

    def stop(self) -> None:
        if self.run is not None:
            self.run.cancel()


class Workers:
    """The user tasks this daemon runs; see the module docstring."""

    def __init__(
        self,
        settings: TasksSettings,
        *,
        data_dir: Path,
        arbiter: ArbiterPort,
        models: ModelsPort | None,
        queue: TaskQueue,
        clock: Clock,
        telemetry: Telemetry,
        backoff: Callable[[int], float],
        poke: Callable[[], None],
        blocks: BlockReader | None = None,
        releases: ReleasesPort | None = None,
    ) -> None:
        self.settings = settings
        #: Where a task's ``release`` is resolved (None: tasks cannot name one).
        self.releases = releases
        #: Where the blocks a task names come from (the memory store), None: no store here.
        self.blocks = blocks
        self.data_dir = data_dir
        self.arbiter = arbiter
        self.models = models
        self.queue = queue
        self.clock = clock
        self.telemetry = telemetry
        self.backoff = backoff
        self.poke = poke
        #: Absolute paths of ``allowed_commands`` (``admission.resolve_programs``, at start).
        self.programs: Mapping[str, str] = {}
        #: Forks ``python`` tasks when ``[tasks] warm_python`` is on (``tasks/warm.py``).
        self.warm = (
            WarmRunner(data_dir / "run", settings.warm_preload) if settings.warm_python else None
        )
        self.active: dict[str, Active] = {}
        #: Tasks that ended and whose outcome is being recorded.
        self.recording: set[str] = set()
        #: Called when a running task's slot is free again (a pool's worker pulls more work).
        self.on_slot_free: list[Callable[[], None]] = []
        #: Keep asking a queue that cannot be reached to record an outcome (a pool's).
        self.retry_unavailable = False
        #: The daemon is stopping: outcomes are not retried any more.
        self.closing = False

    def loads(self, snapshot: SystemSnapshot) -> dict[str, LocalLoad]:
        """Per device: our running tasks, the VRAM they reserved and the part of it the driver
        does not show yet (the picker counts it as used)."""
        local: dict[str, LocalLoad] = {}
        for active in self.active.values():
            load = local.get(active.device, LocalLoad())
            unseen = max(0, active.vram_bytes - visible_bytes(snapshot, active))
            local[active.device] = LocalLoad(
                load.running + 1,
                load.unseen_bytes + unseen,
                load.reserved_bytes + active.vram_bytes,
                (*load.task_ids, active.record.task_id),
            )
        return local

    def running(self) -> list[asyncio.Task[None]]:
        return [a.task for a in self.active.values() if a.task is not None]

    def cancel(self, task_id: str) -> None:
        """A user cancelled the task: stop its process (it then ends ``cancelled``)."""
        active = self.active.get(task_id)
        if active is not None:
            active.cancel = True
            active.stop()

    def lost(self, task_id: str) -> None:
        """Its lease was taken back: stop it; whatever it reports is stale."""
        active = self.active.get(task_id)
        if active is not None:
            active.lost = True
            active.stop()

    def release_all(self, reason: str) -> None:
        """Stop every task for ``reason`` (not their fault): each goes back to the queue."""
        self.closing = True
        for active in list(self.active.values()):
            active.release_reason = reason
            active.stop()

    async def launch(self, record: TaskRecord, cuda_index: int | None) -> bool:
        """Reserve the leased task's VRAM and start its worker; False when it went back."""
        device = record.device or HOST
        active = Active(record, device, cuda_index, record.vram_bytes)
        if record.vram_bytes > 0 and device != HOST:
            try:
                request = AllocationRequest(
                    WorkloadType.OTHER,
                    record.priority,
                    record.vram_bytes,
                    device=DeviceId.parse_input(device),
                    owner=f"task:{record.task_id}",
                    on_preempt=self._on_preempt(record.task_id),
                )
                allocation = self.arbiter.allocate(request)
            except (Conflict, VramancerShuttingDown) as exc:
                # No room after all (or the arbiter is stopping): back to the queue, untried.
                outcome = record.outcome(
                    OutcomeKind.RELEASED,
                    error=f"waiting for a device: the arbiter refused: {exc.message}",
                )
                await self.finish(outcome, wake=False)
                return False
            except Exception as exc:  # a refusal that waiting will not cure: a failed try
                log.exception("task %s: reserving its VRAM failed", record.task_id)
                outcome = record.outcome(
                    OutcomeKind.ERROR,
                    error=f"cannot reserve {format_size(record.vram_bytes)} on {device}: {exc}",
                )
                await self.finish(outcome)
                return False
            active.allocation_id = allocation.id
        self.active[record.task_id] = active
        active.task = asyncio.create_task(self._execute(active), name=f"task-{record.task_id}")
        return True

    async def finish(
        self,
        outcome: Outcome,
        *,
        wake: bool = True,
        marking: asyncio.Task[None] | None = None,
        after: asyncio.Future[None] | None = None,
    ) -> None:
        """Report how an attempt ended; the queue decides what follows.

        ``marking``: the attempt's ``running`` mark being written; the end is published after
        it. A queue that applies writes in the order they come (``keeps_order``) gets the end
        right behind the mark (they share a commit); any other once the mark is written.
        ``after``: work the end is published after (the scratch directory's removal), done
        while the end is written.

        With ``retry_unavailable`` (a pool's shared queue), a queue that cannot be reached is
        asked again until it answers or the daemon stops: the outcome is not dropped (its task
        would run again). Meanwhile the task is in ``recording``."""
        self.recording.add(outcome.task_id)
        try:
            if marking is not None and not marking.done():
                if getattr(self.queue, "keeps_order", False):
                    await asyncio.sleep(0)  # the mark's first step hands it to the writer
                else:
                    await asyncio.wait([marking])
            changes = await self._record(outcome)
            if marking is not None:
                await asyncio.wait([marking])
            if after is not None:
                await after
        finally:
            self.recording.discard(outcome.task_id)
        if changes is None:
            return
        self.telemetry.publish(changes)
        # the slot was offered again when the process ended; a round is only worth running
        # again when the task went back to the queue
        if wake and any(change.state in READY_STATES for change in changes):
            self.poke()

    async def _record(self, outcome: Outcome) -> list[Change] | None:
        delay = FINISH_RETRY_S
        while True:
            try:
                return await self.queue.finish(
                    [outcome], now=self.clock.time(), retry_delay=self.backoff
                )
            except BackendUnavailable as exc:
                if not self.retry_unavailable or self.closing:
                    log.error("recording the end of task %s failed: %s", outcome.task_id, exc)
                    return None
                log.warning(
                    "task %s ended; recording it waits for the queue (%s)", outcome.task_id, exc
                )
            except Exception:
                log.exception("recording the end of task %s failed", outcome.task_id)
                return None
            await asyncio.sleep(delay)
            delay = min(FINISH_RETRY_MAX_S, delay * 2)

    def _on_preempt(self, task_id: str) -> PreemptCallback:
        loop = asyncio.get_running_loop()

        def preempted(_: Any) -> None:
            def stop() -> None:
                active = self.active.get(task_id)
                if active is not None:
                    active.allocation_id = None  # the arbiter took it back already
                    active.release_reason = "preempted by a higher-priority allocation"
                    active.stop()

            loop.call_soon_threadsafe(stop)

        return preempted

    async def _execute(self, active: Active) -> None:
        record = active.record
        try:
            outcome = await self._run_with_model(active)
        except Exception as exc:
            log.exception("task %s: internal error", record.task_id)
            # the message may quote the task's command: it stays in the daemon's log, since a
            # task's error is shown to every caller and streamed with its events
            outcome = record.outcome(
                OutcomeKind.ERROR,
                error=f"internal error ({type(exc).__name__}); see the daemon's log",
            )
        finally:
            if active.mark_timer is not None:
                active.mark_timer.cancel()
            self._release(active)
            # handed over here so that it happens even when this coroutine is cancelled
            scratch_removed = self._remove_scratch(active)
            self.poke()  # a slot is free: the next task can start while this one is recorded
            for listener in self.on_slot_free:
                listener()
        if active.lost:
            if scratch_removed is not None:
                await scratch_removed
        else:
            # a mark not written yet (the task ended within MARK_DELAY_S) goes with the end
            await self.finish(outcome, marking=self._mark(active), after=scratch_removed)

    async def _run_with_model(self, active: Active) -> Outcome:
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
            active.model_env = model_env(name, handle)
            outcome = await self._run_process(active)
        return outcome

    async def _run_process(self, active: Active) -> Outcome:
        record = active.record
        spec = record.task_spec()
        if spec.blocks:  # else the runner makes it, in the same hop as the start
            scratch = scratch_dir(self.data_dir, active.device, record.task_id)
            await in_spawner(private_dir, scratch)
            try:
                if self.blocks is None:
                    raise BlockMissing("this node has no memory store to read blocks from")
                await materialize(self.blocks, list(spec.blocks), scratch)
            except BlockMissing as exc:
                return record.outcome(OutcomeKind.ERROR, error=str(exc))
        if spec.release is not None:
            try:
                if self.releases is None:
                    raise BackendUnavailable("this daemon has no release directory")
                where = self.releases.checkout(spec.release)
            except VramancerError as exc:
                return record.outcome(
                    OutcomeKind.ERROR, error=f"release {spec.release!r}: {exc.message}"
                )
            spec = spec.model_copy(update={"cwd": str(where)})
        request = run_request(
            record,
            spec,
            device=active.device,
            cuda_index=active.cuda_index,
            model_env=active.model_env,
            settings=self.settings,
            data_dir=self.data_dir,
            programs=self.programs,
            environ=os.environ,
        )
        run = ProcessRun(request, self.warm)
        try:
            await run.start()
        except OSError as exc:
            kind, error = start_failure(exc, request.cwd)
            return record.outcome(kind, error=error)
        active.run = run
        active.pgid = run.pid
        if active.cancel or active.release_reason or active.lost:
            run.cancel()
        # The running mark is written MARK_DELAY_S after the start, or with the task's end if
        # that comes first; it is published as soon as it is committed, always before the end.
        active.started_at = self.clock.time()
        loop = asyncio.get_running_loop()
        active.mark_timer = loop.call_later(MARK_DELAY_S, self._mark, active)
        result = await run.wait()
        return outcome_of(active, result)

    def _mark(self, active: Active) -> asyncio.Task[None] | None:
        """Start writing the task's ``running`` mark unless it is written or being written
        (or the process never started); the task writing it."""
        if active.mark_timer is not None:
            active.mark_timer.cancel()
            active.mark_timer = None
        if active.marking is None and active.started_at is not None and not active.lost:
            active.marking = asyncio.ensure_future(self._write_mark(active))
        return active.marking

    async def _write_mark(self, active: Active) -> None:
        record, run = active.record, active.run
        assert run is not None and active.started_at is not None
        try:
            changes = await self.queue.mark_running(
                record.task_id,
                record.lease_token,
                pid=run.pid,
                pid_started=run.started_at,
                now=active.started_at,
            )
        except Exception as exc:
            log.error("recording a task as running failed: %s", exc)
            return
        self.telemetry.publish(changes)

    def _release(self, active: Active) -> None:
        self.active.pop(active.record.task_id, None)
        if active.allocation_id is not None:
            try:
                self.arbiter.release_allocation(active.allocation_id)
            except Exception:
                log.exception("releasing the VRAM of task %s failed", active.record.task_id)
            active.allocation_id = None

    def _remove_scratch(self, active: Active) -> asyncio.Future[None] | None:
        """The attempt's scratch directory goes (ours even when the task ran in its own cwd):
        handed to the spawner thread now, before the end is written, so a next attempt (started
        from that thread, in order) cannot create it again first. The end is published once
        it is gone; the loop does not wait for the ``rmdir`` (a journal update that may take
        longer than the rest of the task's end). None: scratch directories are kept."""
        if self.settings.keep_scratch:
            return None
        return to_spawner(
            remove_dir, scratch_dir(self.data_dir, active.device, active.record.task_id)
        )


def remove_empty_dir(path: Path) -> bool:
    """Remove ``path`` if it is an empty directory or is not there; False when it holds
    something (or cannot be removed with one ``rmdir``)."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def remove_dir(path: Path) -> None:
    """Remove ``path`` and what it holds, if anything: most tasks leave their scratch
    directory empty, and one ``rmdir`` is much cheaper than walking it (``shutil.rmtree``)."""
    if not remove_empty_dir(path):
        shutil.rmtree(path, ignore_errors=True)


#: ``errno`` values of a failed start that no retry can cure: the program is missing or cannot
#: be executed, or the working directory does not exist.
PERMANENT_START_ERRORS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EACCES,
        errno.ENOEXEC,
        errno.ELOOP,
        errno.ENAMETOOLONG,
    }
)


def start_failure(exc: OSError, cwd: str | os.PathLike[str]) -> tuple[OutcomeKind, str]:
    """The outcome kind and error of a start that raised ``exc``: ``fatal`` when no retry can
    cure it (``PERMANENT_START_ERRORS``), else ``error``. The error names neither the program
    nor its arguments (it is shown to every caller, the command only to its owner)."""
    reason = exc.strerror or type(exc).__name__
    if exc.filename is not None and os.fspath(exc.filename) == os.fspath(cwd):
        reason = f"its working directory: {reason}"
    if exc.errno in PERMANENT_START_ERRORS:
        return OutcomeKind.FATAL, f"cannot start the program: {reason}; not retried"
    return OutcomeKind.ERROR, f"cannot start the program: {reason}"


def outcome_of(active: Active, result: RunResult) -> Outcome:
    """How the attempt ended: a stop that was not the task's fault is ``released``."""
    record = active.record
    if result.ok:
        kind, error = OutcomeKind.OK, None
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


def visible_bytes(snapshot: SystemSnapshot, active: Active) -> int:
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
