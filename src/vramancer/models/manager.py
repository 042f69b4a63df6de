"""``ModelManager``: the lifecycle of managed models (seed 002's GPU resource manager, generalised).

Each model of ``[[models]]`` has a backend (Ollama, torch module, model-server process) and a
state (``UNLOADED -> LOADING -> LOADED -> UNLOADING``, ``ERROR``). The manager:

* serialises VRAM-changing work: one lock per model and one per GPU; every load, unload or move
  touching a GPU holds that GPU's lock (seed property 13), so two loads never race for VRAM;
* loads through the arbiter (an allocation with the model's VRAM and priority; ``on_preempt``
  moves the model to the CPU or unloads it), evicting idle, low-priority, cheap-to-reload models
  first when a GPU is full (:func:`policy.choose_evictions`), and after an unload waits until
  the GPU's free VRAM has really come back (bounded poll of the device telemetry);
* queues requests for models that are not loaded per GPU and serves them grouped by model with
  a maximum wait (:func:`policy.next_group`);
* times out and retries loads and unloads (``max_load_retries``), then marks the model ERROR
  and publishes ``model_error``;
* unloads models idle for their timeout (``reap_once``), never one in use;
* switches profiles (seed 002's execution modes) with a pure plan that frees VRAM first;
* tracks Ollama's reachability: unreachable -> degraded mode with a reason, probed again every
  ``[ollama] retry_interval_s``; the other models keep working.

Models on simulated GPUs are accounted (arbiter, telemetry via ``adjust_simulated``) but their
tensors stay on the CPU; their status says ``runs_on: cpu``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from vramancer.arbiter.types import Allocation, PreemptCallback, Priority, WorkloadType
from vramancer.clock import Clock
from vramancer.devices.types import GpuSnapshot
from vramancer.errors import (
    BackendUnavailable,
    InsufficientMemory,
    InvalidInput,
    NotFound,
    OperationTimeout,
    ShuttingDown,
    VramancerError,
)
from vramancer.events import EventBus
from vramancer.models import policy
from vramancer.models.backends.base import (
    BackendService,
    LoadResult,
    ModelBackend,
    RunningModel,
    Target,
)
from vramancer.models.backends.ollama import OllamaClient, OllamaModel
from vramancer.models.backends.process import ProcessModel
from vramancer.models.backends.torch_module import TorchModel
from vramancer.models.errors import BackendError, ModelBusy, ModelNotInBackend, ProfileSwitchFailed
from vramancer.models.ports import ArbiterPort, DevicePort
from vramancer.models.registry import IDLE, all_profiles, validate_model_settings
from vramancer.models.settings import ModelSpec
from vramancer.models.types import (
    CPU,
    BackendKind,
    GpuResourceStatus,
    ModelState,
    ModelStatus,
    Placement,
    PlacementKind,
    PlanStep,
    ProfilePlan,
    StepAction,
    StepResult,
    StepStatus,
    SwitchReport,
    gpu_device,
    gpu_index,
    normalize_device,
)
from vramancer.observability import tracing
from vramancer.observability.metrics import Metrics
from vramancer.resources.actions import ModelAction, ModelActionKind
from vramancer.units import MIB, format_size

if TYPE_CHECKING:
    from vramancer.config import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

_RANK = {"background": 0, "normal": 1, "high": 2, "user_facing": 3}
_DEFAULT_WORKLOAD = {
    BackendKind.OLLAMA: WorkloadType.LLM,
    BackendKind.TORCH: WorkloadType.EMBEDDING,
    BackendKind.PROCESS: WorkloadType.OTHER,
}
#: A measured footprint off the allocation by more than this factor makes the manager re-book.
_RESIZE_TOLERANCE = 1.05
#: A freed GPU counts as recovered when this share of the freed bytes shows as free again.
_RECOVERED_SHARE = 0.9
#: Rounds of "wait for the state to change, then try again" before a request gives up.
_MAX_OBTAIN_ROUNDS = 64
#: Owner prefix of the arbiter allocations of managed models (``model:NAME``).
_MODEL_OWNER = "model:"
#: Other allocation holders a "not enough VRAM" message names.
_HOLDERS_SHOWN = 5
_LOAD_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


def _reclaimable(
    allocations: Iterable[Allocation], device: str, rank: int | None
) -> tuple[int, int]:
    """Bytes the arbiter would preempt for a request of priority ``rank``: preemptible
    allocations of a strictly lower priority that are not managed models; (those naming
    ``device``, all of them). (0, 0) without a rank."""
    if rank is None:
        return 0, 0
    on_device = anywhere = 0
    for a in allocations:
        is_model = (a.owner or "").startswith(_MODEL_OWNER)
        if a.preemptible and a.priority.rank < rank and not is_model:
            anywhere += a.memory_bytes
            on_device += a.memory_bytes if a.device == device else 0
    return on_device, anywhere


@dataclass(eq=False)
class _Entry:
    """One model's mutable record. Changed only on the event loop, under its locks."""

    spec: ModelSpec
    backend: ModelBackend
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    state: ModelState = ModelState.UNLOADED
    device: str | None = None
    target: Target | None = None
    #: VRAM accounted for it now (arbiter allocation, simulated telemetry).
    used_bytes: int = 0
    #: Bytes added to a simulated GPU's telemetry (given back on unload).
    sim_bytes: int = 0
    allocation: Allocation | None = None
    last_used: float | None = None
    last_used_wall: float | None = None
    loaded_at: float | None = None
    in_use: int = 0
    draining: int = 0
    error: str | None = None
    variant: str | None = None
    loads: int = 0
    last_load_s: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> BackendKind:
        return self.backend.kind

    @property
    def rank(self) -> int:
        return _RANK[self.spec.priority]

    @property
    def on_gpu(self) -> bool:
        return self.device is not None and self.device != CPU


@dataclass(eq=False)
class _Waiter:
    model: str
    since: float
    future: asyncio.Future[bool]


@dataclass(frozen=True, slots=True)
class ModelHandle:
    """What ``use()`` yields: the model's placement and, for torch, the live object."""

    name: str
    device: str
    runs_on: str
    simulated: bool
    #: The torch module / pipeline; None for Ollama and process models.
    obj: Any = None
    #: Where to send requests (Ollama's endpoint); None for torch.
    endpoint: str | None = None
    #: Ollama: the model to name in requests, the smaller variant's tag while ``optimize`` has
    #: switched to it (naming the full model would make Ollama load it behind VRAMancer).
    backend_model: str | None = None
    #: Ollama: the ``keep_alive`` to send with requests; without one Ollama applies its own
    #: 5 minute default to the model and may unload it by itself.
    keep_alive: str | int | None = None


BackendFactory = Callable[[ModelSpec], ModelBackend]


class ModelManager:
    """See the module docstring. Built by the runtime; ``start()`` does the I/O."""

    def __init__(
        self,
        settings: Settings,
        *,
        devices: DevicePort,
        arbiter: ArbiterPort,
        events: EventBus,
        metrics: Metrics,
        clock: Clock,
        backend_factory: BackendFactory | None = None,
    ) -> None:
        self.settings = settings
        self.specs = validate_model_settings(settings)
        self.gm = settings.gpu_manager
        self.devices = devices
        self.arbiter = arbiter
        self.events = events
        self.clock = clock
        self._profiles = all_profiles(settings)
        self._profile = IDLE
        self._last_switch: SwitchReport | None = None
        self._ollama: OllamaClient | None = None
        self._make_backend = backend_factory or self._default_backend
        self._entries: dict[str, _Entry] = {}
        for spec in settings.models:
            self._entries[spec.name] = _Entry(spec=spec, backend=self._make_backend(spec))
        self._device_locks: dict[str, asyncio.Lock] = {}
        self._switch_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._queues: dict[str, list[_Waiter]] = {}
        self._drainers: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._preempted: dict[str, str] = {}
        self._preempt_lock = threading.Lock()
        self._learned: dict[str, int] = {}
        self._expires: dict[str, str | None] = {}
        self._estimated: dict[str, int | None] = {}
        self.bandwidth = policy.LoadBandwidth(float(self.gm.default_load_bandwidth))
        self._degraded: dict[str, str] = {}
        self._last_probe: dict[str, float] = {}
        self._services = _services(e.backend for e in self._entries.values())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: asyncio.Task[None] | None = None
        self._stopping = False
        self._init_metrics(metrics)

    # ------------------------------------------------------------------ construction

    def _default_backend(self, spec: ModelSpec) -> ModelBackend:
        load_timeout = spec.load_timeout_s or self.gm.load_timeout_s
        unload_timeout = spec.unload_timeout_s or self.gm.unload_timeout_s
        if spec.backend == "ollama":
            if self._ollama is None:
                self._ollama = OllamaClient(self.settings.ollama)
            return OllamaModel(
                spec, self._ollama, load_timeout_s=load_timeout, unload_timeout_s=unload_timeout
            )
        if spec.backend == "torch":
            return TorchModel(spec)
        return ProcessModel(spec, stop_grace_s=max(0.1, unload_timeout / 2))

    def _init_metrics(self, metrics: Metrics) -> None:
        labels = ("model", "backend")
        self._m_state = metrics.gauge(
            "vramancer_model_state", "1 for the state each managed model is in.", (*labels, "state")
        )
        self._m_vram = metrics.gauge(
            "vramancer_model_vram_bytes", "VRAM a managed model holds now.", labels
        )
        self._m_in_use = metrics.gauge(
            "vramancer_model_in_use", "Users inside use() of a model.", labels
        )
        self._m_load = metrics.histogram(
            "vramancer_model_load_duration_seconds",
            "Time to load (or move) a model.",
            labels,
            buckets=_LOAD_BUCKETS,
        )
        self._m_loads = metrics.counter(
            "vramancer_model_loads_total", "Model loads by result.", (*labels, "result")
        )
        self._m_unloads = metrics.counter(
            "vramancer_model_unloads_total", "Model unloads by reason.", (*labels, "reason")
        )
        self._m_degraded = metrics.gauge(
            "vramancer_models_backend_degraded",
            "1 while a model backend is unreachable.",
            ("backend",),
        )
        self._m_queue = metrics.gauge(
            "vramancer_model_queue_waiting", "Requests waiting for a model to load."
        )
        self._m_mode = metrics.gauge(
            "vramancer_execution_mode", "1 for the profile (execution mode) in force.", ("mode",)
        )
        for entry in self._entries.values():
            self._export_state(entry)
        for name in self._profiles:
            self._m_mode.labels(mode=name).set(1 if name == self._profile else 0)
        for service in self._services:
            self._m_degraded.labels(backend=service.name).set(0)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Probe the backends' servers (degraded mode if down), adopt what they already have
        loaded, start the idle reaper / prober loop and apply ``initial_profile`` in the
        background."""
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        await self.probe_backends(force=True)
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="vramancer-models")
        if self.gm.initial_profile is not None:
            self._spawn(self._initial_profile(self.gm.initial_profile))

    async def _initial_profile(self, name: str) -> None:
        report = await self.switch_profile(name)
        if not report.ok:
            log.warning(
                "initial profile %s did not apply fully: step %s failed", name, report.failed_step
            )

    async def stop(self) -> None:
        """Stop the loop, fail queued requests, unload (``unload_on_stop``) and close."""
        self._stopping = True
        runner, self._runner = self._runner, None
        tasks = [t for t in (runner, *self._tasks, *self._drainers.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for queue in self._queues.values():
            for waiter in queue:
                if not waiter.future.done():
                    waiter.future.set_exception(ShuttingDown("the model manager is stopping"))
            queue.clear()
        for entry in self._entries.values():
            await self._stop_entry(entry)
        for service in self._services:
            await service.aclose()

    async def _stop_entry(self, entry: _Entry) -> None:
        """Unload ``entry`` unless a server holds it and ``unload_on_stop`` is off (it stays
        loaded there for the next start to adopt), then close its backend."""
        if entry.state is not ModelState.UNLOADED and (
            self.gm.unload_on_stop or entry.backend.service is None
        ):
            try:
                async with self._locked(entry):
                    await self._unload_locked(entry, "shutdown", retries=0)
            except Exception as exc:
                log.warning("unloading %s at shutdown failed: %s", entry.name, exc)
        self._drop_accounting(entry)
        with contextlib.suppress(Exception):
            await entry.backend.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.gm.tick_s)
            try:
                await self.reap_once()
                await self.probe_backends()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("model manager tick failed")

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ queries

    def names(self) -> list[str]:
        return list(self._entries)

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            known = ", ".join(self._entries) or "none configured"
            raise NotFound(f"no managed model {name!r} (models: {known})", model=name)
        return entry

    def status(self, name: str) -> ModelStatus:
        entry = self._entry(name)
        spec = entry.spec
        target = entry.target
        return ModelStatus(
            name=entry.name,
            backend=entry.kind,
            state=entry.state,
            device=entry.device,
            runs_on=target.runs_on if target is not None and entry.device is not None else None,
            simulated=bool(target is not None and target.simulated and entry.device is not None),
            vram_bytes=self._expected(entry),
            used_vram_bytes=entry.used_bytes,
            priority=spec.priority,
            workload_type=self._workload(entry).value,
            last_used=entry.last_used_wall,
            in_use=entry.in_use,
            idle_timeout_s=self._idle_timeout(entry),
            never_evict=spec.never_evict,
            pinned_device=spec.pinned_device,
            allowed_devices=tuple(spec.allowed_devices),
            variant=entry.variant,
            error=entry.error,
            loads=entry.loads,
            last_load_s=entry.last_load_s,
        )

    def list_models(self) -> list[ModelStatus]:
        return [self.status(name) for name in self._entries]

    def state(self, name: str) -> ModelState:
        return self._entry(name).state

    def is_loaded(self, name: str) -> bool:
        return self._entry(name).state is ModelState.LOADED

    def device(self, name: str) -> str:
        """``cpu`` or ``cuda:N`` (seed property 12); ``cpu`` when the model is not on a GPU."""
        entry = self._entry(name)
        if entry.state is ModelState.LOADED and entry.device is not None:
            return entry.device
        return CPU

    def handle(self, name: str) -> Any:
        """The live torch object of a loaded torch model (None otherwise)."""
        return self._entry(name).backend.handle()

    @property
    def profile(self) -> str:
        """The profile (execution mode) in force."""
        return self._profile

    def profiles(self) -> dict[str, dict[str, str]]:
        return {
            name: {model: str(p) for model, p in mapping.items()}
            for name, mapping in self._profiles.items()
        }

    @property
    def last_switch(self) -> SwitchReport | None:
        return self._last_switch

    @property
    def degraded(self) -> bool:
        return bool(self._degraded)

    @property
    def degraded_reason(self) -> str | None:
        if not self._degraded:
            return None
        return "; ".join(f"{k}: {v}" for k, v in sorted(self._degraded.items()))

    def gpu_status(self) -> GpuResourceStatus:
        """Seed 002 ``get_status()``: every field always has a valid value (property 5). The
        VRAM is the VLM's GPU while it is on one, else the first GPU (the devices' own
        ``get_vram_info``)."""
        vlm = self._entries.get(self.gm.vlm_model or "")
        snap = self.devices.snapshot()
        index = gpu_index(vlm.device) if vlm is not None and vlm.on_gpu else None
        gpu = snap.gpu(index) if index is not None else None
        if gpu is None:
            index = None
            gpu = snap.gpus[0] if snap.gpus else None
        vram = self.devices.get_vram_info(index)
        timeout = self._idle_timeout(vlm) if vlm is not None else self.gm.idle_timeout_s
        return GpuResourceStatus(
            execution_mode=self._profile,
            vlm_state=vlm.state if vlm is not None else ModelState.UNLOADED,
            vlm_model=vlm.name if vlm is not None else "",
            clip_device=self.device(self.gm.clip_model) if self.gm.clip_model else CPU,
            vram=vram,
            idle_timeout_seconds=round(timeout),
            last_vlm_request=vlm.last_used_wall if vlm is not None else None,
            degraded_mode=self.degraded,
            degraded_reason=self.degraded_reason,
            cpu_only=not snap.gpus,
            simulated=bool(gpu is not None and gpu.simulated),
        )

    # ------------------------------------------------------------------ operations

    async def ensure_loaded(self, name: str, device: str | None = None) -> ModelStatus:
        """Load ``name`` (on ``device`` if given) and return only once it is loaded
        (seed property 10). Queued behind other loads of the same GPU."""
        entry = self._entry(name)
        await self._obtain(entry, device)
        self._touch(entry)  # a caller about to use the model: activity (seed 002's last request)
        self._release_hold(entry)
        return self.status(name)  # no await since the hold: it is loaded right now

    load = ensure_loaded

    async def ensure_unloaded(self, name: str) -> ModelStatus:
        """Unload ``name`` once its users are done; returns only when unloaded (property 11)."""
        entry = self._entry(name)
        async with self._quiesce(entry), self._locked(entry):
            await self._unload_locked(entry, "request")
        return self.status(name)

    unload = ensure_unloaded

    async def migrate(self, name: str, device: str) -> ModelStatus:
        """Put ``name`` on ``device`` (``cpu``, ``cuda``, ``cuda:N``): torch models move in
        place, others are unloaded and loaded there; an unloaded model is loaded there."""
        entry = self._entry(name)
        wanted = self._validate_device(entry, device)
        target = self._choose_target(entry, wanted)
        await self._place(entry, target, "migrate")
        return self.status(name)

    @contextlib.asynccontextmanager
    async def use(self, name: str, device: str | None = None) -> AsyncIterator[ModelHandle]:
        """Hold ``name`` loaded while the block runs: loads it on demand (property 9), records
        the activity, and keeps the idle reaper and evictions away until the block exits."""
        entry = self._entry(name)
        await self._obtain(entry, device)
        try:
            self._touch(entry)
            target = entry.target or Target.cpu()
            backend = entry.backend
            info = backend.request_info()
            yield ModelHandle(
                name=name,
                device=entry.device or CPU,
                runs_on=target.runs_on,
                simulated=target.simulated,
                obj=backend.handle(),
                endpoint=info.endpoint,
                backend_model=info.model,
                keep_alive=info.keep_alive,
            )
        finally:
            self._touch(entry)
            self._release_hold(entry)

    def touch(self, name: str) -> None:
        """Record activity on ``name`` (a request served outside ``use``)."""
        self._touch(self._entry(name))

    def _touch(self, entry: _Entry) -> None:
        entry.last_used = self.clock.monotonic()
        entry.last_used_wall = self.clock.time()

    def _release_hold(self, entry: _Entry) -> None:
        entry.in_use = max(0, entry.in_use - 1)
        self._m_in_use.labels(model=entry.name, backend=entry.kind.value).set(entry.in_use)
        if entry.in_use == 0:
            self._shield(entry, False)
        self._bump()

    def _shield(self, entry: _Entry, in_use: bool) -> None:
        """While a model is in use its arbiter allocation is no victim of preemption: it is
        never taken away under its user (a never-evict model's never is)."""
        if entry.allocation is not None and not entry.spec.never_evict:
            self.arbiter.set_preemptible(entry.allocation.id, not in_use)

    # ------------------------------------------------------------------ obtaining (load on demand)

    def _validate_device(self, entry: _Entry, device: str) -> str:
        """``device`` normalised (``cpu``, ``gpu``, ``cuda:N``), if the model may go there."""
        gpus = [g.index for g in self.devices.snapshot().gpus]
        wanted = normalize_device(device, gpus)
        allowed = entry.spec.allowed_devices
        if wanted == CPU:
            ok = CPU in allowed
        elif wanted == "gpu":
            ok = any(a != CPU for a in allowed)
        else:
            ok = "gpu" in allowed or wanted in allowed
        if not ok:
            raise InvalidInput(
                f"{entry.name} may not run on {device} (allowed_devices: {allowed})",
                field="device",
            )
        return wanted

    def _holdable(self, entry: _Entry, wanted: str | None) -> bool:
        if entry.state is not ModelState.LOADED or entry.draining or entry.device is None:
            return False
        if wanted is None or wanted == entry.device:
            return True
        return wanted == "gpu" and entry.on_gpu

    async def _obtain(self, entry: _Entry, device: str | None) -> None:
        """Return holding ``entry`` loaded (``in_use`` incremented)."""
        if self._stopping:
            raise ShuttingDown("the model manager is stopping")
        wanted = self._validate_device(entry, device) if device is not None else None
        for _ in range(_MAX_OBTAIN_ROUNDS):
            if self._holdable(entry, wanted):
                self._take_hold(entry)
                return
            if entry.draining or entry.state in (ModelState.LOADING, ModelState.UNLOADING):
                await self._wait_changed(self._op_wait_s(entry))
                continue
            target = self._choose_target(entry, wanted)
            if target == CPU or entry.state is ModelState.LOADED:
                await self._place(entry, target, "request")
                continue
            if await self._enqueue(entry, target):
                return
        raise OperationTimeout(f"{entry.name} could not be held loaded (it kept changing state)")

    def _take_hold(self, entry: _Entry) -> None:
        entry.in_use += 1
        self._m_in_use.labels(model=entry.name, backend=entry.kind.value).set(entry.in_use)
        if entry.in_use == 1:
            self._shield(entry, True)

    def _choose_target(self, entry: _Entry, wanted: str | None) -> str:
        """Where a load of ``entry`` goes: the asked device, the pinned one, the profile's
        placement, else the allowed GPU with room (CPU if it cannot fit and the CPU is allowed)."""
        snap = self.devices.snapshot()
        gpus = [g.index for g in snap.gpus]
        if not gpus:
            return CPU  # CPU-only mode: every model runs on the CPU
        if wanted is not None and wanted != "gpu":
            return wanted
        if wanted is None and entry.state is ModelState.LOADED and entry.device is not None:
            return entry.device
        view = self._view(entry, self.clock.monotonic())
        free = {i: self._room(i) for i in gpus}
        if wanted is None:
            if entry.spec.pinned_device is not None:
                return entry.spec.pinned_device
            placement = self._profiles.get(self._profile, {}).get(entry.name)
            chosen = self._target_from_placement(view, placement, gpus, free)
            if chosen is not None:
                return chosen
        index = policy.pick_gpu(view, gpus, free)
        if index is None:
            if wanted == "gpu":
                raise InvalidInput(f"{entry.name}: no allowed GPU", field="device")
            return CPU
        if wanted is None and view.allows_cpu() and not self._could_fit(entry, view, index):
            return CPU
        return gpu_device(index)

    def _target_from_placement(
        self,
        view: policy.ModelView,
        placement: Placement | None,
        gpus: list[int],
        free: dict[int, int],
    ) -> str | None:
        if placement is None or placement.kind is PlacementKind.UNLOADED:
            return None
        if placement.kind is PlacementKind.CPU:
            return CPU
        if placement.kind is PlacementKind.DEVICE and placement.device_index in gpus:
            return gpu_device(placement.device_index or 0)
        index = policy.pick_gpu(view, gpus, free)
        if index is None:
            return CPU if view.allows_cpu() else None
        if placement.kind is PlacementKind.GPU_IF_FREE:
            room = free.get(index, 0)
            if (room <= placement.min_free_bytes or room < view.vram_bytes) and view.allows_cpu():
                return CPU
        return gpu_device(index)

    def _could_fit(self, entry: _Entry, view: policy.ModelView, index: int) -> bool:
        """Whether ``entry`` fits on GPU ``index`` after evictions and preemptions it may make,
        or once models in use there are released."""
        decision = policy.choose_evictions(
            self._views_on(gpu_device(index), exclude=entry),
            needed_bytes=view.vram_bytes,
            free_bytes=self._room(index, entry.rank),
            priority_rank=entry.rank,
        )
        return isinstance(decision, policy.Evict) or bool(decision.busy)

    async def _enqueue(self, entry: _Entry, device: str) -> bool:
        """Wait in ``device``'s load queue; True when the drainer took a hold for us."""
        loop = asyncio.get_running_loop()
        waiter = _Waiter(entry.name, self.clock.monotonic(), loop.create_future())
        self._queues.setdefault(device, []).append(waiter)
        self._m_queue.set(sum(len(q) for q in self._queues.values()))
        if device not in self._drainers:
            self._drainers[device] = asyncio.create_task(self._drain(device))
        try:
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            held = future.done() and not future.cancelled() and future.exception() is None
            if held and future.result():
                self._release_hold(entry)
            raise

    async def _drain(self, device: str) -> None:
        """Serve ``device``'s queue one model at a time, all requests for it at once."""
        queue = self._queues[device]
        try:
            while queue:
                waiting = [policy.Waiting(w.model, w.since) for w in queue]
                name = policy.next_group(waiting, self.clock.monotonic(), self.gm.queue_max_wait_s)
                group = [w for w in queue if w.model == name]
                queue[:] = [w for w in queue if w.model != name]
                self._m_queue.set(sum(len(q) for q in self._queues.values()))
                group = [w for w in group if not w.future.done()]
                if not group or name is None:
                    continue
                await self._serve_group(self._entries[name], device, group)
        finally:
            self._drainers.pop(device, None)

    async def _serve_group(self, entry: _Entry, device: str, group: list[_Waiter]) -> None:
        try:
            await self._place(entry, device, "request")
        except Exception as exc:
            for waiter in group:
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
            return
        for waiter in group:
            if waiter.future.done():
                continue
            if self._holdable(entry, device):
                self._take_hold(entry)
                waiter.future.set_result(True)
            else:
                waiter.future.set_result(False)

    # ------------------------------------------------------------------ locking

    def _device_lock(self, device: str) -> asyncio.Lock:
        lock = self._device_locks.get(device)
        if lock is None:
            lock = self._device_locks[device] = asyncio.Lock()
        return lock

    @contextlib.asynccontextmanager
    async def _locked(self, entry: _Entry, *devices: str | None) -> AsyncIterator[None]:
        """Hold the model's lock, then the locks of the GPUs it is on or goes to (sorted, so
        two operations never wait on each other in a cycle)."""
        async with entry.lock:
            wanted = {
                d for d in (entry.device, *devices) if d is not None and d not in (CPU, "gpu")
            }
            async with contextlib.AsyncExitStack() as stack:
                for device in sorted(wanted):
                    await stack.enter_async_context(self._device_lock(device))
                yield

    def _bump(self) -> None:
        """Wake everything waiting for a state change."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def _wait_changed(self, timeout_s: float) -> None:
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    async def _wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return predicate()
            await self._wait_changed(remaining)
        return True

    @contextlib.asynccontextmanager
    async def _quiesce(self, entry: _Entry) -> AsyncIterator[None]:
        """Stop new users of ``entry`` and wait for the current ones to finish."""
        entry.draining += 1
        self._bump()
        try:
            if not await self._wait_until(lambda: entry.in_use == 0, self.gm.queue_max_wait_s):
                raise ModelBusy(
                    f"{entry.name} is still in use by {entry.in_use} user(s) after "
                    f"{self.gm.queue_max_wait_s:g} s",
                    model=entry.name,
                    in_use=entry.in_use,
                )
            yield
        finally:
            entry.draining -= 1
            self._bump()

    # ------------------------------------------------------------------ placing

    async def _place(self, entry: _Entry, device: str, reason: str) -> None:
        """Make ``entry`` loaded on ``device`` (load, move, or unload + load)."""
        if entry.state is ModelState.LOADED and entry.device != device and entry.in_use:
            async with self._quiesce(entry), self._locked(entry, device):
                await self._place_locked(entry, device, reason)
            return
        async with self._locked(entry, device):
            await self._place_locked(entry, device, reason)

    async def _place_locked(self, entry: _Entry, device: str, reason: str) -> None:
        if entry.state is ModelState.LOADED and entry.device == device:
            return
        if entry.state is ModelState.LOADED:
            if entry.backend.can_move:
                await self._move_locked(entry, device, reason)
                return
            await self._unload_locked(entry, "migrate")
        await self._load_locked(entry, device, reason)

    def _target(self, device: str) -> Target:
        index = gpu_index(device)
        if index is None:
            return Target.cpu()
        gpu = self.devices.snapshot().gpu(index)
        if gpu is None:
            raise InvalidInput(f"device {device} does not exist", field="device")
        return Target(
            device=device,
            runs_on=gpu.torch_device,
            simulated=gpu.simulated,
            cuda_index=gpu.cuda_index,
        )

    async def _load_locked(self, entry: _Entry, device: str, reason: str) -> None:
        """Load ``entry`` on ``device``; the caller holds its locks. Raises on failure."""
        if entry.state is ModelState.ERROR:
            self._drop_accounting(entry)
        target = self._target(device)
        with tracing.span("models.load", model=entry.name, device=device):
            if target.on_gpu:
                await self._make_room(entry, device)
            self._set_state(entry, ModelState.LOADING, device=device, target=target)
            entry.error = None
            started = time.perf_counter()
            try:
                result = await self._attempt(
                    entry,
                    "load",
                    lambda: entry.backend.load(target, entry.variant),
                    self._load_timeout(entry),
                )
            except VramancerError as exc:
                await self._load_failed(entry, exc)
                raise
            except asyncio.CancelledError:
                self._drop_accounting(entry)
                entry.error = "the load was cancelled"
                self._set_state(entry, ModelState.ERROR, device=None, target=None)
                raise
        duration = time.perf_counter() - started
        self._account(entry, target, result)
        entry.loads += 1
        entry.last_load_s = duration
        entry.loaded_at = self.clock.monotonic()
        self._touch(entry)
        self._set_state(entry, ModelState.LOADED, device=device, target=target)
        self.bandwidth.observe(
            entry.kind.value, result.size_bytes or self._expected(entry), duration
        )
        self._m_load.labels(model=entry.name, backend=entry.kind.value).observe(duration)
        self._m_loads.labels(model=entry.name, backend=entry.kind.value, result="ok").inc()
        self._note_backend_ok(entry)
        details = {
            "model": entry.name,
            "backend": entry.kind.value,
            "device": device,
            "runs_on": target.runs_on,
            "simulated": target.simulated,
            "duration_s": round(duration, 6),
            "vram_bytes": entry.used_bytes,
            "reason": reason,
        }
        self.events.publish("model_loaded", **details)
        self.events.publish("resource_changed", event_type="model_loaded", details=details)

    async def _load_failed(self, entry: _Entry, exc: VramancerError) -> None:
        """Leave a consistent state after a failed load: nothing accounted, and nothing left
        loaded in the backend if it can be helped."""
        self._drop_accounting(entry)
        unavailable = isinstance(exc, BackendUnavailable)
        if not unavailable:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(entry.backend.unload(), self._unload_timeout(entry))
        result = "unavailable" if unavailable else "error"
        self._m_loads.labels(model=entry.name, backend=entry.kind.value, result=result).inc()
        entry.error = exc.message
        if unavailable:
            self._set_degraded(entry.kind.value, exc.message)
            self._set_state(entry, ModelState.UNLOADED, device=None, target=None)
            return
        self._set_state(entry, ModelState.ERROR, device=None, target=None)
        self.events.publish(
            "model_error", model=entry.name, operation="load", error=exc.message, code=exc.code
        )

    async def _unload_locked(self, entry: _Entry, reason: str, retries: int | None = None) -> None:
        """Unload ``entry``; the caller holds its locks (or the lock of the GPU it is on)."""
        if entry.state is ModelState.UNLOADED:
            return
        device, target = entry.device, entry.target
        index = gpu_index(device)
        before = self._free_now(index)
        self._set_state(entry, ModelState.UNLOADING)
        with tracing.span("models.unload", model=entry.name, reason=reason):
            try:
                await self._attempt(
                    entry, "unload", entry.backend.unload, self._unload_timeout(entry), retries
                )
            except VramancerError as exc:
                entry.error = exc.message
                if isinstance(exc, BackendUnavailable):
                    self._set_degraded(entry.kind.value, exc.message)
                self._set_state(entry, ModelState.ERROR)
                self.events.publish(
                    "model_error",
                    model=entry.name,
                    operation="unload",
                    error=exc.message,
                    code=exc.code,
                )
                raise
        freed = entry.used_bytes
        self._drop_accounting(entry)
        entry.variant = None
        entry.error = None
        self._set_state(entry, ModelState.UNLOADED, device=None, target=None)
        self._m_unloads.labels(model=entry.name, backend=entry.kind.value, reason=reason).inc()
        self._note_backend_ok(entry)
        details = {
            "model": entry.name,
            "backend": entry.kind.value,
            "device": device,
            "reason": reason,
            "freed_bytes": freed,
        }
        self.events.publish("model_unloaded", **details)
        self.events.publish("resource_changed", event_type="model_unloaded", details=details)
        if index is not None and freed and target is not None and not target.simulated:
            await self._wait_recovered(index, before, freed)

    async def _move_locked(self, entry: _Entry, device: str, reason: str) -> None:
        """Move a loaded torch model in place; the caller holds the locks of both devices."""
        source, source_target = entry.device, entry.target
        target = self._target(device)
        index = gpu_index(source)
        before = self._free_now(index)
        old_allocation, old_sim, old_used = entry.allocation, entry.sim_bytes, entry.used_bytes
        entry.allocation, entry.sim_bytes, entry.used_bytes = None, 0, 0
        try:
            if target.on_gpu:
                await self._make_room(entry, device)
        except BaseException:
            entry.allocation, entry.sim_bytes, entry.used_bytes = old_allocation, old_sim, old_used
            raise
        new_allocation = entry.allocation
        self._set_state(entry, ModelState.LOADING)
        started = time.perf_counter()
        try:
            result = await self._attempt(
                entry, "move", lambda: entry.backend.move(target), self._load_timeout(entry)
            )
        except VramancerError as exc:
            self._release(new_allocation)
            entry.allocation, entry.sim_bytes, entry.used_bytes = old_allocation, old_sim, old_used
            entry.error = exc.message
            self._set_state(entry, ModelState.ERROR)
            self.events.publish(
                "model_error", model=entry.name, operation="move", error=exc.message, code=exc.code
            )
            raise
        duration = time.perf_counter() - started
        self._release(old_allocation)
        if old_sim and index is not None:
            self._adjust_sim(index, -old_sim)
        self._account(entry, target, result)
        self._set_state(entry, ModelState.LOADED, device=device, target=target)
        self._touch(entry)
        self._m_load.labels(model=entry.name, backend=entry.kind.value).observe(duration)
        details = {
            "model": entry.name,
            "from": source,
            "to": device,
            "runs_on": target.runs_on,
            "simulated": target.simulated,
            "duration_s": round(duration, 6),
            "reason": reason,
        }
        self.events.publish("model_migrated", **details)
        self.events.publish("resource_changed", event_type="device_changed", details=details)
        real_gpu = source_target is not None and not source_target.simulated
        if index is not None and old_used and real_gpu:
            await self._wait_recovered(index, before, old_used)

    async def _attempt(
        self,
        entry: _Entry,
        operation: str,
        call: Callable[[], Awaitable[T]],
        timeout_s: float,
        retries: int | None = None,
    ) -> T:
        """Run ``call`` with a timeout, retrying up to ``max_load_retries`` times. Unreachable
        backends and models the backend does not have fail at once."""
        tries = 1 + (self._retries(entry) if retries is None else retries)
        last: VramancerError | None = None
        for attempt in range(1, tries + 1):
            try:
                async with asyncio.timeout(timeout_s):  # no extra task, unlike wait_for
                    return await call()
            except TimeoutError:
                last = OperationTimeout(
                    f"{operation} of {entry.name} timed out after {timeout_s:g} s",
                    model=entry.name,
                    timeout_s=timeout_s,
                )
            except (BackendUnavailable, ModelNotInBackend):
                raise
            except VramancerError as exc:
                last = exc
            except Exception as exc:  # a factory or a server script that raised anything
                last = BackendError(
                    f"{operation} of {entry.name} failed: {type(exc).__name__}: {exc}"
                )
            log.warning(
                "%s of %s failed (attempt %d/%d): %s",
                operation,
                entry.name,
                attempt,
                tries,
                last.message,
            )
            if attempt < tries and self.gm.retry_backoff_s:
                await asyncio.sleep(self.gm.retry_backoff_s)
        assert last is not None
        last.details.setdefault("attempts", tries)
        if tries > 1:
            last.message = f"{last.message} ({tries} attempts)"
            last.args = (last.message,)
        raise last

    # ------------------------------------------------------------------ room on a GPU

    async def _make_room(self, entry: _Entry, device: str) -> None:
        """Free enough VRAM on ``device`` for ``entry`` and book it with the arbiter; the
        caller holds ``device``'s lock. Raises ``InsufficientMemory`` naming what to unload."""
        index = gpu_index(device)
        assert index is not None
        needed = self._expected(entry)
        await self._yield_for_vlm(entry, device)
        for _ in range(3):
            decision = policy.choose_evictions(
                self._views_on(device, exclude=entry),
                needed_bytes=needed,
                free_bytes=self._room(index, entry.rank),
                priority_rank=entry.rank,
            )
            if isinstance(decision, policy.NoRoom):
                if not decision.busy:
                    raise self._no_room(entry, device, decision)
                await self._wait_for_users(
                    [self._entries[n] for n in decision.busy], entry, device, decision
                )
                continue
            await self._evict_all([self._entries[v] for v in decision.victims], entry)
            if self._book(entry, device, needed):
                await self._settle_preemptions(device)
                await self._wait_room(entry, index, needed)
                return
        decision = policy.NoRoom(needed, self._room(index), self._unloadable(device, entry))
        raise self._no_room(entry, device, decision)

    async def _evict_all(self, victims: list[_Entry], entry: _Entry) -> None:
        """Evict ``victims`` one after the other; all are drained first so that none gains a
        user while the ones before it are being evicted."""
        for victim in victims:
            victim.draining += 1
        try:
            for victim in victims:
                if victim.state is ModelState.LOADED and victim.in_use == 0:
                    await self._evict(victim, f"evicted for {entry.name}")
        finally:
            for victim in victims:
                victim.draining -= 1
            self._bump()

    async def _wait_for_users(
        self, busy: list[_Entry], entry: _Entry, device: str, decision: policy.NoRoom
    ) -> None:
        for victim in busy:
            victim.draining += 1
        self._bump()
        try:
            done = await self._wait_until(
                lambda: all(v.in_use == 0 for v in busy), self.gm.queue_max_wait_s
            )
        finally:
            for victim in busy:
                victim.draining -= 1
            self._bump()
        if not done:
            raise self._no_room(entry, device, decision)

    def _book(self, entry: _Entry, device: str, needed: int) -> bool:
        """Ask the arbiter for ``needed`` bytes on ``device``; False when it says no room."""
        try:
            allocation = self.arbiter.request_allocation(
                self._workload(entry),
                Priority(entry.spec.priority),
                max(1, needed),
                device=f"gpu:{gpu_index(device)}",
                owner=f"{_MODEL_OWNER}{entry.name}",
                on_preempt=self._preempt_callback(entry.name),
                preemptible=not entry.spec.never_evict and entry.in_use == 0,
            )
        except InsufficientMemory as exc:
            log.info("arbiter refused %s for %s: %s", format_size(needed), entry.name, exc.message)
            return False
        entry.allocation = allocation
        return True

    async def _yield_for_vlm(self, entry: _Entry, device: str) -> None:
        """Seed property 6: before the VLM loads on a GPU, CLIP leaves it for the CPU."""
        gm = self.gm
        if not gm.clip_yields_to_vlm or entry.name != gm.vlm_model or gm.clip_model is None:
            return
        clip = self._entries.get(gm.clip_model)
        if clip is None or clip is entry or clip.device != device:
            return
        if clip.state is not ModelState.LOADED:
            return
        if clip.in_use:
            busy = policy.NoRoom(self._expected(entry), 0, (clip.name,), busy=(clip.name,))
            await self._wait_for_users([clip], entry, device, busy)
        await self._evict(clip, f"yields {device} to {entry.name}")

    async def _evict(self, victim: _Entry, reason: str) -> None:
        """Free ``victim``'s GPU: to the CPU when it can move there, else unload. The caller
        holds the victim's GPU lock (not its model lock: a victim only ever leaves the GPU)."""
        log.info("evicting %s from %s (%s)", victim.name, victim.device, reason)
        if victim.backend.can_move and CPU in victim.spec.allowed_devices:
            await self._move_locked(victim, CPU, "evicted")
        else:
            await self._unload_locked(victim, "evicted")

    def _no_room(self, entry: _Entry, device: str, decision: policy.NoRoom) -> InsufficientMemory:
        """The 409 of a load that does not fit: free MB (now, without preempting anything),
        needed MB, the models that could be unloaded, and the other arbiter allocations (tasks,
        ``/v1/allocations``) that hold memory there."""
        index = gpu_index(device)
        free = max(0, self._room(index) if index is not None else decision.free_bytes)
        needed_mb, free_mb = decision.needed_bytes // MIB, free // MIB
        names = list(decision.unloadable)
        hint = f"; unloading {', '.join(names)} could make room" if names else ""
        held = self._other_holders(device)
        if held:
            shown = ", ".join(
                f"{a.owner or a.id} {format_size(a.memory_bytes)} ({a.priority.value})"
                for a in held[:_HOLDERS_SHOWN]
            )
            more = f" and {len(held) - _HOLDERS_SHOWN} more" if len(held) > _HOLDERS_SHOWN else ""
            hint += f"; other allocations hold memory: {shown}{more}"
        return InsufficientMemory(
            f"not enough VRAM on {device} for {entry.name}: needs {needed_mb} MB, "
            f"{free_mb} MB free{hint}",
            model=entry.name,
            device=device,
            needed_mb=needed_mb,
            free_mb=free_mb,
            requested_bytes=decision.needed_bytes,
            available_bytes=free,
            could_unload=names,
            held_by=[
                {
                    "id": a.id,
                    "owner": a.owner,
                    "memory_bytes": a.memory_bytes,
                    "priority": a.priority.value,
                }
                for a in held
            ],
        )

    def _other_holders(self, device: str) -> list[Allocation]:
        """Arbiter allocations that are not managed models and count against ``device``
        (naming it, or no device: they count against the whole budget), biggest first."""
        key = f"gpu:{gpu_index(device)}"
        others = [
            a
            for a in self.arbiter.state().allocations
            if a.device in (key, None) and not (a.owner or "").startswith(_MODEL_OWNER)
        ]
        return sorted(others, key=lambda a: (-a.memory_bytes, a.seq))

    def _unloadable(self, device: str, exclude: _Entry) -> tuple[str, ...]:
        return tuple(
            sorted(
                e.name
                for e in self._entries.values()
                if e is not exclude and e.device == device and e.used_bytes
            )
        )

    def _room(self, index: int, rank: int | None = None) -> int:
        """Free bytes on GPU ``index``: the smaller of telemetry and the arbiter's budget.

        With ``rank`` (the priority of a model about to load), it also counts what the arbiter
        would preempt for it: preemptible allocations of a strictly lower priority that are not
        managed models (tasks, ``/v1/allocations``; models are evicted by the manager's own
        policy instead). So a user-facing model beats a background reservation. On a real GPU
        the memory of such holders naming it shows as used in the telemetry and comes back once
        they stop (``_wait_room`` waits for it); a simulated GPU's telemetry never had it.
        """
        gpu = self.devices.snapshot().gpu(index)
        free = gpu.memory_free_bytes if gpu is not None else 0
        state = self.arbiter.state()
        key = f"gpu:{index}"
        on_device, anywhere = _reclaimable(state.allocations, key, rank)
        if gpu is not None and not gpu.simulated:
            free += on_device
        for usage in state.devices:
            if usage.device == key:
                free = min(free, usage.available_bytes + on_device)
        if state.budget_bytes:
            free = min(free, max(0, state.budget_bytes - state.allocated_bytes) + anywhere)
        return free

    def _free_now(self, index: int | None) -> int:
        if index is None:
            return 0
        gpu = self.devices.snapshot().gpu(index)
        return gpu.memory_free_bytes if gpu is not None else 0

    async def _wait_recovered(self, index: int, before: int, freed: int) -> None:
        """After an unload, poll telemetry until the freed VRAM shows as free (bounded)."""
        short = await self._wait_free(index, before + int(freed * _RECOVERED_SHARE))
        if short is not None:
            log.warning(
                "cuda:%d: %s freed but only %s more free after %.1f s; going on",
                index,
                format_size(freed),
                format_size(short.memory_free_bytes - before),
                self.gm.vram_recovery_timeout_s,
            )

    async def _wait_room(self, entry: _Entry, index: int, needed: int) -> None:
        """Before a load on a real GPU: the holders the arbiter just preempted for it (a task
        being stopped) may still hold their memory; poll until ``needed`` is free (bounded)."""
        gpu = self.devices.snapshot().gpu(index)
        if gpu is None or gpu.simulated or gpu.memory_free_bytes >= needed:
            return
        short = await self._wait_free(index, needed)
        if short is not None:
            log.warning(
                "cuda:%d: %s needs %s but only %s is free after %.1f s; loading anyway",
                index,
                entry.name,
                format_size(needed),
                format_size(short.memory_free_bytes),
                self.gm.vram_recovery_timeout_s,
            )

    async def _wait_free(self, index: int, goal: int) -> GpuSnapshot | None:
        """Poll GPU ``index`` until ``goal`` bytes are free, at most ``vram_recovery_timeout_s``.
        None when reached (or the GPU is gone); the last reading when the time ran out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.gm.vram_recovery_timeout_s
        while True:
            snap = await self.devices.refresh_async()
            gpu = snap.gpu(index)
            if gpu is None or gpu.memory_free_bytes >= goal:
                return None
            if loop.time() >= deadline:
                return gpu
            await asyncio.sleep(self.gm.vram_recovery_poll_s)

    # ------------------------------------------------------------------ accounting

    def _account(self, entry: _Entry, target: Target, result: LoadResult) -> None:
        """Book what a load or move put on a GPU (arbiter, simulated telemetry)."""
        if not target.on_gpu:
            entry.used_bytes = 0
            self._learn(entry, result.size_bytes)
            return
        measured = result.vram_bytes or 0
        self._learn(entry, measured or None)
        spec = entry.spec
        configured = spec.smaller_variant_vram if entry.variant is not None else spec.vram
        used = max(measured, configured or 0) or self._expected(entry)
        allocation = entry.allocation
        if allocation is not None and not (
            allocation.memory_bytes / _RESIZE_TOLERANCE
            <= used
            <= allocation.memory_bytes * _RESIZE_TOLERANCE
        ):
            self._resize(entry, target.device, used)
        entry.used_bytes = used
        index = gpu_index(target.device)
        if target.simulated and index is not None:
            self._adjust_sim(index, used)
            entry.sim_bytes = used

    def _learn(self, entry: _Entry, size: int | None) -> None:
        if size:
            self._learned[entry.variant or entry.name] = size

    def _resize(self, entry: _Entry, device: str, used: int) -> None:
        """Book ``used`` instead of the estimate. Smaller: give the old booking back first (the
        new one then fits). Bigger: ask first, keep the old booking if the arbiter says no."""
        old = entry.allocation
        shrink = old is not None and used < old.memory_bytes
        if shrink:
            self._release(old)
            entry.allocation = old = None
        try:
            new = self.arbiter.request_allocation(
                self._workload(entry),
                Priority(entry.spec.priority),
                used,
                device=f"gpu:{gpu_index(device)}",
                owner=f"{_MODEL_OWNER}{entry.name}",
                on_preempt=self._preempt_callback(entry.name),
                preemptible=not entry.spec.never_evict and entry.in_use == 0,
            )
        except VramancerError as exc:
            log.warning(
                "%s takes %s, more than booked; the arbiter refused more: %s",
                entry.name,
                format_size(used),
                exc.message,
            )
            return
        entry.allocation = new
        self._release(old)

    def _drop_accounting(self, entry: _Entry) -> None:
        self._release(entry.allocation)
        entry.allocation = None
        index = gpu_index(entry.device)
        if entry.sim_bytes and index is not None:
            self._adjust_sim(index, -entry.sim_bytes)
        entry.sim_bytes = 0
        entry.used_bytes = 0

    def _release(self, allocation: Allocation | None) -> None:
        if allocation is None:
            return
        with self._preempt_lock:
            self._preempted.pop(allocation.id, None)
        try:
            self.arbiter.release_allocation(allocation.id)
        except VramancerError as exc:
            log.debug("releasing allocation %s: %s", allocation.id, exc.message)

    def _adjust_sim(self, index: int, delta: int) -> None:
        try:
            self.devices.adjust_simulated(index, delta)
        except VramancerError as exc:
            log.warning(
                "cannot account %s on simulated cuda:%d: %s", format_size(delta), index, exc.message
            )

    # ------------------------------------------------------------------ preemption

    def _preempt_callback(self, name: str) -> PreemptCallback:
        def on_preempt(allocation: Allocation) -> None:
            with self._preempt_lock:
                self._preempted[allocation.id] = name
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._schedule_preemption, allocation.id)

        return on_preempt

    def _schedule_preemption(self, allocation_id: str) -> None:
        if not self._stopping:
            self._spawn(self._handle_preemption(allocation_id))

    def _take_preempted(self, allocation_id: str) -> str | None:
        with self._preempt_lock:
            return self._preempted.pop(allocation_id, None)

    async def _handle_preemption(self, allocation_id: str) -> None:
        with self._preempt_lock:
            name = self._preempted.get(allocation_id)
        if name is None:
            return
        entry = self._entries[name]
        try:
            async with self._quiesce(entry), self._locked(entry):
                if self._take_preempted(allocation_id) is None:
                    return
                await self._on_preempted(entry, allocation_id)
        except VramancerError as exc:
            log.warning("yielding %s after preemption failed: %s", name, exc.message)

    async def _settle_preemptions(self, device: str) -> None:
        """Our own booking preempted models on ``device``: free them now, under the GPU lock
        we hold, before anything loads there."""
        with self._preempt_lock:
            pending = list(self._preempted.items())
        for allocation_id, name in pending:
            entry = self._entries[name]
            if entry.device != device or entry.allocation is None:
                continue
            if entry.allocation.id != allocation_id or self._take_preempted(allocation_id) is None:
                continue
            if entry.in_use:
                busy = policy.NoRoom(0, 0, (name,), busy=(name,))
                with contextlib.suppress(InsufficientMemory):
                    await self._wait_for_users([entry], entry, device, busy)
            await self._on_preempted(entry, allocation_id)

    async def _on_preempted(self, entry: _Entry, allocation_id: str) -> None:
        if entry.allocation is None or entry.allocation.id != allocation_id:
            return
        entry.allocation = None  # already taken by the arbiter: nothing to release
        self.events.publish(
            "model_preempted", model=entry.name, device=entry.device, allocation_id=allocation_id
        )
        if entry.state is not ModelState.LOADED or not entry.on_gpu:
            return
        if entry.backend.can_move and CPU in entry.spec.allowed_devices:
            await self._move_locked(entry, CPU, "preempted")
            return
        await self._unload_locked(entry, "preempted")
        if entry.backend.reload_on_cpu and CPU in entry.spec.allowed_devices:
            await self._load_locked(entry, CPU, "preempted")

    # ------------------------------------------------------------------ idle reaper

    async def reap_once(self, now: float | None = None) -> list[str]:
        """Unload every model idle for its timeout (its own, else the default; property 8).
        A model in use, being drained, or never-evict is left alone. Returns the names."""
        now = self.clock.monotonic() if now is None else now
        reaped: list[str] = []
        for entry in list(self._entries.values()):
            if entry.lock.locked():  # busy with another operation: next tick
                continue
            idle_s = self._idle_s(entry, now)
            timeout = self._idle_timeout(entry)
            if idle_s is None or idle_s < timeout or entry.spec.never_evict:
                continue
            if await self._reap(entry, now, timeout):
                reaped.append(entry.name)
                self.events.publish(
                    "idle_unload", model=entry.name, idle_s=round(idle_s, 3), idle_timeout_s=timeout
                )
        return reaped

    def _idle_s(self, entry: _Entry, now: float) -> float | None:
        if entry.state is not ModelState.LOADED or entry.in_use or entry.draining:
            return None
        since = entry.last_used if entry.last_used is not None else entry.loaded_at
        return None if since is None else now - since

    async def _reap(self, entry: _Entry, now: float, timeout: float) -> bool:
        try:
            async with self._locked(entry):
                idle_s = self._idle_s(entry, now)  # re-read: it may have been used meanwhile
                if idle_s is None or idle_s < timeout:
                    return False
                await self._unload_locked(entry, "idle")
                return True
        except VramancerError as exc:
            log.warning("idle unload of %s failed: %s", entry.name, exc.message)
            return False

    # ------------------------------------------------------------------ degraded mode

    async def probe_backends(self, now: float | None = None, *, force: bool = False) -> bool:
        """Check the backends' servers (Ollama: ``/api/version``, ``/api/ps``) every
        ``retry_interval_s``: sets or clears degraded mode and syncs states with what they
        really have loaded. False while one is unreachable."""
        now = self.clock.monotonic() if now is None else now
        ok = True
        for service in self._services:
            ok = await self._probe_one(service, now, force) and ok
        return ok

    async def _probe_one(self, service: BackendService, now: float, force: bool) -> bool:
        last = self._last_probe.get(service.name)
        if not force and last is not None and now - last < service.retry_interval_s:
            return service.name not in self._degraded
        self._last_probe[service.name] = now
        try:
            running = await service.probe()
        except VramancerError as exc:
            self._set_degraded(service.name, exc.message)
            return False
        self._clear_degraded(service.name)
        await self._sync(service, running)
        await self._estimate_unknown_sizes(service)
        return True

    async def _estimate_unknown_sizes(self, service: BackendService) -> None:
        """Models without a configured ``vram``: estimate it once (Ollama: ``/api/show`` and
        the resources estimator) so bookings and eviction plans are right from the first
        load; a measured size replaces it after the load."""
        for entry in self._entries.values():
            backend = entry.backend
            name = entry.name
            if backend.service is not service or entry.spec.vram is not None:
                continue
            if name in self._learned or name in self._estimated:
                continue
            try:
                estimate = await backend.estimate_vram()
            except VramancerError as exc:
                log.info("no size estimate for %s: %s", name, exc.message)
                estimate = None
            self._estimated[name] = estimate

    def _set_degraded(self, backend: str, reason: str) -> None:
        if self._degraded.get(backend) == reason:
            return
        first = backend not in self._degraded
        self._degraded[backend] = reason
        self._m_degraded.labels(backend=backend).set(1)
        if first:
            retry_s = next(
                (s.retry_interval_s for s in self._services if s.name == backend),
                self.settings.ollama.retry_interval_s,
            )
            log.warning(
                "%s unavailable, degraded mode: %s (retry every %g s)", backend, reason, retry_s
            )
            self.events.publish("degraded_mode", backend=backend, degraded=True, reason=reason)

    def _clear_degraded(self, backend: str) -> None:
        if self._degraded.pop(backend, None) is None:
            return
        self._m_degraded.labels(backend=backend).set(0)
        log.info("%s is reachable again; leaving degraded mode", backend)
        for entry in self._entries.values():  # "unreachable" no longer explains anything
            if entry.kind.value == backend and entry.state is ModelState.UNLOADED:
                entry.error = None
        self.events.publish("degraded_mode", backend=backend, degraded=False, reason=None)

    def _note_backend_ok(self, entry: _Entry) -> None:
        """A load or unload went through: the model's server is reachable."""
        service = entry.backend.service
        if service is not None:
            self._clear_degraded(service.name)

    async def _sync(self, service: BackendService, running: list[RunningModel]) -> None:
        """Adopt models the server has loaded that we think are not, forget ones it dropped,
        and count a changed ``expires_at`` as activity (a client called the server directly:
        each request resets the model's expiry)."""
        for entry in self._entries.values():
            backend = entry.backend
            if backend.service is not service or entry.lock.locked() or entry.draining:
                continue
            seen = backend.find_running(running)
            expires = seen.expires_at if seen is not None else None
            previous = self._expires.get(entry.name)
            self._expires[entry.name] = expires
            async with self._locked(entry):
                if entry.state in (ModelState.LOADED, ModelState.ERROR) and seen is None:
                    self._forget(entry)
                elif entry.state is ModelState.UNLOADED and seen is not None:
                    self._adopt(entry, seen)
                elif seen is not None and previous is not None and expires != previous:
                    self._touch(entry)

    def _forget(self, entry: _Entry) -> None:
        device = entry.device
        self._drop_accounting(entry)
        entry.variant = None
        entry.error = None
        self._set_state(entry, ModelState.UNLOADED, device=None, target=None)
        self._m_unloads.labels(model=entry.name, backend=entry.kind.value, reason="external").inc()
        self.events.publish(
            "model_unloaded",
            model=entry.name,
            backend=entry.kind.value,
            device=device,
            reason="external",
            freed_bytes=0,
        )

    def _adopt(self, entry: _Entry, seen: RunningModel) -> None:
        gpus = [g.index for g in self.devices.snapshot().gpus]
        view = self._view(entry, self.clock.monotonic())
        index = policy.gpu_candidates(view, gpus)[:1]
        device = gpu_device(index[0]) if seen.size_vram_bytes > 0 and index else CPU
        target = self._target(device)
        if target.on_gpu and not self._book(entry, device, seen.size_vram_bytes or seen.size_bytes):
            log.warning(
                "%s is loaded in %s but the arbiter has no room for it",
                entry.name,
                entry.kind.value,
            )
        self._account(entry, target, LoadResult(seen.size_vram_bytes, seen.size_bytes))
        entry.loaded_at = self.clock.monotonic()
        self._touch(entry)
        self._set_state(entry, ModelState.LOADED, device=device, target=target)
        self.events.publish(
            "model_loaded",
            model=entry.name,
            backend=entry.kind.value,
            device=device,
            runs_on=target.runs_on,
            simulated=target.simulated,
            duration_s=0.0,
            vram_bytes=entry.used_bytes,
            reason="adopted",
        )

    # ------------------------------------------------------------------ profiles

    def plan_profile(self, name: str) -> ProfilePlan:
        """The steps a switch to ``name`` would take now (a dry run)."""
        placements = self._profiles.get(name)
        if placements is None:
            raise NotFound(
                f"no profile {name!r} (profiles: {', '.join(sorted(self._profiles))})",
                profile=name,
            )
        now = self.clock.monotonic()
        views = {e.name: self._view(e, now) for e in self._entries.values()}
        gpus = self.devices.snapshot().gpus
        free = {g.index: self._room(g.index) for g in gpus}
        return policy.plan_profile(name, placements, views, free)

    async def switch_profile(
        self, name: str, progress: Callable[[StepResult], None] | None = None
    ) -> SwitchReport:
        """Reconcile to profile ``name``: VRAM is freed first, then models load. On a failed
        step the rest is not run, the profile in force stays the previous one, and every model's
        state is what its backend really holds. ``progress`` is called after each step."""
        async with self._switch_lock:
            plan = self.plan_profile(name)
            previous = self._profile
            started = time.perf_counter()
            results: list[StepResult] = []
            failed: int | None = None
            with tracing.span("models.switch_profile", profile=name):
                for i, step in enumerate(plan.steps):
                    result = await self._run_step(step)
                    results.append(result)
                    if progress is not None:
                        progress(result)
                    if result.status is StepStatus.FAILED:
                        failed = i
                        break
            results += [StepResult(s, StepStatus.PENDING) for s in plan.steps[len(results) :]]
            report = SwitchReport(
                profile=name,
                previous=previous,
                ok=failed is None,
                steps=tuple(results),
                duration_s=time.perf_counter() - started,
                failed_step=failed,
                notes=plan.notes,
            )
            self._last_switch = report
            if failed is None:
                self._set_profile(name, report)
            else:
                self.events.publish(
                    "profile_switch_failed",
                    profile=name,
                    previous=previous,
                    failed_step=failed,
                    step=plan.steps[failed].describe(),
                    error=results[failed].error,
                )
            return report

    async def set_profile(self, name: str) -> SwitchReport:
        """``switch_profile`` that raises ``ProfileSwitchFailed`` (409) when a step fails."""
        report = await self.switch_profile(name)
        if not report.ok:
            step = report.steps[report.failed_step or 0]
            error = ProfileSwitchFailed(
                f"switch to profile {name!r} stopped at step {report.failed_step} "
                f"({step.step.describe()}): {step.error}",
                profile=name,
                previous=report.previous,
                failed_step=report.failed_step,
                steps=[s.as_dict() for s in report.steps],
            )
            if step.error_code == BackendUnavailable.code:
                error.http_status = BackendUnavailable.http_status  # a backend is down: 503
            raise error
        return report

    def _set_profile(self, name: str, report: SwitchReport) -> None:
        previous, self._profile = self._profile, name
        for mode in self._profiles:
            self._m_mode.labels(mode=mode).set(1 if mode == name else 0)
        self.events.publish(
            "mode_changed",
            previous=previous,
            mode=name,
            duration_s=round(report.duration_s, 6),
            steps=[s.step.describe() for s in report.steps],
        )

    async def _run_step(self, step: PlanStep) -> StepResult:
        entry = self._entries[step.model]
        started = time.perf_counter()
        try:
            async with self._quiesce(entry):
                if step.action is StepAction.UNLOAD:
                    async with self._locked(entry):
                        await self._unload_locked(entry, "profile")
                else:
                    assert step.device is not None
                    async with self._locked(entry, step.device):
                        await self._place_locked(entry, step.device, "profile")
        except VramancerError as exc:
            elapsed = time.perf_counter() - started
            return StepResult(step, StepStatus.FAILED, elapsed, exc.message, exc.code)
        return StepResult(step, StepStatus.DONE, time.perf_counter() - started)

    # ------------------------------------------------------------------ optimize

    async def optimize(self) -> list[ModelAction]:
        """Seed 001 ``optimize_resources`` for models: unload idle models, then on GPUs above
        ``pressure_ratio`` switch to smaller variants and unload the least recently used.
        Returns one record per step taken (unloaded, switched, or failed with the reason)."""
        now = self.clock.monotonic()
        views = [self._view(e, now) for e in self._entries.values()]
        usage = {
            g.index: policy.GpuUsage(g.memory_used_bytes, g.memory_total_bytes)
            for g in self.devices.snapshot().gpus
        }
        actions = policy.plan_optimize(
            views,
            usage,
            idle_after_s=self.gm.optimize_idle_s,
            pressure_ratio=self.gm.pressure_ratio,
        )
        done: list[ModelAction] = []
        for action in actions:
            message = await self._optimize_one(action)
            if message:
                done.append(message)
        return done

    async def _optimize_one(self, action: policy.OptimizeAction) -> ModelAction | None:
        entry = self._entries[action.model]
        try:
            async with self._locked(entry):
                if entry.state is not ModelState.LOADED or entry.in_use or entry.draining:
                    return None
                device = entry.device or CPU
                if action.kind is policy.OptimizeKind.SMALLER_VARIANT:
                    return await self._to_variant(entry, device)
                await self._unload_locked(entry, "optimize")
        except VramancerError as exc:
            message = f"could not optimize {entry.name}: {exc.message}"
            return ModelAction(ModelActionKind.FAILED, entry.name, message)
        why = "idle" if action.kind is policy.OptimizeKind.UNLOAD_IDLE else "least recently used"
        message = f"unloaded {entry.name} from {device} ({why}, {format_size(action.freed_bytes)})"
        return ModelAction(ModelActionKind.UNLOADED, entry.name, message)

    async def _to_variant(self, entry: _Entry, device: str) -> ModelAction:
        variant = entry.spec.smaller_variant
        assert variant is not None
        before = entry.used_bytes
        await self._unload_locked(entry, "optimize")
        entry.variant = variant
        try:
            await self._load_locked(entry, device, "smaller variant")
        except VramancerError as exc:
            entry.variant = None
            with contextlib.suppress(VramancerError):
                await self._load_locked(entry, device, "variant failed; back to the original")
            message = f"could not switch {entry.name} to {variant}: {exc.message}"
            return ModelAction(ModelActionKind.FAILED, entry.name, message)
        message = (
            f"switched {entry.name} to smaller variant {variant} on {device} "
            f"({format_size(before)} -> {format_size(entry.used_bytes)})"
        )
        return ModelAction(ModelActionKind.SWITCHED, entry.name, message)

    # ------------------------------------------------------------------ small helpers

    def _set_state(self, entry: _Entry, state: ModelState, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(entry, key, value)
        entry.state = state
        self._export_state(entry)
        self._bump()

    def _export_state(self, entry: _Entry) -> None:
        for state in ModelState:
            self._m_state.labels(model=entry.name, backend=entry.kind.value, state=state.value).set(
                1 if state is entry.state else 0
            )
        self._m_vram.labels(model=entry.name, backend=entry.kind.value).set(entry.used_bytes)

    def _expected(self, entry: _Entry) -> int:
        spec = entry.spec
        if entry.variant is not None:
            known = spec.smaller_variant_vram or self._learned.get(entry.variant)
            return known or max(1, self._expected_full(entry) // 2)
        return self._expected_full(entry)

    def _expected_full(self, entry: _Entry) -> int:
        """Configured, else measured at the last load, else estimated, else the default."""
        name = entry.name
        known = entry.spec.vram or self._learned.get(name) or self._estimated.get(name)
        return known or self.gm.default_vram

    def _workload(self, entry: _Entry) -> WorkloadType:
        if entry.spec.workload_type is not None:
            return WorkloadType(entry.spec.workload_type)
        return _DEFAULT_WORKLOAD[entry.kind]

    def _idle_timeout(self, entry: _Entry) -> float:
        return entry.spec.idle_timeout_s or self.gm.idle_timeout_s

    def _load_timeout(self, entry: _Entry) -> float:
        return entry.spec.load_timeout_s or self.gm.load_timeout_s

    def _unload_timeout(self, entry: _Entry) -> float:
        return entry.spec.unload_timeout_s or self.gm.unload_timeout_s

    def _retries(self, entry: _Entry) -> int:
        spec = entry.spec
        return (
            spec.max_load_retries if spec.max_load_retries is not None else self.gm.max_load_retries
        )

    def _op_wait_s(self, entry: _Entry) -> float:
        attempts = 1 + self._retries(entry)
        per_try = self._load_timeout(entry) + self.gm.retry_backoff_s
        return attempts * per_try + self.gm.queue_max_wait_s

    def _view(self, entry: _Entry, now: float) -> policy.ModelView:
        since = entry.last_used if entry.last_used is not None else entry.loaded_at
        expected = self._expected(entry)
        return policy.ModelView(
            name=entry.name,
            backend=entry.kind.value,
            state=entry.state,
            device=entry.device if entry.state is not ModelState.UNLOADED else None,
            vram_bytes=entry.used_bytes or expected,
            priority_rank=entry.rank,
            can_move=entry.backend.can_move,
            allowed=tuple(entry.spec.allowed_devices),
            pinned=entry.spec.pinned_device,
            in_use=entry.in_use > 0 or entry.draining > 0,
            never_evict=entry.spec.never_evict,
            idle_s=0.0 if since is None else max(0.0, now - since),
            reload_cost_s=self.bandwidth.cost_s(entry.kind.value, expected),
            smaller_variant=entry.spec.smaller_variant,
            smaller_vram_bytes=entry.spec.smaller_variant_vram,
            variant_active=entry.variant is not None,
        )

    def _views_on(self, device: str, exclude: _Entry) -> Iterable[policy.ModelView]:
        now = self.clock.monotonic()
        return [
            self._view(e, now)
            for e in self._entries.values()
            if e is not exclude and e.device == device and e.state is ModelState.LOADED
        ]


def _services(backends: Iterable[ModelBackend]) -> tuple[BackendService, ...]:
    """The distinct servers behind ``backends`` (Ollama's client, shared by its models)."""
    seen: dict[int, BackendService] = {}
    for backend in backends:
        service = backend.service
        if service is not None:
            seen.setdefault(id(service), service)
    return tuple(seen.values())
