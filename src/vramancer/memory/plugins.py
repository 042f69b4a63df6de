"""Extensions of the store loaded from configuration: ``[memory]`` keys naming an object by
its dotted path ``package.module:attr``.

* ``placement_strategy``: an ``OrchestratorStrategy`` (only ``place(block, tiers, now)`` is
  required; ``observe_put`` / ``observe_first_read`` are fed to it when it has them);
* ``hotness_model``: a ``HotnessModel`` (``record_hit``, ``score``): the score promotions,
  warmup, compression and spill decide by (the eviction index keeps its own ranking);
* ``compression_manager``: a ``CompressionManager`` for the block files of L5/L6.

The object named is used as it is, except that a class is instantiated without arguments
and a plain function (without the protocol's method) is called without arguments to make it.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any

from vramancer.errors import InvalidInput
from vramancer.memory.compression import CompressionManager
from vramancer.memory.policy import PolicyBundle, PromotionPolicy, default_policy
from vramancer.memory.settings import MemorySettings

#: ``package.module:attr`` (the attribute may be dotted: ``module:Class.factory``).
DOTTED_PATH_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def load_object(path: str, *, method: str, key: str) -> Any:
    """The object ``path`` names (``package.module:attr``), made as the module docstring says;
    ``InvalidInput`` naming ``memory.<key>`` when it cannot be loaded or lacks ``method``."""
    if not DOTTED_PATH_RE.fullmatch(path):
        raise InvalidInput(f"memory.{key} must read package.module:attr (got {path!r})", field=key)
    module_name, _, attr = path.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as exc:
        raise InvalidInput(f"memory.{key}: cannot load {path!r} ({exc})", field=key) from exc
    if isinstance(found, type) or (callable(found) and not hasattr(found, method)):
        found = found()
    if not callable(getattr(found, method, None)):
        raise InvalidInput(f"memory.{key}: {path!r} has no {method}() method", field=key)
    return found


def load_policy(settings: MemorySettings) -> PolicyBundle:
    """The default policy, with the placement strategy and hotness model the settings name."""
    bundle = default_policy(settings)
    if settings.placement_strategy:
        placement = load_object(
            settings.placement_strategy, method="place", key="placement_strategy"
        )
        bundle = dataclasses.replace(bundle, placement=placement)
    if settings.hotness_model:
        model = load_object(settings.hotness_model, method="score", key="hotness_model")
        bundle = dataclasses.replace(
            bundle, scorer=model, promotion=PromotionPolicy(model, bundle.config)
        )
    return bundle


def load_compression(settings: MemorySettings) -> CompressionManager | None:
    """The compression manager the settings name (None: the store's default)."""
    if not settings.compression_manager:
        return None
    manager: CompressionManager = load_object(
        settings.compression_manager, method="compress", key="compression_manager"
    )
    return manager
