"""The records the memory policies read: a block's metadata and a tier's state at decision time.

The store owns and mutates :class:`BlockMeta` under its lock; the policies (``hotness.py``,
``eviction_index.py``, ``placement.py``, ``promotion.py``) only read it, except the hit count and
the index slot, which the hotness model and the eviction index keep up to date.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class BlockMeta:
    """Metadata of one block, owned and mutated by the store under its lock (data is elsewhere).

    Slots keep it small: a million blocks must fit in well under 500 bytes each.
    """

    id: str
    size: int
    tier: str
    priority: int = 0
    pinned: bool = False
    hint: str | None = None
    #: Decayed hit count (LFU part), valid at ``last_access``. 0 means never read.
    hits: float = 0.0
    #: Monotonic time of the last access (LRU part); the store sets it to ``created`` on put.
    last_access: float = 0.0
    created: float = 0.0
    #: Codec of the stored bytes on L5/L6 (``none``, ``zstd``, ...).
    compression: str = "none"
    #: Readers currently holding the block; a block being read is never freed.
    readers: int = 0
    #: Opaque slot for the eviction index (heap entry, window marker ...). Only the index that
    #: holds the block touches it; ``None`` when the block is in no index.
    index_slot: object | None = field(default=None, repr=False)

    def __lt__(self, other: BlockMeta) -> bool:
        """Tie-break for heap entries with equal keys (never compared otherwise)."""
        return self.id < other.id


@dataclass(frozen=True, slots=True)
class TierView:
    """What placement needs to know about a tier, frozen at decision time."""

    name: str
    latency: float
    capacity_bytes: int
    used_bytes: int
    #: The tier's own watermarks (``[memory.tiers.X]`` overrides); None: the policy's.
    pressure_high: float | None = None
    pressure_low: float | None = None

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes)

    @property
    def pressure(self) -> float:
        return self.used_bytes / self.capacity_bytes if self.capacity_bytes else 1.0
