"""``ModelManager``: the lifecycle of managed models (which model sits on which GPU, when).

This module is the facade: it builds the collaborators below, owns start/stop and the
background loop, and answers the public queries and operations by delegating.

Each model of ``[[models]]`` has a backend (Ollama, torch module, model-server process) and a
state (``UNLOADED -> LOADING -> LOADED -> UNLOADING``, ``ERROR``). The manager:

* serialises VRAM-changing work: one lock per model and one per GPU; every load, unload or move
  touching a GPU holds that GPU's lock, so two loads never race for VRAM;
* loads through the arbiter (an allocation with the model's VRAM and priority; ``on_preempt``
  moves the model to the CPU or unloads it), evicting idle, low-priority, cheap-to-reload models
  first when a GPU is full (:func:`policy.choose_evictions`), and after an unload waits until
  the GPU's free VRAM has really come back (bounded poll of the device telemetry);
* queues requests for models that are not loaded per GPU and serves them grouped by model with
  a maximum wait (:func:`policy.next_group`);
* times out and retries loads and unloads (``max_load_retries``), then marks the model ERROR
  and publishes ``model_error``;
* unloads models idle for their timeout (``reap_once``), never one in use;
* switches profiles (execution modes: which model goes where) with a pure plan that frees
  VRAM first;
* tracks Ollama's reachability: unreachable -> degraded mode with a reason, probed again every
  ``[ollama] retry_interval_s``; the other models keep working.

Collaborators (one rule each): ``table.ModelTable`` (the records, state changes, sizes,
views), ``locks.Locks`` (lock order, draining), ``placement.Placer`` (where a load goes),
``room.GpuRoom`` (room on a GPU, waits for freed memory), ``booking.Booking`` (the arbiter
allocations), ``lifecycle.Lifecycle`` (load / unload / move with retries, timeouts and
evictions), ``holds.Holds`` (holding for users, per-GPU load queues), ``preemption`` (freeing a
preempted GPU), ``reaper.IdleReaper``, ``health.BackendHealth`` (degraded mode, sync with
Ollama), ``profiles.Profiles`` and ``optimize.Optimizer``.

Models on simulated GPUs are accounted (arbiter, telemetry via ``adjust_simulated``) but their
tensors stay on the CPU; their status says ``runs_on: cpu``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from vramancer.clock import Clock
from vramancer.events import EventBus
from vramancer.models import policy
from vramancer.models.backends.base import BackendService, ModelBackend, Target
from vramancer.models.backends.ollama import OllamaClient, OllamaModel
from vramancer.models.backends.process import ProcessModel
from vramancer.models.backends.torch_module import TorchModel
from vramancer.models.booking import Booking
from vramancer.models.entry import ModelEntry, ModelHandle
from vramancer.models.health import BackendHealth
from vramancer.models.holds import Holds
from vramancer.models.lifecycle import Lifecycle
from vramancer.models.locks import Locks
from vramancer.models.metrics import ModelMetrics
from vramancer.models.optimize import Optimizer
from vramancer.models.placement import Placer
from vramancer.models.ports import ArbiterPort, DevicePort
from vramancer.models.preemption import PreemptionInbox, Preemptions
from vramancer.models.profiles import Profiles
from vramancer.models.reaper import IdleReaper
from vramancer.models.registry import all_profiles
from vramancer.models.room import GpuRoom
from vramancer.models.settings import ModelSpec
from vramancer.models.table import ModelTable
from vramancer.models.types import (
    CPU,
    GpuResourceStatus,
    ModelState,
    ModelStatus,
    ProfilePlan,
    StepResult,
    SwitchReport,
    gpu_index,
)
from vramancer.observability.metrics import Metrics
from vramancer.resources.actions import ModelAction

if TYPE_CHECKING:
    from vramancer.config import Settings

log = logging.getLogger(__name__)

__all__ = ["BackendFactory", "ModelHandle", "ModelManager"]

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
        self.specs = {spec.name: spec for spec in settings.models}
        self.gm = gm = settings.gpu_manager
        self.devices = devices
        self.arbiter = arbiter
        self.events = events
        self.clock = clock
        self._ollama: OllamaClient | None = None
        make_backend = backend_factory or self._default_backend
        self._entries: dict[str, ModelEntry] = {
            spec.name: ModelEntry(spec=spec, backend=make_backend(spec)) for spec in settings.models
        }
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._services = _services(e.backend for e in self._entries.values())

        table = self._table = ModelTable(
            self._entries, gm, clock=clock, metrics=ModelMetrics(metrics)
        )
        self.bandwidth: policy.LoadBandwidth = table.bandwidth
        for entry in self._entries.values():
            table.metrics.export_state(entry)
        self._locks = locks = Locks(table)
        self._inbox = inbox = PreemptionInbox()
        room = GpuRoom(gm, devices=devices, arbiter=arbiter, clock=clock)
        self._booking = booking = Booking(table, arbiter=arbiter, devices=devices, inbox=inbox)
        self._health = health = BackendHealth(
            table,
            self._services,
            devices=devices,
            room=room,
            booking=booking,
            locks=locks,
            events=events,
            clock=clock,
            default_retry_s=settings.ollama.retry_interval_s,
        )
        self._lifecycle = lifecycle = Lifecycle(
            table, locks=locks, booking=booking, room=room, health=health, events=events
        )
        self._preemptions = Preemptions(
            table, inbox=inbox, locks=locks, lifecycle=lifecycle, events=events, spawn=self._spawn
        )
        lifecycle.settle_preemptions = self._preemptions.settle
        self._profiles = Profiles(
            table,
            all_profiles(settings),
            devices=devices,
            room=room,
            locks=locks,
            lifecycle=lifecycle,
            events=events,
        )
        self._placer = Placer(
            table, devices=devices, room=room, placement_of=self._profiles.placement
        )
        self._holds = Holds(table, placer=self._placer, lifecycle=lifecycle, booking=booking)
        self._reaper = IdleReaper(table, locks=locks, lifecycle=lifecycle, events=events)
        self._optimizer = Optimizer(table, devices=devices, locks=locks, lifecycle=lifecycle)

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

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, initial_profile: bool = True) -> None:
        """Probe the backends' servers (degraded mode if down), adopt what they already have
        loaded, start the idle reaper / prober loop and apply ``initial_profile`` in the
        background (``initial_profile=False``: not; an HA standby loads no model)."""
        self._inbox.loop = asyncio.get_running_loop()
        self._table.stopping = False
        await self.probe_backends(force=True)
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="vramancer-models")
        if initial_profile and self.gm.initial_profile is not None:
            self._spawn(self._initial_profile(self.gm.initial_profile))

    async def _initial_profile(self, name: str) -> None:
        report = await self.switch_profile(name)
        if not report.ok:
            log.warning(
                "initial profile %s did not apply fully: step %s failed", name, report.failed_step
            )

    async def stop(self) -> None:
        """Stop the loop, fail queued requests, unload (``unload_on_stop``) and close."""
        self._table.stopping = True
        runner, self._runner = self._runner, None
        drainers = self._holds.drainers.values()
        tasks = [t for t in (runner, *self._tasks, *drainers) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            # Shutting down: a task's own failure was logged (or is moot) by now.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._holds.fail_waiting()
        for entry in self._entries.values():
            await self._stop_entry(entry)
        for service in self._services:
            await service.aclose()

    async def _stop_entry(self, entry: ModelEntry) -> None:
        """Unload ``entry`` unless a server holds it and ``unload_on_stop`` is off (it stays
        loaded there for the next start to adopt), then close its backend."""
        if entry.state is not ModelState.UNLOADED and (
            self.gm.unload_on_stop or entry.backend.service is None
        ):
            try:
                async with self._locks.locked(entry):
                    await self._lifecycle.unload_locked(entry, "shutdown", retries=0)
            except Exception as exc:  # shutdown goes on for the other models
                log.warning("unloading %s at shutdown failed: %s", entry.name, exc)
        self._booking.drop(entry)
        with contextlib.suppress(Exception):  # shutdown goes on whatever a backend raises
            await entry.backend.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.gm.tick_s)
            try:
                await self.reap_once()
                await self.probe_backends()
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop outlives one bad tick; the next one tries again
                log.exception("model manager tick failed")

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ queries

    def names(self) -> list[str]:
        return list(self._entries)

    def status(self, name: str) -> ModelStatus:
        entry = self._table.get(name)
        spec = entry.spec
        target = entry.target
        limits = self._table.limits
        return ModelStatus(
            name=entry.name,
            backend=entry.kind,
            state=entry.state,
            device=entry.device,
            runs_on=target.runs_on if target is not None and entry.device is not None else None,
            simulated=bool(target is not None and target.simulated and entry.device is not None),
            vram_bytes=self._table.expected(entry),
            used_vram_bytes=entry.used_bytes,
            priority=spec.priority,
            workload_type=limits.workload(entry).value,
            last_used=entry.last_used_wall,
            in_use=entry.in_use,
            idle_timeout_s=limits.idle_timeout(entry),
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
        return self._table.get(name).state

    def is_loaded(self, name: str) -> bool:
        return self._table.get(name).state is ModelState.LOADED

    def device(self, name: str) -> str:
        """``cpu`` or ``gpu:N``, never ``cuda:N``; ``cpu`` when the model is not on a GPU."""
        entry = self._table.get(name)
        if entry.state is ModelState.LOADED and entry.device is not None:
            return entry.device
        return CPU

    def room(self, device: str) -> int:
        """Free bytes on GPU ``device`` (``gpu:N``) for a load now: the telemetry's free
        memory bounded by the arbiter's headroom (0 for the CPU or an unknown device)."""
        index = gpu_index(device)
        return max(0, self._lifecycle.room.room(index)) if index is not None else 0

    def handle(self, name: str) -> Any:
        """The live torch object of a loaded torch model (None otherwise)."""
        return self._table.get(name).backend.handle()

    @property
    def profile(self) -> str:
        """The profile (execution mode) in force."""
        return self._profiles.current

    def profiles(self) -> dict[str, dict[str, str]]:
        return self._profiles.as_strings()

    @property
    def last_switch(self) -> SwitchReport | None:
        return self._profiles.last_switch

    def adopt_profile(self, name: str, last_switch: SwitchReport | None) -> None:
        """Record ``name`` as the profile in force, and ``last_switch``, without running any
        step: an HA standby keeps the primary's plan and loads no model (see docs/ha.md)."""
        self._profiles.current = name
        self._profiles.last_switch = last_switch

    @property
    def degraded(self) -> bool:
        return self._health.degraded

    @property
    def degraded_reason(self) -> str | None:
        return self._health.degraded_reason

    def gpu_status(self) -> GpuResourceStatus:
        """The ``GET /v1/gpu/status`` answer: every field always has a valid value, also with no
        GPU or no VLM configured. The VRAM is the VLM's GPU while it is on one, else the first GPU
        (the devices' own ``get_vram_info``)."""
        vlm = self._entries.get(self.gm.vlm_model or "")
        snap = self.devices.snapshot()
        index = gpu_index(vlm.device) if vlm is not None and vlm.on_gpu else None
        gpu = snap.gpu(index) if index is not None else None
        if gpu is None:
            index = None
            gpu = snap.gpus[0] if snap.gpus else None
        vram = self.devices.get_vram_info(index)
        timeout = (
            self._table.limits.idle_timeout(vlm) if vlm is not None else self.gm.idle_timeout_s
        )
        return GpuResourceStatus(
            execution_mode=self.profile,
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
        (never while it is still loading). Queued behind other loads of the same GPU."""
        entry = self._table.get(name)
        await self._holds.obtain(entry, device)
        self._table.touch(entry)  # a caller about to use the model: activity (last request)
        self._holds.release(entry)
        return self.status(name)  # no await since the hold: it is loaded right now

    async def ensure_unloaded(self, name: str) -> ModelStatus:
        """Unload ``name`` once its users are done; returns only when unloaded."""
        entry = self._table.get(name)
        async with self._locks.quiesce(entry), self._locks.locked(entry):
            await self._lifecycle.unload_locked(entry, "request")
        return self.status(name)

    async def migrate(self, name: str, device: str) -> ModelStatus:
        """Put ``name`` on ``device`` (``cpu``, ``gpu`` / ``cuda``, ``gpu:N`` / ``cuda:N``): torch
        models move in place, others are unloaded and loaded there; an unloaded model is loaded
        there."""
        entry = self._table.get(name)
        wanted = self._placer.validate_device(entry, device)
        target = self._placer.choose_target(entry, wanted)
        await self._lifecycle.place(entry, target, "migrate")
        return self.status(name)

    @contextlib.asynccontextmanager
    async def use(self, name: str, device: str | None = None) -> AsyncIterator[ModelHandle]:
        """Hold ``name`` loaded while the block runs: loads it on demand, records
        the activity, and keeps the idle reaper and evictions away until the block exits."""
        entry = self._table.get(name)
        await self._holds.obtain(entry, device)
        try:
            self._table.touch(entry)
            yield self._handle(entry)
        finally:
            self._table.touch(entry)
            self._holds.release(entry)

    def try_hold(self, name: str) -> bool:
        """Hold ``name`` now if it is loaded and takes users (no await: the caller decided on
        what it just read); False otherwise. Release with ``held()`` or ``release_hold()``."""
        entry = self._table.get(name)
        if self._table.stopping or not self._holds.holdable(entry):
            return False
        self._holds.take(entry)
        self._table.touch(entry)
        return True

    def release_hold(self, name: str) -> None:
        """Give back a hold taken by ``try_hold``."""
        entry = self._table.get(name)
        self._table.touch(entry)
        self._holds.release(entry)

    @contextlib.asynccontextmanager
    async def held(self, name: str) -> AsyncIterator[ModelHandle]:
        """``use()`` for a hold ``try_hold`` already took: released when the block exits."""
        try:
            yield self._handle(self._table.get(name))
        finally:
            self.release_hold(name)

    def _handle(self, entry: ModelEntry) -> ModelHandle:
        target = entry.target or Target.cpu()
        backend = entry.backend
        info = backend.request_info()
        return ModelHandle(
            name=entry.name,
            device=entry.device or CPU,
            runs_on=target.runs_on,
            simulated=target.simulated,
            obj=backend.handle(),
            endpoint=info.endpoint,
            backend_model=info.model,
            keep_alive=info.keep_alive,
        )

    def touch(self, name: str) -> None:
        """Record activity on ``name`` (a request served outside ``use``)."""
        self._table.touch(self._table.get(name))

    async def reap_once(self, now: float | None = None) -> list[str]:
        """Unload every model idle for its timeout (its own, else the default).
        A model in use, being drained, or never-evict is left alone. Returns the names."""
        return await self._reaper.reap_once(now)

    async def probe_backends(self, now: float | None = None, *, force: bool = False) -> bool:
        """Check the backends' servers (Ollama: ``/api/version``, ``/api/ps``) every
        ``retry_interval_s``: sets or clears degraded mode and syncs states with what they
        really have loaded."""
        return await self._health.probe(now, force=force)

    def plan_profile(self, name: str) -> ProfilePlan:
        """The steps a switch to ``name`` would take now (a dry run)."""
        return self._profiles.plan(name)

    async def switch_profile(
        self,
        name: str,
        progress: Callable[[StepResult], None] | None = None,
        *,
        strict: bool = False,
    ) -> SwitchReport:
        """Reconcile to profile ``name``: VRAM is freed first, then models load. On a failed
        step the rest is not run, the profile in force stays the previous one, and every model's
        state is what its backend really holds. ``progress`` is called after each step. With
        ``strict`` a failed step raises ``ProfileSwitchFailed`` (409; 503 when a backend is
        down) instead of returning a report whose ``ok`` is false."""
        return await self._profiles.switch(name, progress, strict=strict)

    async def optimize(self) -> list[ModelAction]:
        """The models' part of ``POST /v1/system/optimize``: unload idle models, then on GPUs above
        ``pressure_ratio`` switch to smaller variants and unload the least recently used.
        Returns one record per step taken (unloaded, switched, or failed with the reason)."""
        return await self._optimizer.optimize()


def _services(backends: Iterable[ModelBackend]) -> tuple[BackendService, ...]:
    """The distinct servers behind ``backends`` (Ollama's client, shared by its models)."""
    seen: dict[int, BackendService] = {}
    for backend in backends:
        service = backend.service
        if service is not None:
            seen.setdefault(id(service), service)
    return tuple(seen.values())
