"""Who holds what on each GPU: a pure function of a device snapshot and our reservations.

Three numbers per GPU, one rule each:

* ``memory_used_bytes``: what the driver reports in use (every process, ours or not);
* ``memory_reserved_bytes``: what VRAMancer has reserved there: the arbiter's allocations naming
  the GPU (resident models, running tasks' ``vram``, allocations asked over the API);
* ``memory_external_bytes``: ``max(0, used - reserved)``, memory the driver reports in use that
  no VRAMancer reservation explains (another program, a driver context). The arbiter never
  grants it (see ``arbiter/budget.py``).

``holders`` lists each reservation (kind ``model``, ``task`` or ``allocation``) and each GPU
process the driver reports that is not ours (kind ``external``); external memory no listed
process accounts for shows as one ``external`` holder with id ``unattributed``. Sorted by bytes,
largest first. No I/O here: the runtime gathers the reservations, this module decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from vramancer.devices.ids import gpu_name
from vramancer.devices.types import GpuProcess, GpuSnapshot

#: ``id`` of the holder that stands for external memory no reported process accounts for.
UNATTRIBUTED = "unattributed"


class HolderKind(StrEnum):
    """What holds memory on a GPU."""

    #: A managed model resident on the GPU (its arbiter booking).
    MODEL = "model"
    #: A running task's ``vram`` reservation.
    TASK = "task"
    #: An allocation asked over the API (``POST /v1/allocations``) or by a library user.
    ALLOCATION = "allocation"
    #: Memory used outside VRAMancer: another program's process, or unattributed.
    EXTERNAL = "external"


#: Order of kinds among holders of equal size (ours first).
_KIND_ORDER = {HolderKind.MODEL: 0, HolderKind.TASK: 1, HolderKind.ALLOCATION: 2}


def external_bytes(used_bytes: int, reserved_bytes: int) -> int:
    """Driver-used memory no VRAMancer reservation explains: ``max(0, used - reserved)``."""
    return max(0, used_bytes - reserved_bytes)


@dataclass(frozen=True, slots=True)
class Holder:
    """One holder of memory on a GPU. ``since`` is wall-clock (Unix seconds)."""

    kind: HolderKind
    id: str
    name: str
    owner: str | None
    bytes: int
    since: float | None = None
    pid: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "id": self.id,
            "name": self.name,
            "owner": self.owner,
            "bytes": self.bytes,
            "since": self.since,
            "pid": self.pid,
        }


@dataclass(frozen=True, slots=True)
class Reservation:
    """One of our reservations on a GPU (``device``: ``gpu:N``) and the processes it owns
    (``pids``: their GPU memory is this reservation's, never external)."""

    device: str
    holder: Holder
    pids: frozenset[int] = frozenset()


@dataclass(frozen=True, slots=True)
class GpuHolders:
    """One GPU's memory split: used (driver), reserved (ours), external, and the holders."""

    index: int
    memory_total_bytes: int
    memory_used_bytes: int
    memory_reserved_bytes: int
    memory_external_bytes: int
    holders: tuple[Holder, ...] = ()

    @property
    def device(self) -> str:
        return gpu_name(self.index)

    def as_dict(self) -> dict[str, Any]:
        """The fields ``GET /v1/devices`` adds to each GPU."""
        return {
            "memory_reserved_bytes": self.memory_reserved_bytes,
            "memory_external_bytes": self.memory_external_bytes,
            "holders": [h.as_dict() for h in self.holders],
        }


def _sort_key(holder: Holder) -> tuple[int, int, str]:
    return (-holder.bytes, _KIND_ORDER.get(holder.kind, 3), holder.id)


def _external_process(process: GpuProcess) -> Holder:
    return Holder(
        kind=HolderKind.EXTERNAL,
        id=f"pid:{process.pid}",
        name=process.name or f"pid {process.pid}",
        owner=None,
        bytes=process.used_memory_bytes or 0,
        pid=process.pid,
    )


def gpu_holders(
    gpu: GpuSnapshot,
    reservations: Iterable[Reservation],
    *,
    our_pids: frozenset[int] = frozenset(),
) -> GpuHolders:
    """Split ``gpu``'s memory among ``reservations`` (those naming it count) and the rest.

    ``our_pids``: processes of VRAMancer itself (the daemon, a model server it drives) whose
    GPU memory is accounted by its reservations, so never listed as external.
    """
    name = gpu_name(gpu.index)
    mine = [r for r in reservations if r.device == name]
    reserved = sum(r.holder.bytes for r in mine)
    external = external_bytes(gpu.memory_used_bytes, reserved)
    ours = set(our_pids)
    for r in mine:
        ours |= r.pids
        if r.holder.pid is not None:
            ours.add(r.holder.pid)
    outsiders = [_external_process(p) for p in gpu.processes if p.pid not in ours]
    listed = sum(h.bytes for h in outsiders)
    holders = [r.holder for r in mine] + outsiders
    if external > listed:
        holders.append(
            Holder(
                kind=HolderKind.EXTERNAL,
                id=UNATTRIBUTED,
                name="in use outside VRAMancer, not reported per process",
                owner=None,
                bytes=external - listed,
            )
        )
    return GpuHolders(
        index=gpu.index,
        memory_total_bytes=gpu.memory_total_bytes,
        memory_used_bytes=gpu.memory_used_bytes,
        memory_reserved_bytes=reserved,
        memory_external_bytes=external,
        holders=tuple(sorted(holders, key=_sort_key)),
    )


def holders_by_gpu(
    gpus: Sequence[GpuSnapshot],
    reservations: Sequence[Reservation],
    *,
    our_pids: frozenset[int] = frozenset(),
) -> dict[int, GpuHolders]:
    """:func:`gpu_holders` for every GPU, by VRAMancer index."""
    return {g.index: gpu_holders(g, reservations, our_pids=our_pids) for g in gpus}
