"""The managed models' records, shared by the manager's collaborators: lookup, state changes
(exported as metrics, waking whoever waits for one), activity, expected sizes and the frozen
``policy.ModelView``s the pure decisions work on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

from vramancer.clock import Clock
from vramancer.errors import NotFound
from vramancer.models import policy
from vramancer.models.entry import Limits, ModelEntry
from vramancer.models.metrics import ModelMetrics
from vramancer.models.settings import GpuManagerSettings
from vramancer.models.types import ModelState


class ModelTable:
    """Every managed model's ``ModelEntry`` by name, and what is derived from all of them."""

    def __init__(
        self,
        entries: dict[str, ModelEntry],
        gm: GpuManagerSettings,
        *,
        clock: Clock,
        metrics: ModelMetrics,
    ) -> None:
        self.entries = entries
        self.gm = gm
        self.clock = clock
        self.metrics = metrics
        self.limits = Limits(gm)
        self.bandwidth = policy.LoadBandwidth(float(gm.default_load_bandwidth))
        #: Sizes measured at a load, by model (or variant) name.
        self.learned: dict[str, int] = {}
        #: Sizes estimated before the first load (``ModelBackend.estimate_vram``).
        self.estimated: dict[str, int | None] = {}
        #: Set by ``ModelManager.stop``: no new request or background work starts.
        self.stopping = False
        self._changed = asyncio.Event()

    # ------------------------------------------------------------------ lookup

    def get(self, name: str) -> ModelEntry:
        entry = self.entries.get(name)
        if entry is None:
            known = ", ".join(self.entries) or "none configured"
            raise NotFound(f"no managed model {name!r} (models: {known})", model=name)
        return entry

    def values(self) -> Iterable[ModelEntry]:
        return self.entries.values()

    def unloadable(self, device: str, exclude: ModelEntry) -> tuple[str, ...]:
        """Models holding memory on ``device`` besides ``exclude`` (named when a load fails)."""
        return tuple(
            sorted(
                e.name
                for e in self.entries.values()
                if e is not exclude and e.device == device and e.used_bytes
            )
        )

    # ------------------------------------------------------------------ state changes

    def set_state(self, entry: ModelEntry, state: ModelState, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(entry, key, value)
        entry.state = state
        self.metrics.export_state(entry)
        self.bump()

    def bump(self) -> None:
        """Wake everything waiting for a state change."""
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait_changed(self, timeout_s: float) -> None:
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    async def wait_until(self, predicate: Callable[[], bool], timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate():
            remaining = deadline - loop.time()
            if remaining <= 0:
                return predicate()
            await self.wait_changed(remaining)
        return True

    def touch(self, entry: ModelEntry) -> None:
        entry.last_used = self.clock.monotonic()
        entry.last_used_wall = self.clock.time()

    # ------------------------------------------------------------------ sizes

    def expected(self, entry: ModelEntry) -> int:
        spec = entry.spec
        if entry.variant is not None:
            known = spec.smaller_variant_vram or self.learned.get(entry.variant)
            return known or max(1, self.expected_full(entry) // 2)
        return self.expected_full(entry)

    def expected_full(self, entry: ModelEntry) -> int:
        """Configured, else measured at the last load, else estimated, else the default."""
        name = entry.name
        known = entry.spec.vram or self.learned.get(name) or self.estimated.get(name)
        return known or self.gm.default_vram

    def learn(self, entry: ModelEntry, size: int | None) -> None:
        if size:
            self.learned[entry.variant or entry.name] = size

    # ------------------------------------------------------------------ views

    def view(self, entry: ModelEntry, now: float) -> policy.ModelView:
        since = entry.idle_since()
        expected = self.expected(entry)
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

    def views(self) -> dict[str, policy.ModelView]:
        now = self.clock.monotonic()
        return {e.name: self.view(e, now) for e in self.entries.values()}

    def views_on(self, device: str, exclude: ModelEntry) -> list[policy.ModelView]:
        """The models loaded on ``device`` besides ``exclude``."""
        now = self.clock.monotonic()
        return [
            self.view(e, now)
            for e in self.entries.values()
            if e is not exclude and e.device == device and e.state is ModelState.LOADED
        ]
