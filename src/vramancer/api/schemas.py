"""Response models of the JSON routes, so ``/openapi.json`` describes every answer.

The library builds most answers as plain dicts (``check_resources()``, ``devices.report()``,
``ModelStatus.as_dict()`` ...); the routes declare these models and FastAPI checks each answer
against its model before sending it. Every field a route answers today is declared, in the
order it is sent. Answers may gain fields (fields are added, never renamed or removed), so the
models built from library dicts keep keys they do not declare (``extra="allow"``): a field a
subsystem adds reaches the client unchanged, and is declared here when it is settled.

Errors are not here: every route's 4xx and 5xx share :class:`ErrorResponse`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Answer(BaseModel):
    """Base of the response models: undeclared keys pass through (see the module docstring)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


# -- errors ---------------------------------------------------------------------------------------


class ErrorDetail(Answer):
    """``code`` (machine-readable) and ``message`` (for people), plus details of the error
    (``field``, ``requested_bytes``, ``available_bytes``, ``primary`` ...)."""

    code: str
    message: str


class ErrorResponse(BaseModel):
    """Every error answer: ``{"error": {"code", "message", ...}}``."""

    error: ErrorDetail


#: The error answers every router declares (``include_router(..., responses=...)``). A "4XX"
#: entry also replaces FastAPI's own 422 schema, which is not what this API answers.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "Refused: the error object says why."},
    "5XX": {
        "model": ErrorResponse,
        "description": "A backend or the daemon is unavailable (503), timed out (504), or the "
        "disk is full (507).",
    },
}


# -- health ---------------------------------------------------------------------------------------


class Health(BaseModel):
    """``GET /healthz``."""

    status: Literal["ok", "starting"]
    version: str
    #: In a pool: whether this daemon reaches its NATS servers (absent on one machine).
    nats: Literal["connected", "disconnected"] | None = None


# -- system ---------------------------------------------------------------------------------------


class CpuInfo(Answer):
    count: int
    utilization_ratio: float


class HostMemory(Answer):
    total_bytes: int
    available_bytes: int
    used_bytes: int
    used_ratio: float
    swap_total_bytes: int
    swap_used_bytes: int
    over_threshold: bool


class ResourceGpu(Answer):
    index: int
    uuid: str
    name: str
    backend: str
    simulated: bool
    torch_device: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    memory_used_ratio: float
    utilization_ratio: float | None
    temperature_celsius: float | None
    power_watts: float | None
    over_threshold: bool
    error: str | None


class Thresholds(Answer):
    memory_threshold: float
    gpu_memory_threshold: float


class SystemResources(Answer):
    """``GET /v1/system/resources``: ``ResourceOrchestrator.check_resources()``."""

    node: str
    taken_at: float
    cpu_only: bool
    cpu: CpuInfo
    memory: HostMemory
    gpus: list[ResourceGpu]
    thresholds: Thresholds
    needs_optimization: bool


class MemoryState(Answer):
    process_rss_bytes: int
    host_used_bytes: int
    host_available_bytes: int
    gpu_used_bytes: int


class Reclaimed(Answer):
    host: int
    gpu: int


class OptimizeResult(Answer):
    """``POST /v1/system/optimize``: ``ResourceOrchestrator.optimize_resources()``."""

    optimized: bool
    actions_taken: list[str]
    memory_before: MemoryState
    memory_after: MemoryState
    reclaimed_bytes: Reclaimed


# -- devices --------------------------------------------------------------------------------------


class HostInfo(Answer):
    cpu_count: int
    cpu_utilization_ratio: float
    memory_total_bytes: int
    memory_available_bytes: int
    memory_used_bytes: int
    swap_total_bytes: int
    swap_used_bytes: int
    taken_at: float
    hostname: str
    platform: str
    machine: str


class GpuProcessInfo(Answer):
    pid: int
    used_memory_bytes: int | None
    name: str | None


class MigInfo(Answer):
    index: int
    uuid: str | None
    memory_total_bytes: int | None
    memory_used_bytes: int | None


class GpuHolder(Answer):
    """Something holding memory on a GPU (``devices/holders.py``), largest first."""

    #: ``model``, ``task``, ``allocation`` (ours) or ``external`` (another program's process,
    #: or ``id`` ``unattributed``: external memory no reported process accounts for).
    kind: Literal["model", "task", "allocation", "external"]
    #: The model's name, the task id, the allocation id, ``pid:N`` or ``unattributed``.
    id: str
    name: str
    #: Who asked for it (a task's submitter, an allocation's owner); null when unknown.
    owner: str | None
    bytes: int
    #: Since when (Unix seconds); null when unknown.
    since: float | None
    pid: int | None


class Device(Answer):
    """One GPU of ``GET /v1/devices`` (and ``GET /v1/devices/{index}``)."""

    index: int
    uuid: str
    name: str
    vendor: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_ratio: float | None
    temperature_celsius: float | None
    power_watts: float | None
    processes: list[GpuProcessInfo]
    mig: list[MigInfo]
    taken_at: float
    error: str | None
    cuda_index: int | None
    simulated: bool
    torch_device: str
    backend: str
    memory_used_ratio: float
    #: What VRAMancer has reserved on it: models, running tasks' ``vram``, allocations.
    memory_reserved_bytes: int = 0
    #: In use but explained by no reservation: ``max(0, memory_used_bytes - reserved)``.
    memory_external_bytes: int = 0
    holders: list[GpuHolder] = Field(default_factory=list)


class DeviceList(Answer):
    """``GET /v1/devices``: every GPU (real ones first) and the host, as last polled."""

    node: str
    taken_at: float
    cpu_only: bool
    host: HostInfo
    devices: list[Device]


# -- gpu ------------------------------------------------------------------------------------------


class VramInfo(Answer):
    total_mb: int
    used_mb: int
    free_mb: int
    gpu_name: str
    gpu_utilization_percent: int


class GpuStatus(Answer):
    """``GET /v1/gpu/status``: ``ModelManager.gpu_status()`` (``GpuResourceStatus``)."""

    execution_mode: str
    vlm_state: str
    vlm_model: str
    clip_device: str
    vram: VramInfo
    idle_timeout_seconds: int
    #: ISO 8601 (UTC), or null before the first request.
    last_vlm_request: str | None
    degraded_mode: bool
    degraded_reason: str | None
    cpu_only: bool
    simulated: bool


# -- profile --------------------------------------------------------------------------------------


class PlanStep(Answer):
    action: str
    model: str
    device: str | None
    reason: str
    description: str


class StepResult(PlanStep):
    status: str
    duration_s: float
    error: str | None
    error_code: str | None


class SwitchReport(Answer):
    """What a profile switch did, step by step (``PUT /v1/profile``, ``last_switch``)."""

    name: str
    previous: str
    ok: bool
    duration_s: float
    failed_step: int | None
    steps: list[StepResult]
    notes: list[str]


class ProfilePlan(Answer):
    """``PUT /v1/profile`` with ``"dry_run": true``: the plan, not run."""

    name: str
    dry_run: Literal[True]
    steps: list[PlanStep]
    notes: list[str]


class ProfileState(Answer):
    """``GET /v1/profile``."""

    name: str
    #: Every profile: model name -> placement.
    profiles: dict[str, dict[str, str]]
    last_switch: SwitchReport | None


# -- models ---------------------------------------------------------------------------------------


class ModelInfo(Answer):
    """One managed model (``GET /v1/models``, ``…/status``, ``…/load|unload|migrate``)."""

    name: str
    backend: str
    state: Literal["unloaded", "loading", "loaded", "unloading", "error"]
    device: str | None
    runs_on: str | None
    simulated: bool
    vram_bytes: int
    used_vram_bytes: int
    priority: str
    workload_type: str
    #: ISO 8601 (UTC), or null if never used.
    last_used: str | None
    in_use: int
    idle_timeout_s: float
    never_evict: bool
    pinned_device: str | None
    allowed_devices: list[str]
    variant: str | None
    error: str | None
    loads: int
    last_load_s: float | None


class ModelList(Answer):
    """``GET /v1/models``."""

    models: list[ModelInfo]
    profile: str
    degraded_mode: bool
    degraded_reason: str | None


# -- allocations and the arbiter ------------------------------------------------------------------


class AllocationOut(Answer):
    """One allocation (``Allocation.as_dict()``)."""

    id: str
    workload_type: str
    priority: str
    memory_bytes: int
    quality_target: float
    device: str | None
    owner: str | None
    created_at: float
    preemptible: bool
    min_quality: float | None
    #: What ``quality_target`` means (1.0 = full quality; lower: run lighter) and why it has
    #: that value: the memory pressure after the grant, the priority and workload type.
    quality_reason: str = ""


class AllocationList(Answer):
    """``GET /v1/allocations``."""

    allocations: list[AllocationOut]
    budget_bytes: int
    allocated_bytes: int
    available_bytes: int


class Released(BaseModel):
    """``DELETE /v1/allocations/{id}``."""

    released: str


class DeviceUsage(Answer):
    device: str
    budget_bytes: int
    allocated_bytes: int
    available_bytes: int
    #: Memory used on the GPU outside VRAMancer now: never granted.
    external_bytes: int = 0


class ArbiterStateOut(Answer):
    budget_bytes: int
    allocated_bytes: int
    available_bytes: int
    pressure_ratio: float
    qualities: dict[str, float]
    active: dict[str, int]
    devices: list[DeviceUsage]
    waiters: int
    shutting_down: bool
    allocations: list[AllocationOut]


class Denied(Answer):
    memory: int
    quality: int
    timeout: int


class ArbiterStats(Answer):
    total_allocations: int
    successful_allocations: int
    failed_allocations: int
    denied: Denied
    released: int
    preemptions: int
    quality_reductions: int
    avg_memory_pressure: float
    avg_quality: dict[str, float]
    peak_allocated_bytes: int
    waiters: int
    uptime_s: float


class ArbiterOut(Answer):
    """``GET /v1/arbiter``."""

    state: ArbiterStateOut
    stats: ArbiterStats


# -- memory ---------------------------------------------------------------------------------------


class Tier(Answer):
    name: str
    latency: float
    capacity_bytes: int
    target_capacity_bytes: int
    used_bytes: int
    free_bytes: int
    blocks: int
    pressure: float
    stored_bytes: int
    compression_ratio: float
    hits: int
    path: str | None
    devices: list[int]


class TierTotals(Answer):
    blocks: int
    bytes: int
    pinned: int
    hits: int
    misses: int
    pending_promotions: int
    promotions: int
    demotions: int
    evictions: int
    bytes_moved: int


class TierList(Answer):
    """``GET /v1/memory/tiers``."""

    tiers: list[Tier]
    totals: TierTotals


class Block(Answer):
    id: str
    size: int
    tier: str
    pinned: bool
    priority: int
    hint: str | None
    #: ``bytes``, ``numpy`` or ``torch``: how the block's bytes are rebuilt.
    kind: str
    dtype: str
    shape: list[int]
    compression: str
    hotness: float


class BlockPage(Answer):
    """``GET /v1/memory/blocks``: a page of blocks, oldest first."""

    items: list[Block]
    total: int
    offset: int
    limit: int
    next_offset: int | None


class BlockStored(Answer):
    """``PUT /v1/memory/blocks/{id}``."""

    id: str
    size: int
    tier: str
    priority: int
    durable: bool


class BlockDeleted(BaseModel):
    """``DELETE /v1/memory/blocks/{id}``."""

    id: str
    deleted: Literal[True]


class EvictReport(Answer):
    """``POST /v1/memory/evict``: the tier asked (null: all) and what moved."""

    tier: str | None
    moved: int
    bytes: int


# -- tasks ----------------------------------------------------------------------------------------


class Submitted(Answer):
    """``POST /api/tasks/submit``: the task's id; ``created`` is false when the caller's own
    idempotency key named a task it had already queued."""

    task_id: str
    created: bool


class SubmittedBatch(Answer):
    """``POST /api/tasks/submit_batch``: ids and ``created`` flags, in the order given."""

    task_ids: list[str]
    created: list[bool]


class TaskStatus(Answer):
    """One task as ``status``, ``history`` and ``cancel`` show it. ``spec`` is the body it was
    submitted with (``env`` values, command text and output tails redacted as the caller's role
    and ownership require); ``owner`` is who submitted it (``system`` for the daemon's own
    maintenance)."""

    task_id: str
    type: str
    state: str
    attempts: int
    max_retries: int
    device: str | None
    #: The node of the pool its attempt was leased to (None on one machine).
    node: str | None
    gpu: int | None
    vram_bytes: int | None
    model: str | None
    priority: str
    exit_code: int | None
    error: str | None
    #: Why a ``waiting_gpu`` task waits, recomputed from the state now on every read (the
    #: dispatcher's rule: each device's slots, memory after reservations and external memory,
    #: temperature, load); null in any other state.
    waiting_reason: str | None = None
    timeout_s: float | None
    estimate_s: float | None
    submitted_at: float | None
    scheduled_at: float | None
    started_at: float | None
    finished_at: float | None
    not_before: float | None
    cancel_requested: bool
    idempotency_key: str | None
    lease_losses: int | None
    ready_at: float | None
    owner: str
    system: bool
    stdout_tail: str | None
    stderr_tail: str | None
    spec: dict[str, Any]


class TaskHistory(Answer):
    """``GET /api/tasks/history``: newest first; ``next_cursor`` (null on the last page) is
    passed back as ``cursor``."""

    tasks: list[TaskStatus]
    next_cursor: str | None


class MaintenanceWindow(Answer):
    """What maintenance tasks wait for: ``reason`` is null when the machine is idle."""

    waiting: int
    idle: bool
    reason: str | None
    max_wait_s: float
    auto_maintenance: bool


class TaskStats(Answer):
    """``GET /api/tasks/stats``: tasks per state, and the maintenance window."""

    counts: dict[str, int]
    maintenance: MaintenanceWindow


class TaskLogs(Answer):
    """``GET /api/tasks/{id}/logs``: one attempt's output from the offsets asked;
    ``stdout_next`` / ``stderr_next`` are the offsets to continue from."""

    task_id: str
    state: str
    attempts: int
    attempt: int
    stdout: str
    stderr: str
    truncated: bool
    stdout_next: int
    stderr_next: int
