"""Loading, unloading and moving one model: the executor of the placement and eviction
decisions of ``models/policy.py``.

Each operation runs with the locks the caller holds (``Locks.locked``), under a timeout, with
up to ``max_load_retries`` retries (``attempt``); a failure leaves a consistent state (nothing
accounted that the backend does not hold), marks the model ERROR and publishes
``model_error``; an unreachable backend fails at once and puts the manager in degraded mode.
Before a load on a GPU, ``make_room`` evicts what ``policy.choose_evictions`` picks (to the
CPU when the model can move there, else unloaded), books the memory with the arbiter and,
on a real GPU, waits for the memory to show as free.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from vramancer import event_types as ev
from vramancer.errors import BackendUnavailable, OperationTimeout, VramancerError
from vramancer.events import EventBus
from vramancer.models import policy
from vramancer.models.booking import Booking
from vramancer.models.entry import ModelEntry
from vramancer.models.errors import BackendError, ModelNotInBackend
from vramancer.models.health import BackendHealth
from vramancer.models.locks import Locks
from vramancer.models.room import GpuRoom
from vramancer.models.table import ModelTable
from vramancer.models.types import CPU, ModelState, gpu_index
from vramancer.observability import tracing

log = logging.getLogger(__name__)

T = TypeVar("T")


async def _nothing_to_settle(device: str) -> None:
    return None


class Lifecycle:
    def __init__(
        self,
        table: ModelTable,
        *,
        locks: Locks,
        booking: Booking,
        room: GpuRoom,
        health: BackendHealth,
        events: EventBus,
    ) -> None:
        self.table = table
        self.gm = table.gm
        self.locks = locks
        self.booking = booking
        self.room = room
        self.health = health
        self.events = events
        #: Frees the models our own booking just preempted on a GPU before a load there
        #: (``Preemptions.settle``). The manager sets it once the preemption handler, which
        #: drives this lifecycle, exists.
        self.settle_preemptions: Callable[[str], Awaitable[None]] = _nothing_to_settle

    # ------------------------------------------------------------------ placing

    async def place(self, entry: ModelEntry, device: str, reason: str) -> None:
        """Make ``entry`` loaded on ``device`` (load, move, or unload + load)."""
        if entry.state is ModelState.LOADED and entry.device != device and entry.in_use:
            async with self.locks.quiesce(entry), self.locks.locked(entry, device):
                await self.place_locked(entry, device, reason)
            return
        async with self.locks.locked(entry, device):
            await self.place_locked(entry, device, reason)

    async def place_locked(self, entry: ModelEntry, device: str, reason: str) -> None:
        if entry.state is ModelState.LOADED and entry.device == device:
            return
        if entry.state is ModelState.LOADED:
            if entry.backend.can_move:
                await self.move_locked(entry, device, reason)
                return
            await self.unload_locked(entry, "migrate")
        await self.load_locked(entry, device, reason)

    # ------------------------------------------------------------------ load

    async def load_locked(self, entry: ModelEntry, device: str, reason: str) -> None:
        """Load ``entry`` on ``device``; the caller holds its locks. Raises on failure."""
        table = self.table
        if entry.state is ModelState.ERROR:
            self.booking.drop(entry)
        target = self.room.target(device)
        with tracing.span("models.load", model=entry.name, device=device):
            if target.on_gpu:
                await self.make_room(entry, device)
            table.set_state(entry, ModelState.LOADING, device=device, target=target)
            entry.error = None
            started = time.perf_counter()
            try:
                result = await self._attempt(
                    entry,
                    "load",
                    lambda: entry.backend.load(target, entry.variant),
                    table.limits.load_timeout(entry),
                )
            except VramancerError as exc:
                await self._load_failed(entry, exc)
                raise
            except asyncio.CancelledError:
                self.booking.drop(entry)
                entry.error = "the load was cancelled"
                table.set_state(entry, ModelState.ERROR, device=None, target=None)
                raise
        duration = time.perf_counter() - started
        self.booking.account(entry, target, result)
        entry.loads += 1
        entry.last_load_s = duration
        entry.loaded_at = table.clock.monotonic()
        table.touch(entry)
        table.set_state(entry, ModelState.LOADED, device=device, target=target)
        kind = entry.kind.value
        table.bandwidth.observe(kind, result.size_bytes or table.expected(entry), duration)
        table.metrics.load.labels(model=entry.name, backend=kind).observe(duration)
        table.metrics.loads.labels(model=entry.name, backend=kind, result="ok").inc()
        self.health.note_ok(entry)
        loaded = ev.ModelLoaded(
            model=entry.name,
            backend=kind,
            device=device,
            runs_on=target.runs_on,
            simulated=target.simulated,
            duration_s=round(duration, 6),
            vram_bytes=entry.used_bytes,
            reason=reason,
        )
        self.events.publish(loaded)
        self.events.publish(ev.ResourceChanged(event_type=loaded.kind, details=loaded.as_data()))

    async def _load_failed(self, entry: ModelEntry, exc: VramancerError) -> None:
        """Leave a consistent state after a failed load: nothing accounted, and nothing left
        loaded in the backend if it can be helped."""
        table = self.table
        self.booking.drop(entry)
        unavailable = isinstance(exc, BackendUnavailable)
        if not unavailable:
            # Best effort: the load already failed, whatever the clean-up raises is moot.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(entry.backend.unload(), table.limits.unload_timeout(entry))
        result = "unavailable" if unavailable else "error"
        table.metrics.loads.labels(model=entry.name, backend=entry.kind.value, result=result).inc()
        entry.error = exc.message
        if unavailable:
            self.health.set_degraded(entry.kind.value, exc.message)
            table.set_state(entry, ModelState.UNLOADED, device=None, target=None)
            return
        table.set_state(entry, ModelState.ERROR, device=None, target=None)
        self.events.publish(
            ev.ModelError(model=entry.name, operation="load", error=exc.message, code=exc.code)
        )

    # ------------------------------------------------------------------ unload

    async def unload_locked(
        self, entry: ModelEntry, reason: str, retries: int | None = None
    ) -> None:
        """Unload ``entry``; the caller holds its locks (or the lock of the GPU it is on)."""
        if entry.state is ModelState.UNLOADED:
            return
        table = self.table
        device, target = entry.device, entry.target
        index = gpu_index(device)
        before = self.room.free_now(index)
        table.set_state(entry, ModelState.UNLOADING)
        with tracing.span("models.unload", model=entry.name, reason=reason):
            try:
                await self._attempt(
                    entry,
                    "unload",
                    entry.backend.unload,
                    table.limits.unload_timeout(entry),
                    retries,
                )
            except VramancerError as exc:
                entry.error = exc.message
                if isinstance(exc, BackendUnavailable):
                    self.health.set_degraded(entry.kind.value, exc.message)
                table.set_state(entry, ModelState.ERROR)
                self.events.publish(
                    ev.ModelError(
                        model=entry.name, operation="unload", error=exc.message, code=exc.code
                    )
                )
                raise
        freed = entry.used_bytes
        self.booking.drop(entry)
        entry.variant = None
        entry.error = None
        table.set_state(entry, ModelState.UNLOADED, device=None, target=None)
        table.metrics.unloads.labels(
            model=entry.name, backend=entry.kind.value, reason=reason
        ).inc()
        self.health.note_ok(entry)
        unloaded = ev.ModelUnloaded(
            model=entry.name,
            backend=entry.kind.value,
            device=device,
            reason=reason,
            freed_bytes=freed,
        )
        self.events.publish(unloaded)
        self.events.publish(
            ev.ResourceChanged(event_type=unloaded.kind, details=unloaded.as_data())
        )
        if index is not None and freed and target is not None and not target.simulated:
            await self.room.wait_recovered(index, before, freed)

    # ------------------------------------------------------------------ move

    async def move_locked(self, entry: ModelEntry, device: str, reason: str) -> None:
        """Move a loaded torch model in place; the caller holds the locks of both devices."""
        table, booking = self.table, self.booking
        source, source_target = entry.device, entry.target
        target = self.room.target(device)
        index = gpu_index(source)
        before = self.room.free_now(index)
        old_allocation, old_sim, old_used = entry.allocation, entry.sim_bytes, entry.used_bytes
        entry.allocation, entry.sim_bytes, entry.used_bytes = None, 0, 0
        try:
            if target.on_gpu:
                await self.make_room(entry, device)
        except BaseException:
            entry.allocation, entry.sim_bytes, entry.used_bytes = old_allocation, old_sim, old_used
            raise
        new_allocation = entry.allocation
        table.set_state(entry, ModelState.LOADING)
        started = time.perf_counter()
        try:
            result = await self._attempt(
                entry,
                "move",
                lambda: entry.backend.move(target),
                table.limits.load_timeout(entry),
            )
        except VramancerError as exc:
            booking.release(new_allocation)
            entry.allocation, entry.sim_bytes, entry.used_bytes = old_allocation, old_sim, old_used
            entry.error = exc.message
            table.set_state(entry, ModelState.ERROR)
            self.events.publish(
                ev.ModelError(model=entry.name, operation="move", error=exc.message, code=exc.code)
            )
            raise
        duration = time.perf_counter() - started
        booking.release(old_allocation)
        if old_sim and index is not None:
            booking.adjust_sim(index, -old_sim)
        booking.account(entry, target, result)
        table.set_state(entry, ModelState.LOADED, device=device, target=target)
        table.touch(entry)
        table.metrics.load.labels(model=entry.name, backend=entry.kind.value).observe(duration)
        migrated = ev.ModelMigrated(
            model=entry.name,
            from_=source,
            to=device,
            runs_on=target.runs_on,
            simulated=target.simulated,
            duration_s=round(duration, 6),
            reason=reason,
        )
        self.events.publish(migrated)
        self.events.publish(
            ev.ResourceChanged(event_type="device_changed", details=migrated.as_data())
        )
        real_gpu = source_target is not None and not source_target.simulated
        if index is not None and old_used and real_gpu:
            await self.room.wait_recovered(index, before, old_used)

    # ------------------------------------------------------------------ retries and timeouts

    async def _attempt(
        self,
        entry: ModelEntry,
        operation: str,
        call: Callable[[], Awaitable[T]],
        timeout_s: float,
        retries: int | None = None,
    ) -> T:
        """Run ``call`` with a timeout, retrying up to ``max_load_retries`` times. Unreachable
        backends and models the backend does not have fail at once."""
        tries = 1 + (self.table.limits.retries(entry) if retries is None else retries)
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

    async def make_room(self, entry: ModelEntry, device: str) -> None:
        """Free enough VRAM on ``device`` for ``entry`` and book it with the arbiter; the
        caller holds ``device``'s lock. Raises ``InsufficientMemory`` naming what to unload."""
        table, room = self.table, self.room
        index = gpu_index(device)
        assert index is not None
        needed = table.expected(entry)
        await self._yield_for_vlm(entry, device)
        for _ in range(3):
            decision = policy.choose_evictions(
                table.views_on(device, exclude=entry),
                needed_bytes=needed,
                free_bytes=room.room(index, entry.priority),
                priority_rank=entry.rank,
            )
            if isinstance(decision, policy.NoRoom):
                if not decision.busy:
                    raise room.no_room(entry, device, decision)
                await self.wait_for_users(
                    [table.entries[n] for n in decision.busy], entry, device, decision
                )
                continue
            await self._evict_all([table.entries[v] for v in decision.victims], entry)
            if self.booking.book(entry, device, needed):
                await self.settle_preemptions(device)
                await room.wait_room(entry, index, needed)
                return
        decision = policy.NoRoom(needed, room.room(index), table.unloadable(device, entry))
        raise room.no_room(entry, device, decision)

    async def _evict_all(self, victims: list[ModelEntry], entry: ModelEntry) -> None:
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
            self.table.bump()

    async def wait_for_users(
        self, busy: list[ModelEntry], entry: ModelEntry, device: str, decision: policy.NoRoom
    ) -> None:
        """Drain ``busy`` and wait for their users (``queue_max_wait_s``); raises the "no
        room" of ``decision`` when they are still in use then."""
        table = self.table
        for victim in busy:
            victim.draining += 1
        table.bump()
        try:
            done = await table.wait_until(
                lambda: all(v.in_use == 0 for v in busy), self.gm.queue_max_wait_s
            )
        finally:
            for victim in busy:
                victim.draining -= 1
            table.bump()
        if not done:
            raise self.room.no_room(entry, device, decision)

    async def _yield_for_vlm(self, entry: ModelEntry, device: str) -> None:
        """Before the VLM loads on a GPU, CLIP leaves it (for the CPU when it can move there):
        the VLM is the user-facing model, CLIP the cheap one to reload."""
        gm = self.gm
        if not gm.clip_yields_to_vlm or entry.name != gm.vlm_model or gm.clip_model is None:
            return
        clip = self.table.entries.get(gm.clip_model)
        if clip is None or clip is entry or clip.device != device:
            return
        if clip.state is not ModelState.LOADED:
            return
        if clip.in_use:
            needed = self.table.expected(entry)
            busy = policy.NoRoom(needed, 0, (clip.name,), busy=(clip.name,))
            await self.wait_for_users([clip], entry, device, busy)
        await self._evict(clip, f"yields {device} to {entry.name}")

    async def _evict(self, victim: ModelEntry, reason: str) -> None:
        """Free ``victim``'s GPU: to the CPU when it can move there, else unload. The caller
        holds the victim's GPU lock (not its model lock: a victim only ever leaves the GPU)."""
        log.info("evicting %s from %s (%s)", victim.name, victim.device, reason)
        if victim.backend.can_move and CPU in victim.spec.allowed_devices:
            await self.move_locked(victim, CPU, "evicted")
        else:
            await self.unload_locked(victim, "evicted")
