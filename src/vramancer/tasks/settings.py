"""Settings of the ``[tasks]`` section: the GPU task scheduler.

Every key is documented in ``docs/configuration.md`` (section ``## [tasks]``).
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from vramancer.plugins import DOTTED_PATH
from vramancer.tasks.model import MAX_BATCH_HARD
from vramancer.units import Size


class PickerStrategy(StrEnum):
    """How the device picker chooses among GPUs that can take a task."""

    #: Prefer an idle GPU, then the least busy, coolest one: small jobs do not pile up.
    SPREAD = "spread"
    #: Prefer the GPU whose free VRAM fits the task most tightly: keeps big GPUs free.
    BINPACK = "binpack"


class Synchronous(StrEnum):
    """SQLite ``synchronous`` level of the task queue: what an acknowledgement promises."""

    #: fsync on every commit: an acknowledged task survives a power cut.
    FULL = "full"
    #: No fsync on commit (WAL): an acknowledged task survives a daemon crash, not a power cut.
    NORMAL = "normal"


#: Lost leases after which a task ends failed (``max_lease_losses``).
DEFAULT_MAX_LEASE_LOSSES = 3
#: Ended tasks are kept this long (``retention_s``): 30 days.
DEFAULT_RETENTION_S = 30 * 24 * 3600.0


class TasksSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Retries after the first attempt when a task's body does not say (``max_retries``).
    max_retries: int = Field(default=2, ge=0, le=100)
    #: Timeout of a task when its body does not say (``timeout``).
    default_timeout_s: float = Field(default=3600, gt=0)
    #: Empty: any command for the operator role; else the executable names allowed.
    #: A ``shell`` task runs ``sh -c``: allowed only when ``sh`` is listed; ``python`` tasks
    #: only when ``python`` is listed.
    allowed_commands: list[str] = Field(default_factory=list)

    #: ``python`` tasks fork from a warm runner (an interpreter that has imported
    #: ``warm_preload`` already) instead of starting an interpreter each: milliseconds instead of
    #: the interpreter's start and the imports. Each task keeps its own process and group.
    warm_python: bool = True
    #: Modules the warm runner imports once at its start (``torch``, ``mypackage.train``). It
    #: must not initialise CUDA (importing torch does not); a preloaded module's code is the one
    #: of the runner's start: restart the daemon after changing it.
    warm_preload: list[str] = Field(default_factory=list, max_length=64)

    #: Tasks that may run at the same time on one GPU.
    slots_per_device: int = Field(default=1, ge=1, le=1024)
    #: Tasks that may run at the same time on the host of a machine without GPUs.
    host_slots: int = Field(default=2, ge=1, le=1024)
    #: ``spread`` or ``binpack``.
    picker: PickerStrategy = PickerStrategy.SPREAD
    #: A device whose telemetry is older than this is not eligible (a heartbeat TTL).
    heartbeat_ttl_s: float = Field(default=15.0, gt=0)
    #: Telemetry older than this is stale: still eligible, but scored worse.
    stale_after_s: float = Field(default=5.0, gt=0)
    #: A hotter GPU is not eligible.
    max_temperature_celsius: float = 78.0
    #: A GPU busier than this (0..1) is not eligible.
    max_busy_ratio: float = Field(default=0.95, ge=0, le=1)
    #: A GPU at or under this utilization, running none of our tasks, counts as idle.
    idle_busy_ratio: float = Field(default=0.05, ge=0, le=1)

    #: How long a lease lasts without a heartbeat before the task is queued again.
    lease_s: float = Field(default=30.0, gt=0)
    #: A task whose lease was lost this many times (its worker or the daemon died while it
    #: ran, each time) ends failed instead of being run again: no crash loop.
    max_lease_losses: int = Field(default=DEFAULT_MAX_LEASE_LOSSES, ge=1, le=1000)
    #: A ready task that has waited this long goes ahead of the normal order, and when it
    #: does not fit, the device it fits once our own tasks there end is held for it (no new
    #: task starts there): big or long tasks are not passed forever. 0 turns it off.
    starvation_s: float = Field(default=600.0, ge=0)
    #: Ended tasks (done, failed, cancelled) and their logs are deleted this long after they
    #: ended. 0 keeps them forever.
    retention_s: float = Field(default=DEFAULT_RETENTION_S, ge=0)
    #: First retry delay; doubles at each further attempt.
    backoff_base_s: float = Field(default=2.0, ge=0)
    #: Longest retry delay.
    backoff_max_s: float = Field(default=300.0, ge=0)
    #: After a timeout, SIGTERM, then SIGKILL to the process group after this grace.
    kill_grace_s: float = Field(default=2.0, ge=0)
    #: Bytes of stdout and of stderr kept per task in its log files; the rest is dropped.
    max_output_bytes: Size = 1024 * 1024
    #: Bytes of the end of stdout and of stderr kept in the database (``output_tail``).
    output_tail_bytes: Size = 2048
    #: Largest task body (JSON) accepted.
    max_payload_bytes: Size = 64 * 1024
    #: Most tasks in one ``submit_batch``; a longer list is refused before its items are
    #: validated (at most ``MAX_BATCH_HARD``, 100000).
    max_batch: int = Field(default=1000, ge=1, le=MAX_BATCH_HARD)
    #: Maintenance tasks (warmup, compress, noop) one viewer may have not yet ended; more is
    #: refused with 429. Operators and admins are not limited. 0 refuses viewers' submissions.
    viewer_max_queued: int = Field(default=8, ge=0, le=1_000_000)
    #: Largest ``payload`` (as compact JSON) a viewer's task may carry (422 beyond).
    viewer_max_payload_bytes: Size = 1024
    #: Maintenance tasks (warmup, compress, noop) run only after devices were idle this long.
    maintenance_idle_s: float = Field(default=5.0, ge=0)
    #: Maintenance tasks wait while the host CPU is busier than this (0..1; 1: not considered).
    maintenance_max_cpu_ratio: float = Field(default=0.9, ge=0, le=1)
    #: A maintenance task that has waited this long for an idle window runs anyway, after the
    #: user tasks of its round, and no longer yields to them: a busy host cannot starve it.
    #: 0: it never runs outside an idle window.
    maintenance_max_wait_s: float = Field(default=300.0, ge=0)
    #: The daemon queues the memory store's own upkeep (warmup, compress, and a rebalance
    #: pass: queued promotions by hotness, then an eviction cycle) as system-owned
    #: maintenance tasks when the machine is idle, at most one of each kind at a time.
    auto_maintenance: bool = True
    #: Seconds between two rounds of the daemon's own maintenance (``auto_maintenance``).
    auto_maintenance_interval_s: float = Field(default=600.0, gt=0)
    #: Maintenance tasks taken at once when the machine is idle.
    maintenance_batch: int = Field(default=1000, ge=1)
    #: Blocks a warmup or compress task handles when its payload does not say.
    maintenance_max_blocks: int = Field(default=64, ge=1)
    #: How often the dispatcher looks at the queue when nothing wakes it.
    dispatch_interval_s: float = Field(default=0.2, gt=0)
    #: Queued tasks the dispatcher considers per round (bounded, not a scan of the queue).
    dispatch_scan: int = Field(default=256, ge=1)
    #: Expected run time of a command never seen before (orders tasks of one priority).
    default_estimate_s: float = Field(default=60.0, gt=0)
    #: Weight of the last run in the learned run time of a command (moving average).
    estimate_alpha: float = Field(default=0.3, gt=0, le=1)
    #: A ``RuntimeEstimator`` (``estimate(task)``, ``observe(key, run_s)``) named by its dotted
    #: path ``package.module:attr``, replacing the learned moving average. None: the default.
    runtime_estimator: str | None = Field(default=None, pattern=DOTTED_PATH)
    #: Keep a task's scratch directory after it ends (default: removed).
    keep_scratch: bool = False
    #: ``full`` (fsync per commit) or ``normal``: see docs/configuration.md.
    synchronous: Synchronous = Synchronous.FULL
