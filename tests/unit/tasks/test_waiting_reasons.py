"""A task waiting for a GPU says why in detail, and the reason is recomputed from the state
now on every read: a released allocation, memory used outside VRAMancer, a task ending."""

from __future__ import annotations

from tests.unit.tasks.conftest import MakeHarness

from vramancer.arbiter.types import AllocationRequest, Priority, WorkloadType
from vramancer.devices.ids import DeviceId
from vramancer.tasks.model import TaskState

GIB = 1024**3
WAIT = "waiting for a device: gpu:0: "


async def test_the_waiting_reason_names_slots_reservations_and_external_memory_and_stays_fresh(
    make_harness: MakeHarness,
) -> None:
    """One 24 GiB GPU (the arbiter grants 21.6 GiB), one slot."""
    h = await make_harness(slots_per_device=1)
    comfy = h.arbiter.allocate(
        AllocationRequest(
            WorkloadType.IMAGE, Priority.HIGH, 10 * GIB, device=DeviceId.gpu(0), owner="comfy"
        )
    )
    first = await h.svc.submit({"type": "shell", "shell": "sleep 60", "vram": "4GiB"})
    await h.svc.run_once()
    assert await h.state(first.task_id) in (TaskState.SCHEDULED, TaskState.RUNNING)
    big = await h.svc.submit({"type": "shell", "shell": "sleep 60", "vram": "12GiB"})
    await h.svc.run_once()

    status = await h.svc.status(big.task_id)
    assert status.state is TaskState.WAITING_GPU
    assert status.error == (
        f"{WAIT}slots_per_device=1 taken by task {first.task_id}; needs 12.0 GiB, 7.6 GiB "
        "available after 2 reservations (14.0 GiB)"
    )
    assert status.as_dict()["waiting_reason"] == status.error

    # the allocation is given back: the next read says so, no dispatch round needed
    h.arbiter.release_allocation(comfy.id)
    status = await h.svc.status(big.task_id)
    assert status.error == f"{WAIT}slots_per_device=1 taken by task {first.task_id}"

    # another program takes 15 GiB of the GPU: 11 GiB of it is not explained by the 4 GiB task
    h.devices.set_simulated(0, used_bytes=15 * GIB)
    page = await h.svc.history(state=TaskState.WAITING_GPU)
    assert [(r.task_id, r.error) for r in page.tasks] == [
        (
            big.task_id,
            f"{WAIT}slots_per_device=1 taken by task {first.task_id}; needs 12.0 GiB, 5.0 GiB "
            "available after 1 reservation (4.0 GiB) and 11.0 GiB used outside VRAMancer",
        )
    ]

    # it leaves and the task ends: the big one starts
    h.devices.set_simulated(0, used_bytes=0)
    await h.svc.cancel(first.task_id)
    await h.svc.drain(timeout_s=10)
    await h.svc.run_once()
    started = await h.svc.status(big.task_id)
    assert started.state in (TaskState.SCHEDULED, TaskState.RUNNING)
    assert started.as_dict()["waiting_reason"] is None
    await h.svc.cancel(big.task_id)
    await h.svc.drain(timeout_s=10)
