"""``Gateway``: per-model request queues and the executor of :func:`scheduler.plan`.

A caller asks for a lease on a model (``async with gateway.lease(name) as handle``). The
request waits in its model's queue until the plan admits it; admission takes a hold on the
model in the model manager at once (``try_hold``: a held model is never unloaded or evicted)
and the hold lasts until the lease ends: for a streamed answer, when the last chunk went out
or the client went away.

After every change (a request arrives or ends, a load finishes) and on a short tick, the
executor reads the models' states, asks the plan what to do, and applies it: admits requests,
evicts then loads through the model manager (one load per GPU at a time), refuses requests
of a model that cannot fit (507) and requests that waited ``timeout_s`` (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from vramancer.arbiter.types import Priority
from vramancer.clock import Clock
from vramancer.errors import InsufficientMemory, NotFound, VramancerError
from vramancer.gateway import scheduler
from vramancer.gateway.metrics import GatewayMetrics
from vramancer.gateway.settings import GatewaySettings
from vramancer.models.entry import ModelHandle
from vramancer.models.manager import ModelManager
from vramancer.models.types import CPU, ModelState, ModelStatus, gpu_device, gpu_index
from vramancer.observability.metrics import Metrics
from vramancer.units import format_size

log = logging.getLogger(__name__)

#: Longest pause of the executor between two plans when nothing happens.
MAX_TICK_S = 0.25
#: After a load found no room (memory held outside the gateway), wait this long to retry.
NO_ROOM_RETRY_S = 1.0


class UnknownModel(NotFound):
    code = "model_not_found"


class QueueFull(VramancerError):
    """Too many requests wait for this model: try again after ``retry_after_s``."""

    code = "queue_full"
    http_status = 429


class QueueTimeout(VramancerError):
    """The request waited ``timeout_s`` for its model: try again after ``retry_after_s``."""

    code = "queue_timeout"
    http_status = 503


class ModelTooLarge(VramancerError):
    """The model cannot fit on any GPU it may use, whatever is unloaded: ``needed_bytes``,
    ``free_bytes``, ``unloadable`` (the models that could be unloaded by hand)."""

    code = "model_too_large"
    http_status = 507


@dataclass(frozen=True, slots=True)
class ModelQueue:
    """One managed model's requests at the gateway now (``GET /v1/gateway``)."""

    model: str
    queued: int
    in_flight: int
    #: How long the oldest queued request has waited (None: none waits).
    oldest_wait_s: float | None


@dataclass
class _Waiter:
    id: int
    model: str
    since: float
    future: asyncio.Future[None]


@dataclass
class _State:
    """What the executor is doing now (the plan's ``busy`` and ``loading``)."""

    in_flight: dict[str, int] = field(default_factory=dict)
    loading: dict[str, str] = field(default_factory=dict)  # device -> model
    busy: set[str] = field(default_factory=set)
    #: Models whose load found no room (others hold the GPU): not tried again before then.
    cooldown: dict[str, float] = field(default_factory=dict)


class Gateway:
    """See the module docstring. ``start()`` runs the executor loop; ``step()`` runs one plan
    (tests call it with a manual clock)."""

    def __init__(
        self,
        settings: GatewaySettings,
        models: ModelManager,
        *,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.models = models
        self.clock = clock
        self.metrics = GatewayMetrics(metrics)
        self._ids = itertools.count(1)
        self._waiting: dict[int, _Waiter] = {}
        self._state = _State()
        self._wake = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ running

    async def start(self) -> None:
        if self._runner is None:
            self._runner = asyncio.create_task(self._run(), name="vramancer-gateway")

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        for task in [t for t in (runner, *self._jobs) if t is not None]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for waiter in self._waiting.values():
            if not waiter.future.done():
                waiter.future.set_exception(QueueTimeout("the gateway is stopping"))
        self._waiting.clear()

    async def _run(self) -> None:
        tick = min(MAX_TICK_S, self.settings.max_wait_s / 4)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(tick):  # unlike wait_for, never loses a cancel
                    await self._wake.wait()
            self._wake.clear()
            try:
                self.step()
            except Exception:  # the loop outlives one bad plan; the next one tries again
                log.exception("gateway step failed")

    def _kick(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ requests

    def known(self, name: str) -> bool:
        return name in self.models.specs

    def waiting(self, model: str | None = None) -> int:
        return sum(1 for w in self._waiting.values() if model is None or w.model == model)

    def in_flight(self, model: str) -> int:
        return self._state.in_flight.get(model, 0)

    def queues(self) -> list[ModelQueue]:
        """Every managed model's queued and in-flight requests, in the configuration's order."""
        now = self.clock.monotonic()
        oldest: dict[str, float] = {}
        for w in self._waiting.values():
            oldest[w.model] = min(oldest.get(w.model, w.since), w.since)
        return [
            ModelQueue(
                model=name,
                queued=self.waiting(name),
                in_flight=self.in_flight(name),
                oldest_wait_s=round(now - oldest[name], 3) if name in oldest else None,
            )
            for name in self.models.specs
        ]

    @contextlib.asynccontextmanager
    async def lease(self, name: str) -> AsyncIterator[ModelHandle]:
        """Wait for ``name`` to be admitted, then hold it resident while the block runs."""
        if not self.known(name):
            raise UnknownModel(f"model {name!r} is not managed by VRAMancer", model=name)
        started = self.clock.monotonic()
        await self._admitted(name)
        self.metrics.queue.observe(max(0.0, self.clock.monotonic() - started))
        try:
            async with self.models.held(name) as handle:
                yield handle
        finally:
            self._state.in_flight[name] = max(0, self._state.in_flight.get(name, 0) - 1)
            self._kick()

    async def _admitted(self, name: str) -> None:
        if self._admit_now(name):
            return
        loop = asyncio.get_running_loop()
        waiter = _Waiter(next(self._ids), name, self.clock.monotonic(), loop.create_future())
        self._waiting[waiter.id] = waiter
        self.step()
        if not waiter.future.done() and self.waiting(name) > self.settings.queue_length:
            del self._waiting[waiter.id]
            raise QueueFull(
                f"{self.settings.queue_length} requests already wait for {name}",
                model=name,
                retry_after_s=self._retry_after(),
            )
        try:
            await waiter.future
        except asyncio.CancelledError:
            if self._waiting.pop(waiter.id, None) is None and _admitted_ok(waiter.future):
                self._state.in_flight[name] -= 1  # admitted just as the caller left
                self.models.release_hold(name)
                self._kick()
            raise

    def _admit_now(self, name: str) -> bool:
        """Hold ``name`` at once when nobody waits and it is resident with room: what a plan
        would decide for this one request, without planning."""
        if self._waiting:
            return False
        status = self.models.status(name)
        state = self._state
        if (
            status.state is not ModelState.LOADED
            or status.device is None
            or name in state.busy
            or state.cooldown.get(name, 0.0) > self.clock.monotonic()
            or max(status.in_use, state.in_flight.get(name, 0)) >= self.settings.concurrency(name)
            or not self.models.try_hold(name)
        ):
            return False
        state.in_flight[name] = state.in_flight.get(name, 0) + 1
        return True

    def _retry_after(self) -> int:
        return max(1, round(self.settings.max_wait_s))

    # ------------------------------------------------------------------ the plan

    def step(self) -> scheduler.GatewayPlan:
        """Plan once and apply the plan (never blocks: loads run as background jobs)."""
        if not self._waiting:  # nothing to admit, refuse or load: the plan is empty
            return scheduler.GatewayPlan()
        now = self.clock.monotonic()
        self._expire(now)
        pending = [scheduler.Pending(w.id, w.model, w.since) for w in self._waiting.values()]
        statuses = {s.name: s for s in self.models.list_models()}
        slots = {n: self._slot(s, now) for n, s in statuses.items()}
        gpus = self._gpus()
        decided = scheduler.plan(pending, slots, gpus, now, self.settings.max_wait_s)
        for request in decided.admit:
            waiter = self._waiting[request]
            if not self.models.try_hold(waiter.model):
                continue  # it changed since the plan read it; the next plan sees how
            del self._waiting[request]
            self._state.in_flight[waiter.model] = self._state.in_flight.get(waiter.model, 0) + 1
            waiter.future.set_result(None)
        for unfit in decided.unfit:
            self._refuse(unfit)
        for load in decided.loads:
            self._start_load(load)
        return decided

    def _expire(self, now: float) -> None:
        timeout = self.settings.timeout_s
        for waiter in [w for w in self._waiting.values() if now - w.since >= timeout]:
            del self._waiting[waiter.id]
            if not waiter.future.done():
                waiter.future.set_exception(
                    QueueTimeout(
                        f"{waiter.model} was not ready within {timeout:g} s",
                        model=waiter.model,
                        retry_after_s=self._retry_after(),
                    )
                )

    def _refuse(self, unfit: scheduler.Unfit) -> None:
        error = ModelTooLarge(
            f"{unfit.model} needs {format_size(unfit.needed_bytes)}; "
            + (
                f"{unfit.device} has {format_size(unfit.free_bytes)} free"
                if unfit.device
                else "no device"
            )
            + (f" and could free {', '.join(unfit.unloadable)}" if unfit.unloadable else ""),
            model=unfit.model,
            needed_bytes=unfit.needed_bytes,
            free_bytes=unfit.free_bytes,
            device=unfit.device,
            unloadable=list(unfit.unloadable),
        )
        self._fail(unfit.model, error)

    def _fail(self, model: str, error: BaseException) -> None:
        for waiter in [w for w in self._waiting.values() if w.model == model]:
            del self._waiting[waiter.id]
            if not waiter.future.done():
                waiter.future.set_exception(error)

    def _start_load(self, load: scheduler.Load) -> None:
        state = self._state
        state.busy |= {load.model, *load.evict}
        if load.device != CPU:
            state.loading[load.device] = load.model
        job = asyncio.create_task(self._load(load), name=f"gateway-load-{load.model}")
        self._jobs.add(job)
        job.add_done_callback(self._jobs.discard)

    async def _load(self, load: scheduler.Load) -> None:
        try:
            for victim in load.evict:
                log.info("gateway: evicting %s for %s", victim, load.model)
                await self.models.ensure_unloaded(victim)
            await self.models.ensure_loaded(load.model, load.device)
            self.metrics.swaps.labels(model=load.model).inc()
        except InsufficientMemory as exc:  # held by others than the gateway: try again later
            log.info("gateway: no room for %s yet: %s", load.model, exc.message)
            self._state.cooldown[load.model] = self.clock.monotonic() + NO_ROOM_RETRY_S
        except Exception as exc:  # the load's failure is the answer of its waiting requests
            log.warning("gateway: loading %s failed: %s", load.model, exc)
            self._fail(load.model, exc)
        finally:
            self._state.busy -= {load.model, *load.evict}
            if self._state.loading.get(load.device) == load.model:
                del self._state.loading[load.device]
            self._kick()

    # ------------------------------------------------------------------ views

    def _slot(self, status: ModelStatus, now: float) -> scheduler.ModelSlot:
        name = status.name
        resident = status.state is ModelState.LOADED and status.device is not None
        busy = (
            name in self._state.busy
            or status.state in (ModelState.LOADING, ModelState.UNLOADING)
            or self._state.cooldown.get(name, 0.0) > now
        )
        return scheduler.ModelSlot(
            name=name,
            target=status.device if resident or busy else self._target(status),
            resident=resident,
            busy=busy,
            vram_bytes=status.vram_bytes,
            in_flight=max(status.in_use, self._state.in_flight.get(name, 0)),
            max_concurrent=self.settings.concurrency(name),
            reload_cost_s=self.models.bandwidth.cost_s(status.backend.value, status.vram_bytes),
            priority_rank=Priority(status.priority).rank,
            never_evict=status.never_evict,
        )

    def _totals(self) -> dict[int, int]:
        return {g.index: g.memory_total_bytes for g in self.models.devices.snapshot().gpus}

    def _target(self, status: ModelStatus) -> str | None:
        """Where a load of this model goes: its pinned device, else the allowed GPU it fits
        on (the roomiest), else the CPU when allowed; None when nowhere."""
        totals = self._totals()
        if not totals:
            return CPU
        if status.pinned_device is not None:
            return status.pinned_device
        allowed = status.allowed_devices
        named = [gpu_index(a) for a in allowed if a not in (CPU, "gpu")]
        indices = [i for i in named if i is not None and i in totals]
        if "gpu" in allowed:
            indices += [i for i in sorted(totals) if i not in indices]
        fitting = [i for i in indices if totals[i] >= status.vram_bytes]
        if fitting:
            return gpu_device(max(fitting, key=lambda i: (totals[i], -i)))
        if CPU in allowed:
            return CPU
        return gpu_device(indices[0]) if indices else None

    def _gpus(self) -> dict[str, scheduler.GpuSlot]:
        """Each GPU's room as the model manager sees it (telemetry and arbiter headroom, with
        the resident models accounted)."""
        return {
            gpu_device(index): scheduler.GpuSlot(
                gpu_device(index),
                self.models.room(gpu_device(index)),
                loading=gpu_device(index) in self._state.loading,
            )
            for index in self._totals()
        }

    def describe(self) -> dict[str, Any]:
        """Queues and requests in flight, per model (for status pages)."""
        return {
            name: {"waiting": self.waiting(name), "in_flight": self.in_flight(name)}
            for name in self.models.specs
        }


def _admitted_ok(future: asyncio.Future[None]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
