"""Reachability of the external servers behind model backends (``BackendService``: Ollama).

An unreachable server puts the manager in degraded mode under the server's name, with a
reason; the other models keep working. Each server is probed every ``retry_interval_s``; a
probe also syncs the states with what the server really has loaded (adopting models loaded
behind VRAMancer, forgetting ones it dropped, counting a changed expiry as activity) and
estimates, once, the size of models that configure none.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from vramancer import event_types as ev
from vramancer.clock import Clock
from vramancer.errors import VramancerError
from vramancer.events import EventBus
from vramancer.models import policy
from vramancer.models.backends.base import BackendService, LoadResult, RunningModel
from vramancer.models.booking import Booking
from vramancer.models.entry import ModelEntry
from vramancer.models.locks import Locks
from vramancer.models.ports import DevicePort
from vramancer.models.room import GpuRoom
from vramancer.models.table import ModelTable
from vramancer.models.types import CPU, ModelState, gpu_device

log = logging.getLogger(__name__)


class BackendHealth:
    def __init__(
        self,
        table: ModelTable,
        services: Sequence[BackendService],
        *,
        devices: DevicePort,
        room: GpuRoom,
        booking: Booking,
        locks: Locks,
        events: EventBus,
        clock: Clock,
        default_retry_s: float,
    ) -> None:
        self.table = table
        #: Logged as the retry interval of a degraded backend that is not a probed server.
        self.default_retry_s = default_retry_s
        self.services = tuple(services)
        self.devices = devices
        self.room = room
        self.booking = booking
        self.locks = locks
        self.events = events
        self.clock = clock
        self._degraded: dict[str, str] = {}
        self._last_probe: dict[str, float] = {}
        #: Last ``expires_at`` a server reported per model (a change is a direct request).
        self._expires: dict[str, str | None] = {}
        for service in self.services:
            table.metrics.degraded.labels(backend=service.name).set(0)

    @property
    def degraded(self) -> bool:
        return bool(self._degraded)

    @property
    def degraded_reason(self) -> str | None:
        if not self._degraded:
            return None
        return "; ".join(f"{k}: {v}" for k, v in sorted(self._degraded.items()))

    async def probe(self, now: float | None = None, *, force: bool = False) -> bool:
        """Probe each server due (all with ``force``); False while one is unreachable."""
        now = self.clock.monotonic() if now is None else now
        ok = True
        for service in self.services:
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
            self.set_degraded(service.name, exc.message)
            return False
        self.clear_degraded(service.name)
        await self._sync(service, running)
        await self._estimate_unknown_sizes(service)
        return True

    async def _estimate_unknown_sizes(self, service: BackendService) -> None:
        """Models without a configured ``vram``: estimate it once (Ollama: ``/api/show`` and
        the resources estimator) so bookings and eviction plans are right from the first
        load; a measured size replaces it after the load."""
        table = self.table
        for entry in table.values():
            backend = entry.backend
            name = entry.name
            if backend.service is not service or entry.spec.vram is not None:
                continue
            if name in table.learned or name in table.estimated:
                continue
            try:
                estimate = await backend.estimate_vram()
            except VramancerError as exc:
                log.info("no size estimate for %s: %s", name, exc.message)
                estimate = None
            table.estimated[name] = estimate

    def set_degraded(self, backend: str, reason: str) -> None:
        if self._degraded.get(backend) == reason:
            return
        first = backend not in self._degraded
        self._degraded[backend] = reason
        self.table.metrics.degraded.labels(backend=backend).set(1)
        if first:
            retry_s = next(
                (s.retry_interval_s for s in self.services if s.name == backend),
                self.default_retry_s,
            )
            log.warning(
                "%s unavailable, degraded mode: %s (retry every %g s)", backend, reason, retry_s
            )
            self.events.publish(ev.DegradedMode(backend=backend, degraded=True, reason=reason))

    def clear_degraded(self, backend: str) -> None:
        if self._degraded.pop(backend, None) is None:
            return
        self.table.metrics.degraded.labels(backend=backend).set(0)
        log.info("%s is reachable again; leaving degraded mode", backend)
        for entry in self.table.values():  # "unreachable" no longer explains anything
            if entry.kind.value == backend and entry.state is ModelState.UNLOADED:
                entry.error = None
        self.events.publish(ev.DegradedMode(backend=backend, degraded=False, reason=None))

    def note_ok(self, entry: ModelEntry) -> None:
        """A load or unload went through: the model's server is reachable."""
        service = entry.backend.service
        if service is not None:
            self.clear_degraded(service.name)

    # ------------------------------------------------------------------ sync with the server

    async def _sync(self, service: BackendService, running: list[RunningModel]) -> None:
        """Adopt models the server has loaded that we think are not, forget ones it dropped,
        and count a changed ``expires_at`` as activity (a client called the server directly:
        each request resets the model's expiry)."""
        for entry in self.table.values():
            backend = entry.backend
            if backend.service is not service or entry.lock.locked() or entry.draining:
                continue
            seen = backend.find_running(running)
            expires = seen.expires_at if seen is not None else None
            previous = self._expires.get(entry.name)
            self._expires[entry.name] = expires
            async with self.locks.locked(entry):
                if entry.state in (ModelState.LOADED, ModelState.ERROR) and seen is None:
                    self._forget(entry)
                elif entry.state is ModelState.UNLOADED and seen is not None:
                    self._adopt(entry, seen)
                elif seen is not None and previous is not None and expires != previous:
                    self.table.touch(entry)

    def _forget(self, entry: ModelEntry) -> None:
        device = entry.device
        self.booking.drop(entry)
        entry.variant = None
        entry.error = None
        self.table.set_state(entry, ModelState.UNLOADED, device=None, target=None)
        self.table.metrics.unloads.labels(
            model=entry.name, backend=entry.kind.value, reason="external"
        ).inc()
        self.events.publish(
            ev.ModelUnloaded(
                model=entry.name,
                backend=entry.kind.value,
                device=device,
                reason="external",
                freed_bytes=0,
            )
        )

    def _adopt(self, entry: ModelEntry, seen: RunningModel) -> None:
        table = self.table
        gpus = [g.index for g in self.devices.snapshot().gpus]
        view = table.view(entry, self.clock.monotonic())
        index = policy.gpu_candidates(view, gpus)[:1]
        device = gpu_device(index[0]) if seen.size_vram_bytes > 0 and index else CPU
        target = self.room.target(device)
        size = seen.size_vram_bytes or seen.size_bytes
        if target.on_gpu and not self.booking.book(entry, device, size):
            log.warning(
                "%s is loaded in %s but the arbiter has no room for it",
                entry.name,
                entry.kind.value,
            )
        self.booking.account(entry, target, LoadResult(seen.size_vram_bytes, seen.size_bytes))
        entry.loaded_at = self.clock.monotonic()
        table.touch(entry)
        table.set_state(entry, ModelState.LOADED, device=device, target=target)
        self.events.publish(
            ev.ModelLoaded(
                model=entry.name,
                backend=entry.kind.value,
                device=device,
                runs_on=target.runs_on,
                simulated=target.simulated,
                duration_s=0.0,
                vram_bytes=entry.used_bytes,
                reason="adopted",
            )
        )
