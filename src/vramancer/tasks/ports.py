"""What the task service needs from the other subsystems, as Protocols.

The runtime passes the real ``DeviceManager``, ``Arbiter`` and ``TieredStore``; unit tests pass
small doubles. Only these calls are used:

* devices: ``snapshot() -> SystemSnapshot`` (the latest poll; never calls a driver);
* arbiter: ``allocate(AllocationRequest)`` (raises ``InsufficientMemory`` or another
  ``Conflict``), ``release_allocation(id)``, ``reserved_bytes(DeviceId | None) -> int``,
  ``headroom(DeviceId | None)``
  (bytes a request naming that GPU could be granted now without preempting anyone; the
  dispatcher's per-GPU room), ``budget`` (total and per ``gpu:N`` bytes it may grant);
* memory: ``warmup(max_blocks) -> int``, ``compress_cold(max_blocks) -> int`` and
  ``maintain()`` (maintenance tasks; plain or async; a store without ``maintain`` makes
  ``rebalance`` do nothing);
* models (optional): ``names()`` (the managed models, to refuse an unknown ``model`` at submit)
  and ``use(name)``, an async context manager that loads the model on demand and holds it
  against the idle reaper and eviction until it exits (``ModelManager.use``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from vramancer.arbiter.types import Allocation, AllocationRequest
from vramancer.devices.ids import DeviceId
from vramancer.devices.types import SystemSnapshot


class DevicesPort(Protocol):
    def snapshot(self) -> SystemSnapshot: ...


class BudgetView(Protocol):
    @property
    def total_bytes(self) -> int: ...

    @property
    def devices(self) -> Mapping[str, int]: ...


class ArbiterPort(Protocol):
    def allocate(self, request: AllocationRequest) -> Allocation: ...

    def release_allocation(self, allocation_id: str) -> Any: ...

    def reserved_bytes(self, device: DeviceId | None = ...) -> int: ...

    def headroom(self, device: DeviceId | None = ...) -> int: ...

    @property
    def budget(self) -> BudgetView: ...


class MemoryPort(Protocol):
    def warmup(self, max_blocks: int) -> int | Awaitable[int]: ...

    def compress_cold(self, max_blocks: int) -> int | Awaitable[int]: ...

    def maintain(self) -> Awaitable[None] | None: ...


class ModelsPort(Protocol):
    def names(self) -> list[str]: ...

    def use(self, name: str) -> AbstractAsyncContextManager[Any]: ...
