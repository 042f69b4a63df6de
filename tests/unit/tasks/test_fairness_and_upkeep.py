"""Aging (no task passed forever), the lease-loss cap, retention, logs per attempt, maintenance
on a real memory store, and run-time estimates learned from real runs. Manual clock throughout:
waits are clock advances, not sleeps. Tests that advance the clock while our own tasks run use a
long ``lease_s``: no heartbeat loop runs here, and an expired lease would requeue them."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest
from tests.unit.tasks.conftest import MakeHarness

from vramancer.devices.types import SystemSnapshot
from vramancer.errors import InvalidInput, NotFound
from vramancer.tasks import service as service_module
from vramancer.tasks.model import Grant, TaskState
from vramancer.tasks.ports import DevicesPort

GIB = 1024**3
#: Longer than any clock advance here.
LONG_LEASE_S = 10**6


def _sleeper(vram: str, **extra: object) -> dict[str, object]:
    return {"type": "shell", "shell": "sleep 60", "vram": vram, "max_retries": 0, **extra}


async def _cancel_all(h: object) -> None:
    svc = h.svc  # type: ignore[attr-defined]
    for record in (await svc.history(limit=1000)).tasks:
        if not record.state.terminal:
            await svc.cancel(record.task_id)
    await svc.drain(timeout_s=10)


async def test_a_big_task_that_waited_too_long_gets_the_gpu_held_for_it(
    make_harness: MakeHarness,
) -> None:
    """One 24 GiB GPU (the arbiter grants 21.6 GiB), four slots. Small 4 GiB tasks keep it
    busy; a 16 GiB task waits. Before ``starvation_s`` small tasks pass it (they fit); after,
    the GPU is held for it: new small tasks wait, and once the running ones end it starts first.
    """
    h = await make_harness(slots_per_device=4, starvation_s=600, lease_s=LONG_LEASE_S)
    small = [await h.svc.submit(_sleeper("4GiB")) for _ in range(3)]
    await h.svc.run_once()
    big = await h.svc.submit(_sleeper("16GiB"))
    passer = await h.svc.submit(_sleeper("4GiB"))
    await h.svc.run_once()
    assert await h.state(big.task_id) is TaskState.WAITING_GPU
    assert await h.state(passer.task_id) in (TaskState.SCHEDULED, TaskState.RUNNING)

    h.clock.advance(601)
    h.refresh()
    await h.svc.cancel(passer.task_id)  # a slot and 4 GiB free up: the small one behind fits
    await h.svc.drain(timeout_s=10)
    blocked = await h.svc.submit(_sleeper("4GiB"))
    await h.svc.run_once()
    assert await h.state(blocked.task_id) is TaskState.WAITING_GPU
    why = (await h.svc.status(blocked.task_id)).error
    assert (
        why == f"waiting for a device: gpu:0: held for task {big.task_id}, which has waited longest"
    )
    reason = (await h.svc.status(big.task_id)).error
    assert reason is not None and reason.endswith(
        "(gpu:0 is held for it: it has waited over 600 s)"
    )

    for sub in small:  # the running tasks end
        await h.svc.cancel(sub.task_id)
    await h.svc.drain(timeout_s=10)
    await h.svc.run_once()
    assert await h.state(big.task_id) in (TaskState.SCHEDULED, TaskState.RUNNING)
    # The small one starts beside it (5.6 GiB left, slots free): the hold ended with the wait.
    assert await h.state(blocked.task_id) in (TaskState.SCHEDULED, TaskState.RUNNING)
    await _cancel_all(h)


async def test_a_gpu_is_not_held_when_draining_it_would_not_help(
    make_harness: MakeHarness,
) -> None:
    """Someone else uses 20 GiB of the GPU: even with none of our tasks there, the 16 GiB task
    cannot fit, so holding the GPU would only idle it. Small tasks keep running."""
    h = await make_harness(slots_per_device=4, starvation_s=600, lease_s=LONG_LEASE_S)
    h.devices.set_simulated(0, used_bytes=20 * GIB)
    big = await h.svc.submit(_sleeper("16GiB"))
    h.clock.advance(601)
    h.refresh()
    small = await h.svc.submit(_sleeper("1GiB"))
    await h.svc.run_once()
    assert await h.state(small.task_id) in (TaskState.SCHEDULED, TaskState.RUNNING)
    record = await h.svc.status(big.task_id)
    assert record.state is TaskState.WAITING_GPU
    assert record.error is not None and "held" not in record.error
    await _cancel_all(h)


@pytest.mark.parametrize(("starvation_s", "first"), [(600.0, "old"), (0.0, "fresh-1")])
async def test_aging_lets_a_long_waiting_low_priority_task_go_first(
    make_harness: MakeHarness, tmp_path: Path, starvation_s: float, first: str
) -> None:
    """A background task behind a stream of normal ones: once it has waited ``starvation_s`` it
    runs before them; with aging off (0) it keeps its place at the end."""
    h = await make_harness(gpus=[], host_slots=1, starvation_s=starvation_s)
    out = tmp_path / "order.txt"

    def append(word: str, priority: str = "normal") -> dict[str, object]:
        return {"type": "shell", "shell": f"echo {word} >> {out}", "priority": priority}

    await h.svc.submit(append("old", "background"))
    h.clock.advance(700)
    h.refresh()
    for i in range(1, 4):
        await h.svc.submit(append(f"fresh-{i}"))
    await h.svc.run_until_idle()
    order = out.read_text().split()
    assert order[0] == first
    assert sorted(order) == ["fresh-1", "fresh-2", "fresh-3", "old"]


async def test_a_task_that_keeps_killing_the_daemon_ends_failed(make_harness: MakeHarness) -> None:
    """Each start-up takes back the leases of the dead daemon; the second loss fails the task."""
    h = await make_harness(max_lease_losses=2)
    sub = await h.svc.submit({"type": "cmd", "cmd": ["true"]})
    data_dir = h.data_dir
    for expected in (TaskState.QUEUED, TaskState.FAILED):
        await h.svc.queue.lease(
            [Grant(sub.task_id, "gpu:0")], worker="dead:1", now=h.clock.time(), lease_s=30
        )
        await h.svc.stop()
        h = await make_harness(data_dir=data_dir, max_lease_losses=2)
        assert await h.state(sub.task_id) is expected
    record = await h.svc.status(sub.task_id)
    assert (record.attempts, record.lease_losses) == (2, 2)
    assert record.error is not None and record.error.startswith("lease lost 2 times")
    assert h.metric("vramancer_tasks_failed_total", type="cmd") == 1
    await h.svc.run_until_idle()
    assert await h.state(sub.task_id) is TaskState.FAILED  # never run again


async def test_ended_tasks_and_their_logs_are_deleted_after_the_retention(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(retention_s=4000)
    ended = await h.svc.submit({"type": "shell", "shell": "echo bye", "max_retries": 0})
    waiting = await h.svc.submit({"type": "cmd", "cmd": ["true"], "gpu": 0, "vram": "20GiB"})
    h.devices.set_simulated(0, used_bytes=23 * GIB)  # the second one can never start here
    await h.svc.run_until_idle()
    assert await h.state(ended.task_id) is TaskState.DONE
    log_file = h.data_dir / "task-logs" / ended.task_id[:2] / f"{ended.task_id}.1.stdout"
    assert log_file.read_text() == "bye\n"

    h.clock.advance(3700)  # the first purge ran at the first round; the next one is an hour on
    h.refresh()
    await h.svc.run_once()
    assert await h.state(ended.task_id) is TaskState.DONE  # ended 3,700 s ago: kept
    h.clock.advance(1300)
    h.refresh()
    await h.svc.run_once()
    assert await h.state(ended.task_id) is TaskState.DONE  # 5,000 s ago, but within the hour
    h.clock.advance(2400)
    h.refresh()
    await h.svc.run_once()
    with pytest.raises(NotFound):
        await h.svc.status(ended.task_id)
    assert not log_file.exists()
    assert await h.state(waiting.task_id) is TaskState.WAITING_GPU  # not ended: kept
    assert h.svc.counts()["done"] == 0 and h.svc.counts()["waiting_gpu"] == 1
    assert h.metric("vramancer_tasks_purged_total") == 1


async def test_a_purge_backlog_is_worked_off_in_batches_one_round_apart(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_module, "PURGE_BATCH", 2)
    h = await make_harness(retention_s=10)
    subs = await h.svc.submit_batch([{"type": "noop"}] * 5)
    await h.svc.run_until_idle()
    assert h.svc.counts()["done"] == 5
    h.clock.advance(3601)
    left = []
    for _ in range(4):
        await h.svc.run_once()
        left.append(h.svc.counts()["done"])
    assert left == [3, 1, 1, 1]  # 2, 2, then the newest row stays (seq is never reused)
    assert [await h.svc.queue.get(s.task_id) is None for s in subs] == [True] * 4 + [False]


async def test_retention_zero_keeps_everything(make_harness: MakeHarness) -> None:
    h = await make_harness(retention_s=0)
    subs = await h.svc.submit_batch([{"type": "noop"}] * 3)
    await h.svc.run_until_idle()
    h.clock.advance(10**8)
    await h.svc.run_once()
    assert [await h.state(s.task_id) for s in subs] == [TaskState.DONE] * 3


async def test_each_attempt_keeps_its_own_logs(make_harness: MakeHarness) -> None:
    h = await make_harness()
    n = "$VRM_TASK_ATTEMPT"
    script = f'echo "try {n}"; echo "err {n}" >&2; test {n} -ge 2'
    sub = await h.svc.submit({"type": "shell", "shell": script, "max_retries": 1})
    await h.svc.run_until_idle()
    assert await h.state(sub.task_id) is TaskState.RETRY
    h.clock.advance(5)
    h.refresh()
    await h.svc.run_until_idle()
    assert await h.state(sub.task_id) is TaskState.DONE
    latest = await h.svc.logs(sub.task_id)
    first = await h.svc.logs(sub.task_id, attempt=1)
    assert (latest["attempt"], latest["stdout"], latest["stderr"]) == (2, "try 2\n", "err 2\n")
    assert (first["attempt"], first["stdout"], first["stderr"]) == (1, "try 1\n", "err 1\n")
    partial = await h.svc.logs(sub.task_id, attempt=1, stdout_offset=4, max_bytes=1)
    assert (partial["stdout"], partial["stdout_next"], partial["truncated"]) == ("1", 5, True)
    for bad in (0, 3):
        with pytest.raises(InvalidInput, match="attempt must be between 1 and 2"):
            await h.svc.logs(sub.task_id, attempt=bad)


async def test_a_new_attempt_does_not_show_the_previous_attempts_output(
    make_harness: MakeHarness,
) -> None:
    """While attempt 2 has written nothing yet, its logs are empty, not attempt 1's tail."""
    h = await make_harness()
    sub = await h.svc.submit({"type": "shell", "shell": "echo one; exit 1", "max_retries": 1})
    await h.svc.run_until_idle()
    h.clock.advance(5)
    h.refresh()
    await h.svc.queue.promote_due(h.clock.time())
    leased, _ = await h.svc.queue.lease(
        [Grant(sub.task_id, "gpu:0")], worker="elsewhere:1", now=h.clock.time(), lease_s=30
    )
    assert leased[0].attempts == 2
    logs = await h.svc.logs(sub.task_id)
    assert (logs["attempt"], logs["stdout"], logs["stdout_next"]) == (2, "", 0)
    assert (await h.svc.logs(sub.task_id, attempt=1))["stdout"] == "one\n"


async def test_maintenance_moves_real_blocks_only_in_an_idle_window(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(store=True, maintenance_idle_s=30, lease_s=LONG_LEASE_S)
    store = h.store
    assert store is not None
    store.put("hot", os.urandom(3000))
    store.put("cold", os.urandom(3000))
    for name in ("hot", "cold"):
        store.demote(name, "L6")
    store.set_capacity("L5", 0)
    store.set_capacity("L4", 0)
    for _ in range(3):
        store.get("hot")  # no room above: it stays in L6, but it is hot now
    store.set_capacity("L4", 64 * 1024)
    store.set_capacity("L5", 256 * 1024)
    for i in range(3):
        store.put(f"z{i}", bytes(10_000))  # compressible, in L4

    user = await h.svc.submit({"type": "shell", "shell": "sleep 60"})
    warm = await h.svc.submit({"type": "warmup"})
    await h.svc.run_once()
    h.clock.advance(60)
    h.refresh()
    await h.svc.run_once()
    assert await h.state(warm.task_id) is TaskState.QUEUED  # a user task runs: not idle
    assert store.locate("hot") == "L6"
    await h.svc.cancel(user.task_id)
    await h.svc.drain(timeout_s=10)
    await h.svc.run_until_idle()
    h.clock.advance(29)
    h.refresh()
    await h.svc.run_until_idle()
    assert await h.state(warm.task_id) is TaskState.QUEUED  # idle for 29 s of 30
    h.clock.advance(1)
    h.refresh()
    await h.svc.run_until_idle()
    record = await h.svc.status(warm.task_id)
    assert (record.state, record.stdout_tail) == (TaskState.DONE, "warmed 1 block(s)")
    assert store.locate("hot") == "L4" and store.locate("cold") == "L6"

    h.clock.advance(600)  # the L4 blocks have cooled down
    h.refresh()
    comp = await h.svc.submit({"type": "compress", "payload": {"max_blocks": 2}})
    await h.svc.run_until_idle()
    record = await h.svc.status(comp.task_id)
    assert (record.state, record.stdout_tail) == (TaskState.DONE, "compressed 2 block(s)")
    moved = [b for b in ("z0", "z1", "z2") if store.locate(b) == "L5"]
    assert len(moved) == 2  # the codec (or raw) is the store's choice, by measured speed
    assert store.get(moved[0]) == bytes(10_000)


async def test_the_order_of_one_priority_follows_run_times_learned_from_real_runs(
    make_harness: MakeHarness, tmp_path: Path
) -> None:
    """Nothing is taught by hand: one real run of each command teaches the estimator; the same
    commands submitted again run shortest expected first, though the slow one comes first."""
    h = await make_harness(gpus=[], host_slots=1)
    out = tmp_path / "order.txt"
    marker = f"echo $VRM_TASK_ID >> {out}"
    slow = {"type": "shell", "shell": f"{marker}; sleep 0.4"}  # key "shell:echo $VRM_TASK_ID"
    fast = {"type": "cmd", "cmd": ["sh", "-c", marker]}  # key "cmd:sh -c"
    await h.svc.submit({**slow, "task_id": "slow-1"})
    await h.svc.submit({**fast, "task_id": "fast-1"})
    await h.svc.run_until_idle()
    assert out.read_text().split() == ["slow-1", "fast-1"]  # nothing known: submission order
    assert (await h.svc.status("slow-1")).estimate_s == 60.0  # [tasks] default_estimate_s
    out.unlink()
    await h.svc.submit({**slow, "task_id": "slow-2"})
    await h.svc.submit({**fast, "task_id": "fast-2"})
    slow_s = (await h.svc.status("slow-2")).estimate_s
    assert 0.4 <= slow_s < 60.0  # learned from the run, not the 60 s default
    assert (await h.svc.status("fast-2")).estimate_s < slow_s
    await h.svc.run_until_idle()
    assert out.read_text().split() == ["fast-2", "slow-2"]


class _BusyHost:
    """The real device manager's snapshot with the host CPU load set by the test."""

    def __init__(self, devices: DevicesPort, cpu: float) -> None:
        self.devices = devices
        self.cpu = cpu

    def snapshot(self) -> SystemSnapshot:
        snap = self.devices.snapshot()
        return replace(snap, host=replace(snap.host, cpu_utilization_ratio=self.cpu))


async def test_maintenance_waits_while_the_host_cpu_is_busy(make_harness: MakeHarness) -> None:
    h = await make_harness(maintenance_max_cpu_ratio=0.9, maintenance_idle_s=10)
    host = _BusyHost(h.devices, cpu=0.97)
    h.svc.devices = host
    noop = await h.svc.submit({"type": "noop"})
    for cpu in (0.97, 0.5, 0.95):  # idle since the 0.5 reading, then busy again: restarts
        host.cpu = cpu
        h.clock.advance(6)
        h.refresh()
        await h.svc.run_until_idle()
        assert await h.state(noop.task_id) is TaskState.QUEUED
    host.cpu = 0.9  # at the limit counts as idle
    await h.svc.run_until_idle()
    h.clock.advance(10)
    h.refresh()
    await h.svc.run_until_idle()
    assert await h.state(noop.task_id) is TaskState.DONE


async def test_a_configured_estimator_with_only_estimate_orders_the_queue(
    make_harness: MakeHarness, tmp_path: Path
) -> None:
    """``[tasks] runtime_estimator`` names an estimator by dotted path; one that implements only
    ``estimate`` works (it is told no run times) and orders one priority shortest first."""
    h = await make_harness(
        gpus=[],
        host_slots=1,
        runtime_estimator="tests.unit.tasks.estimator_support:ByLastArgument",
    )
    out = tmp_path / "order.txt"
    for task_id, seconds in (("long", "0.3"), ("short", "0.1")):
        cmd = ["sh", "-c", f"echo {task_id} >> {out}", seconds]
        await h.svc.submit({"type": "cmd", "cmd": cmd, "task_id": task_id})
    assert (await h.svc.status("long")).estimate_s == 0.3
    await h.svc.run_until_idle()
    assert out.read_text().split() == ["short", "long"]
    assert (await h.svc.status("long")).state == TaskState.DONE


def test_a_runtime_estimator_that_cannot_load_is_named() -> None:
    from vramancer.errors import InvalidInput
    from vramancer.plugins import load_object

    with pytest.raises(InvalidInput, match=r"tasks.runtime_estimator: cannot load"):
        load_object(
            "tests.unit.tasks.estimator_support:Nope",
            method="estimate",
            key="tasks.runtime_estimator",
        )
