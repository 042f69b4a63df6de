"""Who holds what on a GPU: used (driver), reserved (ours), external, and the holder list."""

from __future__ import annotations

from vramancer.devices.holders import (
    UNATTRIBUTED,
    GpuHolders,
    Holder,
    HolderKind,
    Reservation,
    external_bytes,
    gpu_holders,
    holders_by_gpu,
)
from vramancer.devices.types import DeviceVendor, GpuProcess, GpuSnapshot

GIB = 1024**3


def gpu(index: int, *, used: int, total: int = 24 * GIB, processes=()) -> GpuSnapshot:
    return GpuSnapshot(
        index=index,
        uuid=f"GPU-{index}",
        name="Test GPU",
        vendor=DeviceVendor.NVIDIA,
        memory_total_bytes=total,
        memory_used_bytes=used,
        memory_free_bytes=total - used,
        processes=tuple(processes),
    )


def model(name: str, size: int, device: str = "gpu:0", since: float = 100.0) -> Reservation:
    return Reservation(device, Holder(HolderKind.MODEL, name, name, None, size, since))


def task(task_id: str, size: int, pid: int, device: str = "gpu:0") -> Reservation:
    holder = Holder(HolderKind.TASK, task_id, "cmd: train.py", "local", size, 200.0, pid)
    return Reservation(device, holder, frozenset({pid, pid + 1}))


def test_external_is_used_less_reserved_never_negative():
    assert external_bytes(10 * GIB, 6 * GIB) == 4 * GIB
    assert external_bytes(1 * GIB, 6 * GIB) == 0


def test_a_task_a_model_and_an_outside_process_each_show_with_their_bytes():
    snap = gpu(
        0,
        used=15 * GIB,
        processes=[
            GpuProcess(pid=500, used_memory_bytes=5 * GIB, name="trainer"),  # the task's pid
            GpuProcess(pid=501, used_memory_bytes=1 * GIB, name="python"),  # its child
            GpuProcess(pid=900, used_memory_bytes=2 * GIB, name="blender"),
        ],
    )
    result = gpu_holders(snap, [task("ab12cd34", 6 * GIB, 500), model("qwen", 7 * GIB)])
    assert result == GpuHolders(
        index=0,
        memory_total_bytes=24 * GIB,
        memory_used_bytes=15 * GIB,
        memory_reserved_bytes=13 * GIB,
        memory_external_bytes=2 * GIB,
        holders=(
            Holder(HolderKind.MODEL, "qwen", "qwen", None, 7 * GIB, 100.0),
            Holder(HolderKind.TASK, "ab12cd34", "cmd: train.py", "local", 6 * GIB, 200.0, 500),
            Holder(HolderKind.EXTERNAL, "pid:900", "blender", None, 2 * GIB, None, 900),
        ),
    )
    assert result.device == "gpu:0"


def test_external_memory_no_process_explains_is_one_unattributed_holder():
    result = gpu_holders(gpu(0, used=8 * GIB), [model("clip", 2 * GIB)])
    assert result.memory_external_bytes == 6 * GIB
    assert [h.as_dict() for h in result.holders] == [
        {
            "kind": "external",
            "id": UNATTRIBUTED,
            "name": "in use outside VRAMancer, not reported per process",
            "owner": None,
            "bytes": 6 * GIB,
            "since": None,
            "pid": None,
        },
        {
            "kind": "model",
            "id": "clip",
            "name": "clip",
            "owner": None,
            "bytes": 2 * GIB,
            "since": 100.0,
            "pid": None,
        },
    ]


def test_a_listed_process_covers_its_part_and_the_rest_is_unattributed():
    snap = gpu(0, used=3 * GIB, processes=[GpuProcess(pid=7, used_memory_bytes=GIB, name=None)])
    result = gpu_holders(snap, [])
    assert [(h.kind, h.id, h.name, h.bytes) for h in result.holders] == [
        (HolderKind.EXTERNAL, UNATTRIBUTED, result.holders[0].name, 2 * GIB),
        (HolderKind.EXTERNAL, "pid:7", "pid 7", GIB),
    ]


def test_a_reservation_the_driver_does_not_see_yet_is_reserved_and_nothing_is_external():
    result = gpu_holders(gpu(0, used=0), [task("t1", 6 * GIB, 42)])
    assert (result.memory_used_bytes, result.memory_reserved_bytes) == (0, 6 * GIB)
    assert result.memory_external_bytes == 0
    assert [h.id for h in result.holders] == ["t1"]


def test_our_own_processes_are_never_external():
    snap = gpu(0, used=4 * GIB, processes=[GpuProcess(pid=1, used_memory_bytes=4 * GIB)])
    result = gpu_holders(snap, [model("m", 4 * GIB)], our_pids=frozenset({1}))
    assert result.memory_external_bytes == 0
    assert [h.kind for h in result.holders] == [HolderKind.MODEL]


def test_reservations_count_on_their_own_gpu_only_and_ties_sort_ours_first():
    gpus = [gpu(0, used=3 * GIB), gpu(1, used=GIB)]
    allocation = Reservation(
        "gpu:1", Holder(HolderKind.ALLOCATION, "alloc-3", "image (normal)", "comfy", GIB, 5.0)
    )
    result = holders_by_gpu(gpus, [model("a", GIB), allocation, model("b", GIB)])
    assert [h.id for h in result[0].holders] == ["a", "b", UNATTRIBUTED]
    assert result[0].memory_reserved_bytes == 2 * GIB
    assert result[1].holders == (allocation.holder,)
    assert result[1].as_dict()["memory_external_bytes"] == 0
