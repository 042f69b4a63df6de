"""VRAMancer memory: the tiered block store (L1–L6) and its policies.

``TieredStore`` (``rt.memory``) holds the blocks; ``policy`` has the pure hotness, placement,
eviction and prefetch policies; ``compression`` the codecs; ``tiers`` the tier names and budgets.
Names are imported lazily so that ``vramancer.config`` can import ``memory.settings`` without
pulling the store (and the device layer) in.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vramancer.memory.backends import DataKind
    from vramancer.memory.compression import CorruptBlock
    from vramancer.memory.fastpath import FastInterface, LocalCopyInterface
    from vramancer.memory.settings import MemorySettings, TierSettings
    from vramancer.memory.store import BlockTooLarge, StorePolicy, TieredStore
    from vramancer.memory.tiers import TierName

_EXPORTS = {
    "TieredStore": "vramancer.memory.store",
    "BlockTooLarge": "vramancer.memory.store",
    "StorePolicy": "vramancer.memory.store",
    "TierName": "vramancer.memory.tiers",
    "DataKind": "vramancer.memory.backends",
    "CorruptBlock": "vramancer.memory.compression",
    "FastInterface": "vramancer.memory.fastpath",
    "LocalCopyInterface": "vramancer.memory.fastpath",
    "MemorySettings": "vramancer.memory.settings",
    "TierSettings": "vramancer.memory.settings",
}

__all__ = [
    "BlockTooLarge",
    "CorruptBlock",
    "DataKind",
    "FastInterface",
    "LocalCopyInterface",
    "MemorySettings",
    "StorePolicy",
    "TierName",
    "TierSettings",
    "TieredStore",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vramancer.memory' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
