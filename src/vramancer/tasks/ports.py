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
* pool (optional, ``pool/``): the pool of machines this daemon schedules over: the views of
  every live node's GPUs, whether this daemon holds the dispatch lease, handing a leased task to
  its node, the GPUs and nodes a submission may name, and another node's logs;
* releases (optional, ``release/``): ``checkout(name)``, the real directory of the release a
  task names (``current``, ``candidate`` or a release), resolved when the task starts
  (``NotFound`` when there is none);
* models (optional): ``names()`` (the managed models, to refuse an unknown ``model`` at submit)
  and ``use(name)``, an async context manager that loads the model on demand and holds it
  against the idle reaper and eviction until it exits (``ModelManager.use``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

from vramancer.arbiter.types import Allocation, AllocationRequest
from vramancer.devices.ids import DeviceId
from vramancer.devices.types import SystemSnapshot
from vramancer.tasks.model import TaskRecord
from vramancer.tasks.picker import DeviceView


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

    def allocations(self) -> list[Allocation]: ...

    @property
    def budget(self) -> BudgetView: ...


class MemoryPort(Protocol):
    def warmup(self, max_blocks: int) -> int | Awaitable[int]: ...

    def compress_cold(self, max_blocks: int) -> int | Awaitable[int]: ...

    def maintain(self) -> Awaitable[None] | None: ...


class ReleasesPort(Protocol):
    def checkout(self, name: str) -> Path: ...


class ModelsPort(Protocol):
    def names(self) -> list[str]: ...

    def use(self, name: str) -> AbstractAsyncContextManager[Any]: ...


class PoolGpu(Protocol):
    """A GPU of a live node, as admission sees it."""

    @property
    def node(self) -> str: ...

    @property
    def index(self) -> int: ...

    @property
    def grantable_total_bytes(self) -> int:
        """The most a task could ever be granted there (memory, bounded by its budget)."""
        ...


class PoolPort(Protocol):
    #: This node's name.
    node: str

    def views(self, now: float) -> list[DeviceView]:
        """Every live (``up``) node's GPUs as the picker sees them (``NODE/gpu:N``), with the
        slots and VRAM of the tasks leased to them counted."""
        ...

    def may_dispatch(self) -> bool:
        """This daemon holds the pool's dispatch lease (only one orchestrator dispatches)."""
        ...

    def may_take_back(self) -> bool:
        """Leases that ran out may be taken back now: this daemon dispatches and has been
        connected for a lease period (after an outage the nodes were cut off too: they get
        that long to renew what they hold and record what ended)."""
        ...

    async def launch(self, record: TaskRecord) -> bool:
        """Hand a task leased to a node over to that node; False when it could not be sent
        (its lease then runs out and it is queued again)."""
        ...

    def gpus(self) -> Sequence[PoolGpu]:
        """The GPUs of the live nodes (admission: a task must fit one)."""
        ...

    def node_problem(self, node: str) -> str | None:
        """Why a task cannot be pinned to ``node`` (unknown, down), or None."""
        ...

    async def logs(self, record: TaskRecord, query: Mapping[str, Any]) -> dict[str, Any]:
        """The logs of an attempt that ran on another node (``TaskService.logs``'s answer)."""
        ...
