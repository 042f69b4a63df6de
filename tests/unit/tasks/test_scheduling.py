"""Dispatch decisions: order, device choice, waiting, security, maintenance windows, recovery."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tests.unit.tasks.conftest import GPU_12, GPU_24, MakeHarness

from vramancer.devices.settings import SimulatedDevice
from vramancer.errors import Conflict, Forbidden, InvalidInput
from vramancer.tasks.model import Grant, TaskState
from vramancer.tasks.runner import process_start_time
from vramancer.tasks.service import PayloadTooLarge

PY = sys.executable


def _append(path: Path, word: str) -> dict[str, object]:
    return {"type": "shell", "shell": f"echo {word} >> {path}"}


async def test_priority_first_then_submission_order(
    make_harness: MakeHarness, tmp_path: Path
) -> None:
    h = await make_harness()
    out = tmp_path / "order.txt"
    await h.svc.submit({**_append(out, "low1"), "priority": "background"})
    await h.svc.submit({**_append(out, "normal1")})
    await h.svc.submit({**_append(out, "high"), "priority": "high"})
    await h.svc.submit({**_append(out, "user"), "priority": "user_facing"})
    await h.svc.submit({**_append(out, "normal2")})
    await h.svc.run_until_idle()  # one slot: one task per round
    assert out.read_text().split() == ["user", "high", "normal1", "normal2", "low1"]


async def test_same_priority_runs_the_shortest_expected_first(
    make_harness: MakeHarness, tmp_path: Path
) -> None:
    h = await make_harness()
    out = tmp_path / "order.txt"
    slow = {"type": "cmd", "cmd": [PY, "-c", f"open('{out}','a').write('slow\\n')"]}
    fast = {"type": "cmd", "cmd": ["sh", "-c", f"echo fast >> {out}"]}
    # Teach the estimator: the python command took 50 s, sh 1 s.
    estimator = h.svc.estimator
    estimator.observe("cmd:" + os.path.basename(PY) + " -c", 50.0)
    estimator.observe("cmd:sh -c", 1.0)
    await h.svc.submit(slow)
    await h.svc.submit(fast)
    await h.svc.run_until_idle()
    assert out.read_text().split() == ["fast", "slow"]


async def test_run_times_are_learned_from_history_and_survive_a_restart(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness()
    sub = await h.svc.submit({"type": "cmd", "cmd": ["true"]})
    await h.svc.run_until_idle()
    assert await h.state(sub.task_id) is TaskState.DONE
    learned = h.svc.estimator.estimate_key("cmd:true")  # type: ignore[attr-defined]
    assert 0 < learned < 5
    data_dir = h.data_dir
    await h.svc.stop()
    h2 = await make_harness(data_dir=data_dir)
    again = h2.svc.estimator.estimate_key("cmd:true")  # type: ignore[attr-defined]
    assert again == pytest.approx(learned)
    assert h2.svc.estimator.estimate_key("cmd:never-seen") == 60.0  # type: ignore[attr-defined]


async def test_spread_puts_a_small_job_on_the_idle_gpu_not_the_biggest(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(gpus=[GPU_24, GPU_12])
    h.devices.set_simulated(0, utilization_ratio=0.40)
    sub = await h.svc.submit({"type": "cmd", "cmd": ["true"], "vram": "1GiB"})
    await h.svc.run_until_idle()
    assert (await h.svc.status(sub.task_id)).device == "gpu:1"


async def test_binpack_fills_the_tightest_gpu(make_harness: MakeHarness) -> None:
    h = await make_harness(gpus=[GPU_24, GPU_12], picker="binpack")
    sub = await h.svc.submit({"type": "cmd", "cmd": ["true"], "vram": "2GiB"})
    await h.svc.run_until_idle()
    assert (await h.svc.status(sub.task_id)).device == "gpu:1"
    big = await h.svc.submit({"type": "cmd", "cmd": ["true"], "vram": "16GiB"})
    await h.svc.run_until_idle()
    assert (await h.svc.status(big.task_id)).device == "gpu:0"


async def test_a_pin_is_honoured(make_harness: MakeHarness) -> None:
    h = await make_harness(gpus=[GPU_24, GPU_12])
    sub = await h.svc.submit({"type": "cmd", "cmd": ["true"], "gpu": 0})
    await h.svc.run_until_idle()
    assert (await h.svc.status(sub.task_id)).device == "gpu:0"


async def test_a_pin_to_a_missing_gpu_is_refused_and_nothing_is_queued(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(gpus=[GPU_24, GPU_12])
    with pytest.raises(InvalidInput, match=r"gpu 5 does not exist \(GPUs of this machine: 0, 1\)"):
        await h.svc.submit_batch(
            [{"type": "cmd", "cmd": ["true"]}, {"type": "cmd", "cmd": ["true"], "gpu": 5}]
        )
    assert sum(h.svc.counts().values()) == 0
    assert (await h.svc.history()).tasks == []


async def test_a_hot_gpu_makes_the_task_wait_then_it_runs_when_cooled(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness()
    h.devices.set_simulated(0, temperature_celsius=85.0)
    sub = await h.svc.submit({"type": "cmd", "cmd": ["true"]})
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.WAITING_GPU
    assert record.error == "waiting for a device: gpu:0: too hot (85 °C > 78 °C)"
    h.devices.set_simulated(0, temperature_celsius=60.0)
    await h.svc.run_until_idle()
    assert await h.state(sub.task_id) is TaskState.DONE
    assert h.transitions(sub.task_id) == ["queued", "waiting_gpu", "scheduled", "running", "done"]


async def test_stale_telemetry_makes_the_task_wait(make_harness: MakeHarness) -> None:
    h = await make_harness()
    h.clock.advance(16.0)  # no poll for 16 s: past the 15 s heartbeat TTL
    sub = await h.svc.submit({"type": "cmd", "cmd": ["true"]})
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.WAITING_GPU
    assert record.error is not None and "no telemetry for 16 s" in record.error
    h.refresh()
    await h.svc.run_until_idle()
    assert await h.state(sub.task_id) is TaskState.DONE


async def test_a_task_too_big_for_the_room_left_waits_and_others_pass_it(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(slots_per_device=4)
    h.devices.set_simulated(0, used_bytes=20 * 1024**3)
    big = await h.svc.submit({"type": "cmd", "cmd": ["true"], "vram": "8GiB"})
    small = await h.svc.submit({"type": "cmd", "cmd": ["true"], "vram": "1GiB"})
    await h.svc.run_until_idle()
    assert await h.state(big.task_id) is TaskState.WAITING_GPU
    assert await h.state(small.task_id) is TaskState.DONE
    h.devices.set_simulated(0, used_bytes=0)
    await h.svc.run_until_idle()
    assert await h.state(big.task_id) is TaskState.DONE


async def test_cpu_only_machine_runs_tasks_on_the_host(make_harness: MakeHarness) -> None:
    h = await make_harness(gpus=[])
    sub = await h.svc.submit(
        {"type": "shell", "shell": 'echo "[$CUDA_VISIBLE_DEVICES] $VRM_DEVICE"'}
    )
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.DONE
    assert record.device == "host"
    assert record.stdout_tail == "[] host\n"
    with pytest.raises(InvalidInput, match="this machine has no GPU; leave the VRAM out"):
        await h.svc.submit({"type": "cmd", "cmd": ["true"], "vram": "1GiB"})
    with pytest.raises(InvalidInput, match="GPUs of this machine: none"):
        await h.svc.submit({"type": "cmd", "cmd": ["true"], "gpu": 0})


async def test_host_slots_bound_concurrency(make_harness: MakeHarness) -> None:
    h = await make_harness(gpus=[], host_slots=2)
    for _ in range(3):
        await h.svc.submit({"type": "shell", "shell": "sleep 5"})
    assert await h.svc.run_once() == 2
    assert h.svc.counts()["queued"] == 1
    for record in (await h.svc.history()).tasks:
        if record.state is not TaskState.QUEUED:
            await h.svc.cancel(record.task_id)
    await h.svc.drain(timeout_s=10)


async def test_idempotency_key_and_given_id_deduplicate(make_harness: MakeHarness) -> None:
    h = await make_harness()
    body = {"type": "cmd", "cmd": ["true"], "idempotency_key": "nightly-42"}
    first, again = await h.svc.submit_batch([body, body])
    assert first.created and not again.created
    assert again.task_id == first.task_id
    later = await h.svc.submit(body)
    assert later.task_id == first.task_id and not later.created
    named = await h.svc.submit({"type": "noop", "task_id": "my-task"})
    renamed = await h.svc.submit({"type": "noop", "task_id": "my-task"})
    assert named.created and not renamed.created
    assert h.svc.counts()["queued"] == 2


async def test_allow_list_refuses_other_commands_and_free_shell(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(allowed_commands=["true", "python"])
    with pytest.raises(Forbidden, match="command 'rm' not allowed"):
        await h.svc.submit({"type": "cmd", "cmd": ["rm", "-rf", "/tmp/x"]})
    with pytest.raises(Forbidden, match="shell tasks"):
        await h.svc.submit({"type": "shell", "shell": "true"})
    ok = await h.svc.submit({"type": "cmd", "cmd": ["true"], "env": {"PATH": "/nonexistent"}})
    allowed_py = await h.svc.submit({"type": "python", "python": "os:getpid"})
    await h.svc.run_until_idle()
    # The program is resolved with the daemon's PATH, not the task's.
    assert await h.state(ok.task_id) is TaskState.DONE
    assert await h.state(allowed_py.task_id) is TaskState.DONE
    h2 = await make_harness(allowed_commands=["sh"])
    await h2.svc.submit({"type": "shell", "shell": "true"})  # sh listed: shell allowed
    # Loader and interpreter hooks would run other code inside an allowed program.
    for name in ("LD_PRELOAD", "DYLD_INSERT_LIBRARIES", "PYTHONPATH", "BASH_ENV"):
        with pytest.raises(Forbidden, match=f"env: {name} would change what an allowed"):
            await h.svc.submit({"type": "cmd", "cmd": ["true"], "env": {name: "/tmp/x"}})
    assert sum(h.svc.counts().values()) == 2
    h3 = await make_harness()  # no allow-list: an operator may set them
    await h3.svc.submit({"type": "cmd", "cmd": ["true"], "env": {"LD_PRELOAD": "x.so"}})


async def test_oversized_body_is_refused(make_harness: MakeHarness) -> None:
    h = await make_harness(max_payload_bytes=1024)
    with pytest.raises(PayloadTooLarge):
        await h.svc.submit({"type": "cmd", "cmd": ["echo", "x" * 2000]})
    with pytest.raises(InvalidInput, match="at most 2"):
        h3 = await make_harness(max_batch=2)
        await h3.svc.submit_batch([{"type": "noop"}] * 3)
    assert sum(h.svc.counts().values()) == 0


async def test_maintenance_waits_for_an_idle_window_and_never_before_user_tasks(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(maintenance_idle_s=30.0)
    warm = await h.svc.submit({"type": "warmup", "payload": {"max_blocks": 7}})
    user = await h.svc.submit({"type": "shell", "shell": "sleep 0.1"})
    await h.svc.run_until_idle()
    assert await h.state(user.task_id) is TaskState.DONE
    assert await h.state(warm.task_id) is TaskState.QUEUED  # idle only since now
    h.clock.advance(29.0)
    h.refresh()
    await h.svc.run_until_idle()
    assert await h.state(warm.task_id) is TaskState.QUEUED
    h.devices.set_simulated(0, utilization_ratio=0.5)  # someone else uses the GPU
    h.clock.advance(5.0)
    await h.svc.run_until_idle()
    assert await h.state(warm.task_id) is TaskState.QUEUED
    h.devices.set_simulated(0, utilization_ratio=0.0)
    await h.svc.run_until_idle()
    h.clock.advance(30.0)
    h.refresh()
    await h.svc.run_until_idle()
    record = await h.svc.status(warm.task_id)
    assert record.state is TaskState.DONE
    assert record.stdout_tail == "warmed 3 block(s)"
    assert h.memory.warmups == [7]
    assert h.transitions(warm.task_id) == ["queued", "running", "done"]


async def test_maintenance_kinds_and_failures(make_harness: MakeHarness) -> None:
    h = await make_harness()
    noop = await h.svc.submit({"type": "noop"})
    comp = await h.svc.submit({"type": "compress"})
    await h.svc.run_until_idle()
    assert await h.state(noop.task_id) is TaskState.DONE
    assert await h.state(comp.task_id) is TaskState.DONE
    assert h.memory.compressions == [64]
    h.memory.fail = True
    bad = await h.svc.submit({"type": "warmup", "max_retries": 0})
    await h.svc.run_until_idle()
    record = await h.svc.status(bad.task_id)
    assert record.state is TaskState.FAILED
    assert record.error == "warmup failed: RuntimeError: store closed"


async def test_a_user_task_makes_queued_maintenance_yield(make_harness: MakeHarness) -> None:
    h = await make_harness()
    noops = await h.svc.submit_batch([{"type": "noop"}] * 5)
    leased, changes = await h.svc.queue.lease(
        [Grant(s.task_id, "host", running=True) for s in noops],
        worker="w",
        now=h.clock.time(),
        lease_s=30,
    )
    h.svc.telemetry.publish(changes)  # account the lease like the dispatcher would
    await h.svc.submit({"type": "cmd", "cmd": ["true"]})
    await h.svc.lane.run(leased)
    states = [await h.state(s.task_id) for s in noops]
    assert states == [TaskState.QUEUED] * 5  # handed back, untouched
    assert [r.attempts for r in [await h.svc.status(s.task_id) for s in noops]] == [0] * 5


async def test_restart_requeues_what_was_running_and_kills_its_leftovers(
    make_harness: MakeHarness,
) -> None:
    """A crash is simulated by leasing a task to a dead worker whose process still runs."""
    h = await make_harness()
    sub = await h.svc.submit({"type": "shell", "shell": "echo ran >> out"})
    leased, _ = await h.svc.queue.lease(
        [Grant(sub.task_id, "gpu:0")], worker="dead:1", now=h.clock.time(), lease_s=30
    )
    leftover = subprocess.Popen(["sleep", "60"], start_new_session=True)
    await h.svc.queue.mark_running(
        sub.task_id,
        leased[0].lease_token,
        pid=leftover.pid,
        pid_started=process_start_time(leftover.pid),
        now=h.clock.time(),
    )
    data_dir = h.data_dir
    await h.svc.stop()
    h2 = await make_harness(data_dir=data_dir)
    assert leftover.wait(timeout=5) == -signal.SIGKILL
    record = await h2.svc.status(sub.task_id)
    assert record.state is TaskState.QUEUED
    assert record.attempts == 1
    assert record.error == "lease lost: worker gone; queued again (lease losses: 1 of 3)"
    assert record.lease_losses == 1
    await h2.svc.run_until_idle()
    final = await h2.svc.status(sub.task_id)
    assert final.state is TaskState.DONE
    assert final.attempts == 2


async def test_an_expired_lease_is_taken_back(make_harness: MakeHarness) -> None:
    h = await make_harness(lease_s=10.0)
    sub = await h.svc.submit({"type": "cmd", "cmd": ["true"]})
    await h.svc.queue.lease(
        [Grant(sub.task_id, "gpu:0")], worker="other:1", now=h.clock.time(), lease_s=10.0
    )
    h.clock.advance(5.0)
    assert await h.svc.queue.heartbeat("other:1", now=h.clock.time(), lease_s=10.0) == 1
    h.clock.advance(9.0)
    h.refresh()
    await h.svc.run_once()
    assert await h.state(sub.task_id) is TaskState.SCHEDULED  # renewed at +5: alive until +15
    h.clock.advance(2.0)
    h.refresh()
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.DONE
    assert record.attempts == 2


async def test_stop_requeues_running_tasks_without_counting_a_try(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness()
    sub = await h.svc.submit({"type": "shell", "shell": "sleep 60", "max_retries": 0})
    await h.svc.run_once()
    data_dir = h.data_dir
    await h.svc.stop()
    h2 = await make_harness(data_dir=data_dir)
    record = await h2.svc.status(sub.task_id)
    assert record.state is TaskState.QUEUED
    assert record.attempts == 0
    assert record.error == "daemon stopping"


async def test_one_daemon_per_data_dir(make_harness: MakeHarness) -> None:
    h = await make_harness()
    with pytest.raises(Conflict, match="another VRAMancer daemon"):
        await make_harness(data_dir=h.data_dir)


async def test_gpu_pids_in_status_are_the_task_process(make_harness: MakeHarness) -> None:
    h = await make_harness(gpus=[SimulatedDevice(name="s", memory="8GiB")])
    sub = await h.svc.submit({"type": "shell", "shell": "echo $$"})
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert record.pid == int(record.stdout_tail)
