"""The reservations behind ``GET /v1/devices``' holders: the arbiter's allocations, told apart
by owner (``model:NAME``, ``task:ID``, anything else an allocation asked over the API), with
what the task service knows of its running tasks (submitter, start, process group).

The split itself is the pure ``devices.holders.gpu_holders``; this module only gathers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from vramancer.arbiter.types import Allocation
from vramancer.devices.holders import GpuHolders, Holder, HolderKind, Reservation
from vramancer.devices.types import SystemSnapshot
from vramancer.observability.metrics import Metrics
from vramancer.tasks.workers import Active

MODEL_PREFIX = "model:"
TASK_PREFIX = "task:"


#: The longest task label in a holder list (the command's start).
LABEL_MAX = 80


def task_label(active: Active) -> str:
    """A task's name in a holder list: ``TYPE: what it runs`` (its command, shell line, the
    first line of its Python code, or its model), as the task list shows it. Only the task's
    owner and admins may read its code: the API shows others :func:`hidden_label`."""
    record = active.record
    spec = record.spec
    cmd = spec.get("cmd")
    what = " ".join(str(c) for c in cmd) if isinstance(cmd, list) else None
    what = what or spec.get("shell") or spec.get("python") or spec.get("model")
    if not isinstance(what, str) or not what.strip():
        return record.type.value
    line = what.strip().splitlines()[0]
    if len(line) > LABEL_MAX:
        line = line[: LABEL_MAX - 1] + "…"
    return f"{record.type.value}: {line}"


def hidden_label(label: str) -> str:
    """A task's label without what it runs (``cmd: train.py`` → ``cmd task``)."""
    return f"{label.partition(':')[0]} task"


def _group_pids(snapshot: SystemSnapshot, pgid: int | None) -> frozenset[int]:
    """GPU processes in the process group ``pgid`` (a task and its children)."""
    if pgid is None:
        return frozenset()
    found = {pgid}
    for gpu in snapshot.gpus:
        for proc in gpu.processes:
            try:
                if os.getpgid(proc.pid) == pgid:
                    found.add(proc.pid)
            except OSError:
                continue
    return frozenset(found)


def _reservation(
    allocation: Allocation, tasks: Mapping[str, Active], snapshot: SystemSnapshot
) -> Reservation | None:
    device = allocation.device
    if device is None:
        return None
    owner = allocation.owner or ""
    since = allocation.created_at or None
    if owner.startswith(MODEL_PREFIX):
        name = owner.removeprefix(MODEL_PREFIX)
        holder = Holder(HolderKind.MODEL, name, name, None, allocation.memory_bytes, since)
        return Reservation(device, holder)
    if owner.startswith(TASK_PREFIX):
        task_id = owner.removeprefix(TASK_PREFIX)
        active = tasks.get(task_id)
        if active is None:
            holder = Holder(HolderKind.TASK, task_id, "task", None, allocation.memory_bytes, since)
            return Reservation(device, holder)
        record = active.record
        holder = Holder(
            HolderKind.TASK,
            task_id,
            task_label(active),
            record.owner,
            allocation.memory_bytes,
            since,
            active.pgid,
        )
        return Reservation(device, holder, _group_pids(snapshot, active.pgid))
    name = f"{allocation.workload_type.value} ({allocation.priority.value})"
    holder = Holder(
        HolderKind.ALLOCATION,
        allocation.id,
        name,
        allocation.owner,
        allocation.memory_bytes,
        since,
    )
    return Reservation(device, holder)


def reservations(
    allocations: Iterable[Allocation], tasks: Mapping[str, Active], snapshot: SystemSnapshot
) -> list[Reservation]:
    """Every allocation naming a GPU, as a holder (task details from ``tasks``, by id)."""
    out = []
    for allocation in allocations:
        found = _reservation(allocation, tasks, snapshot)
        if found is not None:
            out.append(found)
    return out


class HolderGauges:
    """``vramancer_gpu_memory_reserved_bytes`` and ``vramancer_gpu_memory_external_bytes``,
    labelled like the other per-GPU gauges (``backend``, ``device`` = the GPU's UUID,
    ``node``)."""

    def __init__(self, metrics: Metrics) -> None:
        labels = ("backend", "device", "node")
        self.node = metrics.node
        self.reserved = metrics.gauge(
            "gpu_memory_reserved_bytes",
            "GPU memory VRAMancer has reserved (models, tasks, allocations).",
            labels,
        )
        self.external = metrics.gauge(
            "gpu_memory_external_bytes",
            "GPU memory in use that no VRAMancer reservation explains (used - reserved, >= 0).",
            labels,
        )

    def export(self, snapshot: SystemSnapshot, split: Mapping[int, GpuHolders]) -> None:
        for gpu in snapshot.gpus:
            found = split.get(gpu.index)
            if found is None:
                continue
            labels = (gpu.vendor.value, gpu.uuid, self.node)
            self.reserved.labels(*labels).set(found.memory_reserved_bytes)
            self.external.labels(*labels).set(found.memory_external_bytes)


def process_pids(snapshot: SystemSnapshot, name_part: str) -> frozenset[int]:
    """GPU processes whose name contains ``name_part`` (a model server VRAMancer drives)."""
    return frozenset(
        p.pid
        for gpu in snapshot.gpus
        for p in gpu.processes
        if p.name is not None and name_part in p.name.lower()
    )
