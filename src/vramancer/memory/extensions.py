"""Extension points of the memory subsystem that other subsystems implement.

The store's own extension points live beside their defaults: ``OrchestratorStrategy`` in
``memory/placement.py``, ``HotnessModel`` in ``memory/hotness.py``, ``EvictionIndex`` in
``memory/eviction_index.py``, ``CompressionManager`` in ``memory/compression.py``,
``FastInterface`` in ``memory/fastpath.py``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class RuntimeEstimator(Protocol):
    """Seconds a task is expected to run (``estimate(task)``), kept for ``vramancer.memory``'s
    exports. The task scheduler does not use this one: its Protocol, with ``observe`` too, and
    the default (a moving average of past run times per command) are in ``tasks/estimator.py``.
    """

    def estimate(self, task: Any) -> float: ...
