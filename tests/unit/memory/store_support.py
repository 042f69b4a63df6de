"""Building real ``TieredStore`` instances for the store's tests (real files, real SQLite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vramancer.clock import ManualClock
from vramancer.devices.manager import DeviceManager
from vramancer.devices.settings import DevicesSettings
from vramancer.events import EventBus
from vramancer.memory.compression import CompressionManager
from vramancer.memory.settings import MemorySettings
from vramancer.memory.store import StorePolicy, TieredStore
from vramancer.observability.metrics import Metrics


def make_settings(
    l4: int | None = 64 * 1024,
    l5: int | None = 256 * 1024,
    l6: int | None = 4 * 1024 * 1024,
    **overrides: Any,
) -> MemorySettings:
    """Small tiers so a few KiB of blocks exercise pressure, cascades and the archive."""
    tiers: dict[str, Any] = {}
    for name, cap in (("L4", l4), ("L5", l5), ("L6", l6)):
        tiers[name] = {"capacity": cap} if cap is not None else {"enabled": False}
    overrides.setdefault("fsync", False)
    overrides.setdefault("spill_on_stop", False)
    return MemorySettings(tiers=tiers, **overrides)


class StoreKit:
    """A store with its clock, event bus and metrics, reopenable on the same data dir."""

    def __init__(
        self,
        data_dir: Path,
        settings: MemorySettings | None = None,
        *,
        compression: CompressionManager | None = None,
        policy: StorePolicy | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.settings = settings or make_settings()
        self.compression = compression
        self.policy = policy
        self.clock = ManualClock()
        self.events = EventBus(clock=self.clock.time)
        self.metrics = Metrics(node="test")
        self.devices = DeviceManager(
            DevicesSettings(), events=self.events, metrics=self.metrics, clock=self.clock
        )
        self.store = self.new_store()

    def new_store(self) -> TieredStore:
        store = TieredStore(
            self.settings,
            data_dir=self.data_dir,
            devices=self.devices,
            events=self.events,
            metrics=self.metrics,
            clock=self.clock,
            compression=self.compression,
            policy=self.policy,
        )
        store.open()
        return store

    def crash(self) -> None:
        """What the death of the store's process leaves: its files and catalog as they are, and
        its lock on the data directory gone (the kernel drops a dead process's ``flock``)."""
        lock = self.store._dir_lock
        if lock is not None:
            lock.release()

    def reopen(self) -> TieredStore:
        """Close the store (no spill unless configured) and open a new one on the same dir."""
        self.store.close()
        self.metrics = Metrics(node="test")
        self.store = self.new_store()
        return self.store

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events.recent(10_000)]

    def check_invariants(self) -> None:
        """Every tier: used == sum of its blocks' sizes, used <= effective capacity."""
        stats = self.store.stats()
        per_tier: dict[str, int] = {}
        count: dict[str, int] = {}
        page, total = self.store.list_blocks(limit=1_000_000)
        assert total == stats["blocks"] == len(page)
        for item in page:
            per_tier[item["tier"]] = per_tier.get(item["tier"], 0) + item["size"]
            count[item["tier"]] = count.get(item["tier"], 0) + 1
        for tier in stats["tiers"]:
            assert tier["used_bytes"] == per_tier.get(tier["name"], 0), tier
            assert tier["blocks"] == count.get(tier["name"], 0), tier
            assert tier["used_bytes"] <= tier["capacity_bytes"], tier
