"""The tiered store's metadata: blocks, tiers, their accounting, and the snapshots it plans on.

Everything here is guarded by ``StoreState.lock`` (the store's metadata lock), held only for
bookkeeping, never across I/O. The planner (``memory/planner.py``) works on the frozen
snapshots :meth:`StoreState.tier_states` and :meth:`StoreState.block_views` take.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vramancer.errors import NotFound
from vramancer.memory.backends import Layout, LayoutTable, TierBackend
from vramancer.memory.eviction_index import EvictionIndex
from vramancer.memory.hotness import HotnessModel
from vramancer.memory.planner import BlockView, Candidate, TierState
from vramancer.memory.promotion import bytes_to_free
from vramancer.memory.records import BlockMeta
from vramancer.memory.tiers import DISK_TIERS, TierSpec


@dataclass(slots=True, eq=False)
class Entry:
    """A block: its policy metadata, how to rebuild it, and its backend handle.

    Three slots, no more: the store keeps one per block (a million blocks must stay under
    500 bytes each). ``layout`` is shared (``LayoutTable``); whether the entry is still the
    block's is ``state.blocks.get(id) is entry``; old copies waiting for readers are in
    ``state.deferred``.
    """

    meta: BlockMeta
    layout: Layout
    handle: Any


@dataclass(slots=True, eq=False)
class Tier:
    """One present tier: its backend, budget, accounting and eviction index."""

    spec: TierSpec
    backend: TierBackend
    index: EvictionIndex
    #: Budget asked for (config, derived, or ``set_capacity``).
    target: int
    #: Effective capacity: the budget, or more while pinned blocks keep ``used`` above it.
    capacity: int
    used: int = 0
    blocks: int = 0
    stored: int = 0
    hits: int = 0
    #: L4: blocks are Python objects handed out as they are (bytes, read-only arrays).
    host: bool = False
    up: Tier | None = None
    lower: list[Tier] = field(default_factory=list)
    #: ``spec.name.value`` and whether the tier is L5/L6, kept as plain fields (read per op).
    name: str = field(init=False)
    is_disk: bool = field(init=False)
    #: This tier's children of the per-tier gauges (used, capacity, blocks, ratio).
    gauges: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        self.name = self.spec.name.value
        self.is_disk = self.spec.name in DISK_TIERS

    @property
    def free(self) -> int:
        return max(0, self.target - self.used)

    def need(self, incoming: int, *, force: bool = False) -> int:
        """Bytes to demote so ``incoming`` fits and, above the high mark (or ``force``), the
        tier drops to its low mark; also what a shrunk budget asks for."""
        spec = self.spec
        return bytes_to_free(
            self.used, self.target, incoming, spec.pressure_high, spec.pressure_low, force=force
        )

    def fits(self, size: int) -> bool:
        """Whether ``size`` more bytes keep the tier at or under its high mark."""
        return self.need(size) == 0


#: An old copy to free: the tier it is in and its backend handle.
Free = tuple[Tier, Any]


class StoreState:
    """The block table, the tiers and the copies waiting for their readers, under ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.blocks: dict[str, Entry] = {}
        self.layouts = LayoutTable()
        #: Old copies of blocks being read, freed when their last reader is done.
        self.deferred: dict[Entry, list[Free]] = {}
        self.tiers: list[Tier] = []
        self.by_name: dict[str, Tier] = {}
        #: Blocks put durably: they stay on the disk tiers (never promoted into memory).
        self.durable: set[str] = set()

    def set_tiers(self, tiers: list[Tier]) -> None:
        for position, tier in enumerate(tiers):
            tier.up = tiers[position - 1] if position > 0 else None
            tier.lower = tiers[position + 1 :]
        self.tiers[:] = tiers
        self.by_name.clear()
        self.by_name.update((t.name, t) for t in tiers)

    def entry(self, block_id: str) -> Entry:
        """Lock held: the block's entry, or ``NotFound``."""
        entry = self.blocks.get(block_id)
        if entry is None:
            raise NotFound(f"no block {block_id!r}")
        return entry

    def layout(self, entry: Entry) -> Layout:
        """The entry's complete layout (bytes blocks share one without their size)."""
        return self.layouts.full(entry.layout, entry.meta.size)

    def may_hold(self, entry: Entry, tier: Tier) -> bool:
        """Whether ``tier`` may hold the block: a durable block stays on the disk tiers."""
        return tier.is_disk or entry.meta.id not in self.durable

    # -- accounting (lock held) --------------------------------------------------------------

    def account_in(self, tier: Tier, entry: Entry, now: float, *, prefetched: bool = False) -> None:
        """The block is now in ``tier`` (``prefetched``: promoted ahead of its read, which the
        index keeps apart and evicts last until the read comes)."""
        meta = entry.meta
        meta.tier = tier.name
        meta.compression = tier.backend.codec(entry.handle)
        tier.used += meta.size
        tier.blocks += 1
        tier.stored += tier.backend.stored_bytes(entry.handle)
        tier.index.add(meta, now, prefetched=prefetched)

    def account_out(self, tier: Tier, entry: Entry) -> None:
        """The block leaves ``tier``."""
        meta = entry.meta
        tier.index.remove(meta)
        tier.used -= meta.size
        tier.blocks -= 1
        tier.stored -= tier.backend.stored_bytes(entry.handle)
        if tier.capacity > tier.target:
            tier.capacity = max(tier.target, tier.used)

    def drop(self, entry: Entry, tier: Tier) -> list[Free]:
        """Remove a deleted or replaced block; returns what to free now."""
        self.account_out(tier, entry)
        return self.retire(entry, tier, entry.handle)

    def retire(self, entry: Entry, tier: Tier, handle: Any) -> list[Free]:
        """An old copy is no longer the block's; free it now or after the readers."""
        if entry.meta.readers == 0:
            return [(tier, handle)]
        self.deferred.setdefault(entry, []).append((tier, handle))
        return []

    def release(self, entry: Entry) -> list[Free]:
        """A reader is done; the last one gets what was retired meanwhile, to free."""
        entry.meta.readers -= 1
        if entry.meta.readers == 0 and self.deferred:
            return self.deferred.pop(entry, [])
        return []

    def page(self, tier: str | None, offset: int, limit: int) -> tuple[list[Entry], int]:
        """A page of blocks (insertion order; of ``tier`` only if given) and how many there
        are in all."""
        if tier is None:
            chosen: Iterable[Entry] = self.blocks.values()
            total = len(self.blocks)
        else:
            matching = [e for e in self.blocks.values() if e.meta.tier == tier]
            chosen, total = matching, len(matching)
        return list(itertools.islice(chosen, offset, offset + limit)), total

    def describe(self, entry: Entry, hotness: float) -> dict[str, Any]:
        """One block's metadata as the API shows it."""
        meta = entry.meta
        layout = self.layout(entry)
        return {
            "id": meta.id,
            "size": meta.size,
            "tier": meta.tier,
            "pinned": meta.pinned,
            "priority": meta.priority,
            "hint": meta.hint,
            "kind": layout.kind.value,
            "dtype": layout.dtype,
            "shape": list(layout.shape),
            "compression": meta.compression,
            "hotness": hotness,
        }

    # -- snapshots for the planner (lock held) -----------------------------------------------

    def tier_states(
        self,
        needs: Mapping[str, int] | None = None,
        now: float = 0.0,
        scorer: HotnessModel | None = None,
    ) -> list[TierState]:
        """Frozen tiers. A tier named in ``needs`` carries its eviction index's victims for
        that many bytes (scored by ``scorer`` if given); the tiers below it carry victims
        enough to take in those (cascades), when they lack the room."""
        needs = needs or {}
        states: list[TierState] = []
        incoming = 0
        for tier in self.tiers:
            need = needs.get(tier.name, 0)
            if incoming > tier.free:
                need = max(need, tier.need(incoming))
            chosen = tier.index.victims(need, now) if need > 0 and tier.lower else []
            score = scorer.score if scorer is not None and tier.name in needs else None
            victims = tuple(
                Candidate(v.id, v.size, score(v, now) if score is not None else 0.0) for v in chosen
            )
            incoming += sum(v.size for v in chosen)
            spec = tier.spec
            states.append(
                TierState(
                    tier.name,
                    spec.latency,
                    tier.target,
                    tier.used,
                    spec.pressure_high,
                    spec.pressure_low,
                    tier.is_disk,
                    victims,
                )
            )
        return states

    def block_views(
        self,
        keep: Callable[[Entry, Tier], bool],
        score: Callable[[BlockMeta], float],
        entries: Iterable[Entry] | None = None,
    ) -> list[BlockView]:
        """Frozen views of the blocks ``keep`` accepts, scored by ``score``."""
        by_name = self.by_name
        views: list[BlockView] = []
        for entry in self.blocks.values() if entries is None else entries:
            meta = entry.meta
            if keep(entry, by_name[meta.tier]):
                views.append(BlockView(meta.id, meta.size, meta.tier, score(meta)))
        return views


def tier_stats(tier: Tier) -> dict[str, Any]:
    """One tier's figures as ``stats()`` shows them."""
    ratio = tier.used / tier.stored if tier.stored else 1.0
    return {
        "name": tier.name,
        "latency": tier.spec.latency,
        "capacity_bytes": tier.capacity,
        "target_capacity_bytes": tier.target,
        "used_bytes": tier.used,
        "free_bytes": tier.free,
        "blocks": tier.blocks,
        "pressure": round(tier.used / tier.capacity, 6) if tier.capacity else 0.0,
        "stored_bytes": tier.stored,
        "compression_ratio": round(ratio, 6),
        "hits": tier.hits,
        "path": str(tier.spec.path) if tier.spec.path else None,
        "devices": list(tier.spec.devices),
    }
