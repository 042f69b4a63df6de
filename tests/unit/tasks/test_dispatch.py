"""``RoundPlan``: one dispatch round as a pure plan (no queue, no processes)."""

from __future__ import annotations

from dataclasses import replace

from tests.unit.tasks.records import make_record

from vramancer.tasks.dispatch import WAITING, RoundPlan
from vramancer.tasks.model import Grant, TaskRecord, TaskState
from vramancer.tasks.picker import DeviceView, PickerPolicy

GIB = 1024**3


def gpu(index: int, total_gib: int, **kw: object) -> DeviceView:
    fields: dict[str, object] = {
        "device": f"gpu:{index}",
        "index": index,
        "total_bytes": total_gib * GIB,
        "free_bytes": total_gib * GIB,
        "grantable_bytes": total_gib * GIB,
        "utilization_ratio": 0.0,
        "temperature_celsius": 40.0,
        "cuda_index": index,
    }
    fields.update(kw)
    return DeviceView(**fields)  # type: ignore[arg-type]


def task(
    task_id: str, vram_gib: int = 0, state: TaskState = TaskState.QUEUED, gpu: int | None = None
) -> TaskRecord:
    return make_record(task_id=task_id, state=state, gpu=gpu, vram_bytes=vram_gib * GIB)


def test_tasks_that_fit_are_granted_in_turn_and_the_others_wait_with_a_reason() -> None:
    plan = RoundPlan([gpu(0, 24, slots=2), gpu(1, 8)], PickerPolicy())
    assert plan.free_slots == 3
    assert plan.offer(task("a", 20))
    assert not plan.offer(task("b", 10))  # 4 GiB left on gpu:0, gpu:1 too small
    # already waiting for another reason: its reason is rewritten (it never goes stale) ...
    assert not plan.offer(task("c", 10, TaskState.WAITING_GPU))
    assert plan.offer(task("d", 2))
    assert plan.grants == [Grant("a", "gpu:0"), Grant("d", "gpu:1")]
    assert plan.cuda == {"a": 0, "d": 1}
    assert [(t, s) for t, _, s in plan.waiting] == [
        ("b", TaskState.QUEUED),
        ("c", TaskState.WAITING_GPU),
    ]
    assert plan.waiting[0][1].startswith(WAITING + "gpu:0: needs 10.0 GiB, 4.0 GiB available")
    # ... and one already waiting for the same reason gets no new row
    small = RoundPlan([gpu(0, 8)], PickerPolicy())
    assert not small.offer(task("x", 10, TaskState.WAITING_GPU))
    same = replace(task("e", 10, TaskState.WAITING_GPU), error=small.waiting[0][1])
    assert not small.offer(same)
    assert [t for t, _, _ in small.waiting] == ["x"]
    assert plan.free_slots == 1
    assert plan.offered == {"a", "b", "c", "d"}


def test_an_overdue_task_that_fits_nowhere_holds_a_device_for_the_rest_of_the_round() -> None:
    # One task of ours holds 16 GiB (not yet seen by the driver): 8 GiB left, one slot left.
    busy = gpu(0, 24, slots=2, running=1, own_bytes=16 * GIB, unseen_bytes=16 * GIB)
    busy = replace(busy, grantable_bytes=8 * GIB)
    plan = RoundPlan([busy, gpu(1, 8)], PickerPolicy())
    assert not plan.offer(task("old", 20, TaskState.WAITING_GPU), overdue_after_s=600)
    assert plan.holding and plan.free_slots == 1  # gpu:0 held, gpu:1 still takes tasks
    (entry,) = plan.waiting
    assert entry[0] == "old" and entry[2] is TaskState.WAITING_GPU  # its reason is refreshed
    assert entry[1].endswith("(gpu:0 is held for it: it has waited over 600 s)")
    assert plan.offer(task("small", 4))
    assert plan.grants == [Grant("small", "gpu:1")]  # not the held gpu:0, though it had room
    assert not plan.offer(task("next", 4))
    assert "gpu:0: held for task old" in plan.waiting[-1][1]


def test_an_overdue_task_that_fits_is_simply_granted() -> None:
    plan = RoundPlan([gpu(0, 24)], PickerPolicy())
    assert plan.offer(task("old", 4), overdue_after_s=600)
    assert not plan.holding and plan.waiting == []
