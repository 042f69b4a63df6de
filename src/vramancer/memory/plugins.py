"""Extensions of the store loaded from configuration: ``[memory]`` keys naming an object by
its dotted path ``package.module:attr``.

* ``placement_strategy``: an ``OrchestratorStrategy`` (only ``place(block, tiers, now)`` is
  required; ``observe_put`` / ``observe_first_read`` are fed to it when it has them);
* ``hotness_model``: a ``HotnessModel`` (``record_hit``, ``score``): the score promotions,
  warmup, compression and spill decide by (the eviction index keeps its own ranking);
* ``compression_manager``: a ``CompressionManager`` for the block files of L5/L6.

Each is loaded by the kernel's :func:`vramancer.plugins.load_object` (the same rules for every
extension point).
"""

from __future__ import annotations

import dataclasses

from vramancer.memory.compression import CompressionManager
from vramancer.memory.policy import PolicyBundle, PromotionPolicy, default_policy
from vramancer.memory.settings import MemorySettings
from vramancer.plugins import load_object

__all__ = ["load_compression", "load_object", "load_policy"]


def load_policy(settings: MemorySettings) -> PolicyBundle:
    """The default policy, with the placement strategy and hotness model the settings name."""
    bundle = default_policy(settings)
    if settings.placement_strategy:
        placement = load_object(
            settings.placement_strategy, method="place", key="memory.placement_strategy"
        )
        bundle = dataclasses.replace(bundle, placement=placement)
    if settings.hotness_model:
        model = load_object(settings.hotness_model, method="score", key="memory.hotness_model")
        bundle = dataclasses.replace(
            bundle, scorer=model, promotion=PromotionPolicy(model, bundle.config)
        )
    return bundle


def load_compression(settings: MemorySettings) -> CompressionManager | None:
    """The compression manager the settings name (None: the store's default)."""
    if not settings.compression_manager:
        return None
    manager: CompressionManager = load_object(
        settings.compression_manager, method="compress", key="memory.compression_manager"
    )
    return manager
