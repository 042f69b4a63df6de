"""The task service running real subprocesses: environment, output, retries, timeouts, cancel."""

from __future__ import annotations

import asyncio
import errno
import os
import sys
import time
from pathlib import Path

import pytest
from tests.unit.tasks.conftest import MakeHarness

from vramancer.arbiter.types import AllocationRequest, Priority, WorkloadType
from vramancer.devices.ids import DeviceId
from vramancer.devices.types import GpuProcess
from vramancer.errors import Conflict, InvalidInput
from vramancer.tasks.model import OutcomeKind, TaskState
from vramancer.tasks.workers import start_failure

PY = sys.executable


async def test_cmd_task_sees_its_environment_and_its_output_is_stored(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness()
    script = (
        "import os; print(os.environ['VRM_TASK_ID'], repr(os.environ['CUDA_VISIBLE_DEVICES']),"
        " os.environ['VRM_DEVICE'], os.environ['GREETING'], os.getcwd());"
        "import sys; print('to stderr', file=sys.stderr)"
    )
    sub = await h.svc.submit({"type": "cmd", "cmd": [PY, "-c", script], "env": {"GREETING": "hi"}})
    assert sub.created
    assert await h.svc.run_once() == 1
    await h.svc.drain()
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.DONE
    assert record.exit_code == 0
    assert record.attempts == 1
    assert record.device == "gpu:0"
    task_id, cuda, device, greeting, cwd = record.stdout_tail.split()
    assert task_id == sub.task_id
    assert cuda == "''"  # a simulated GPU: no real GPU visible to the task
    assert device == "gpu:0"
    assert greeting == "hi"
    assert cwd == str(h.data_dir / "scratch" / "gpu0" / sub.task_id)
    assert not Path(cwd).exists()  # scratch removed once the task ended
    logs = await h.svc.logs(sub.task_id)
    assert logs["stdout"].split()[0] == sub.task_id
    assert logs["stderr"] == "to stderr\n"
    assert h.transitions(sub.task_id) == ["queued", "scheduled", "running", "done"]
    assert h.metric("vramancer_tasks_completed_total", type="cmd") == 1
    assert h.metric("vramancer_tasks_run_seconds_count", device="gpu:0") == 1
    assert h.metric("vramancer_tasks_wait_seconds_count", device="gpu:0") == 1


async def test_daemon_vrm_variables_are_not_passed_to_tasks(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VRM_API_TOKEN", "secret")
    h = await make_harness()
    sub = await h.svc.submit(
        {"type": "cmd", "cmd": [PY, "-c", "import os; print(os.environ.get('VRM_API_TOKEN'))"]}
    )
    await h.svc.run_until_idle()
    assert (await h.svc.status(sub.task_id)).stdout_tail == "None\n"


async def test_given_cwd_is_used(make_harness: MakeHarness, tmp_path: Path) -> None:
    h = await make_harness()
    sub = await h.svc.submit({"type": "shell", "shell": "pwd > where.txt", "cwd": str(tmp_path)})
    await h.svc.run_until_idle()
    assert await h.state(sub.task_id) is TaskState.DONE
    assert (tmp_path / "where.txt").read_text().strip() == str(tmp_path)
    assert list((h.data_dir / "scratch" / "gpu0").iterdir()) == []  # its scratch went too


async def test_failing_task_retries_with_exponential_backoff_then_fails(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(backoff_base_s=10.0)
    sub = await h.svc.submit({"type": "cmd", "cmd": [PY, "-c", "exit(3)"], "max_retries": 2})
    await h.svc.run_until_idle()
    first = await h.svc.status(sub.task_id)
    assert first.state is TaskState.RETRY
    assert first.exit_code == 3
    assert first.error == "exit code 3"
    assert first.not_before == pytest.approx(h.clock.time() + 10.0)
    h.clock.advance(9.9)
    h.refresh()
    await h.svc.run_until_idle()
    assert await h.state(sub.task_id) is TaskState.RETRY  # back-off not over
    h.clock.advance(0.2)
    h.refresh()
    await h.svc.run_until_idle()
    second = await h.svc.status(sub.task_id)
    assert second.state is TaskState.RETRY
    assert second.attempts == 2
    assert second.not_before == pytest.approx(h.clock.time() + 20.0)  # doubled
    h.clock.advance(20.0)
    h.refresh()
    await h.svc.run_until_idle()
    final = await h.svc.status(sub.task_id)
    assert final.state is TaskState.FAILED
    assert final.attempts == 3
    attempt = ["scheduled", "running"]
    assert h.transitions(sub.task_id) == [
        "queued",
        *attempt,
        "retry",
        "queued",
        *attempt,
        "retry",
        "queued",
        *attempt,
        "failed",
    ]
    assert h.metric("vramancer_tasks_failed_total", type="cmd") == 1


async def test_timeout_kills_the_whole_process_tree(make_harness: MakeHarness) -> None:
    h = await make_harness()
    # The task starts a grandchild that sleeps, prints both pids, then sleeps itself.
    script = "sleep 60 & echo $$ $!; sleep 60"
    sub = await h.svc.submit({"type": "shell", "shell": script, "timeout": 0.5, "max_retries": 0})
    started = time.monotonic()
    await h.svc.run_until_idle()
    assert time.monotonic() - started < 10
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.FAILED
    assert record.exit_code is None
    assert record.error is not None and "timed out after 0.5 s" in record.error
    pids = [int(p) for p in record.stdout_tail.split()]
    assert len(pids) == 2
    for pid in pids:
        assert _gone(pid), f"process {pid} survived the timeout"


async def test_leftover_processes_of_a_finished_task_are_killed(make_harness: MakeHarness) -> None:
    h = await make_harness()
    sub = await h.svc.submit({"type": "shell", "shell": "sleep 60 >/dev/null 2>&1 & echo $!"})
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.DONE
    assert _gone(int(record.stdout_tail))


async def test_cancel_a_running_task_kills_it_and_it_ends_cancelled(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness()
    sub = await h.svc.submit({"type": "shell", "shell": "echo started; sleep 60"})
    await h.svc.run_once()
    await _until(lambda: h.transitions(sub.task_id)[-1] == "running")
    log = h.data_dir / "task-logs" / sub.task_id[:2] / f"{sub.task_id}.1.stdout"
    await _until(lambda: log.exists() and log.read_text() == "started\n")  # inside `sleep 60`
    await h.svc.cancel(sub.task_id)
    await h.svc.drain(timeout_s=10)
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.CANCELLED
    assert record.cancel_requested
    with pytest.raises(Conflict):
        await h.svc.cancel(sub.task_id)


async def test_cancel_a_queued_task(make_harness: MakeHarness) -> None:
    h = await make_harness()
    sub = await h.svc.submit({"type": "cmd", "cmd": ["true"]})
    await h.svc.cancel(sub.task_id)
    await h.svc.run_until_idle()
    assert h.transitions(sub.task_id) == ["queued", "cancelled"]


async def test_a_program_that_does_not_exist_fails_with_the_reason(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness()
    sub = await h.svc.submit({"type": "cmd", "cmd": ["/nonexistent/prog"], "max_retries": 0})
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.FAILED
    assert record.error == "cannot start the program: No such file or directory; not retried"


async def test_a_program_that_cannot_start_fails_at_once_while_an_exit_1_is_retried(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(backoff_base_s=10.0)
    missing = await h.svc.submit({"type": "cmd", "cmd": ["/no/such/binary"], "max_retries": 2})
    exits_1 = await h.svc.submit({"type": "cmd", "cmd": [PY, "-c", "exit(1)"], "max_retries": 2})
    await h.svc.run_until_idle()
    record = await h.svc.status(missing.task_id)
    assert record.state is TaskState.FAILED
    assert record.attempts == 1
    assert record.not_before is None
    assert record.error == "cannot start the program: No such file or directory; not retried"
    assert h.transitions(missing.task_id) == ["queued", "scheduled", "failed"]
    assert h.metric("vramancer_tasks_failed_total", type="cmd") == 1
    other = await h.svc.status(exits_1.task_id)
    assert other.state is TaskState.RETRY
    assert other.attempts == 1
    assert other.error == "exit code 1"
    h.clock.advance(10.0)
    h.refresh()
    await h.svc.run_until_idle()
    assert (await h.svc.status(exits_1.task_id)).attempts == 2  # tried again
    assert (await h.svc.status(missing.task_id)).attempts == 1  # not tried again


def test_a_start_failure_a_later_try_may_not_meet_is_retried() -> None:
    exc = OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
    assert start_failure(exc, "/tmp") == (
        OutcomeKind.ERROR,
        f"cannot start the program: {os.strerror(errno.EAGAIN)}",
    )
    missing = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/secret/prog")
    kind, error = start_failure(missing, "/tmp")
    assert kind is OutcomeKind.FATAL
    assert "/secret" not in error  # the error is shown to every caller


async def test_a_file_that_is_not_executable_fails_at_once(
    make_harness: MakeHarness, tmp_path: Path
) -> None:
    h = await make_harness()
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    sub = await h.svc.submit({"type": "cmd", "cmd": [str(script)], "max_retries": 2})
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.FAILED
    assert record.attempts == 1
    assert record.error is not None
    assert record.error.startswith("cannot start the program: ")
    assert record.error.endswith("; not retried")


async def test_a_working_directory_that_does_not_exist_fails_at_once(
    make_harness: MakeHarness, tmp_path: Path
) -> None:
    h = await make_harness()
    gone = tmp_path / "gone"
    sub = await h.svc.submit({"type": "shell", "shell": "true", "cwd": str(gone), "max_retries": 2})
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.FAILED
    assert record.attempts == 1
    assert record.error == (
        "cannot start the program: its working directory: No such file or directory; not retried"
    )


async def test_output_is_bounded(make_harness: MakeHarness) -> None:
    h = await make_harness(max_output_bytes=1000, output_tail_bytes=100)
    sub = await h.svc.submit({"type": "cmd", "cmd": [PY, "-c", "print('x' * 50000 + 'END')"]})
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.DONE
    assert len(record.stdout_tail) == 100
    assert record.stdout_tail.endswith("END\n")
    logs = await h.svc.logs(sub.task_id)
    assert logs["stdout"].startswith("x" * 1000)
    assert "49004 more bytes dropped" in logs["stdout"]


async def test_python_task_calls_a_function_with_json_arguments(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness()
    sub = await h.svc.submit(
        {
            "type": "python",
            "python": "json:dumps",
            "payload": {"args": [{"b": 1}], "kwargs": {"sort_keys": True}},
        }
    )
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.DONE
    assert record.stdout_tail == '"{\\"b\\": 1}"\n'
    bad = await h.svc.submit({"type": "python", "python": "json:nope", "max_retries": 0})
    await h.svc.run_until_idle()
    failed = await h.svc.status(bad.task_id)
    assert failed.state is TaskState.FAILED
    assert failed.exit_code == 2
    assert "has no attribute 'nope'" in failed.stderr_tail


async def test_vram_is_reserved_in_the_arbiter_while_the_task_runs(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness()
    sub = await h.svc.submit({"type": "shell", "shell": "sleep 60", "vram": "4GiB"})
    await h.svc.run_once()
    allocations = h.arbiter.allocations()
    assert [(a.owner, a.memory_bytes, a.device) for a in allocations] == [
        (f"task:{sub.task_id}", 4 * 1024**3, "gpu:0")
    ]
    assert h.arbiter.reserved_bytes(DeviceId.gpu(0)) == 4 * 1024**3
    await h.svc.cancel(sub.task_id)
    await h.svc.drain(timeout_s=10)
    assert h.arbiter.allocations() == []


async def test_unseen_reservation_counts_as_used_until_the_driver_shows_it(
    make_harness: MakeHarness,
) -> None:
    """Two 10 GiB tasks, one 24 GiB GPU (arbiter budget 21.6 GiB) with two slots whose driver
    shows 5 GiB used by someone else: the second task must wait, although the driver still shows
    19 GiB free and the arbiter could still grant 11.6 GiB, because the first task's 10 GiB are
    reserved but not yet visible to the driver."""
    h = await make_harness(slots_per_device=2)
    h.devices.set_simulated(0, used_bytes=5 * 1024**3)
    first = await h.svc.submit({"type": "shell", "shell": "sleep 60", "vram": "10GiB"})
    second = await h.svc.submit({"type": "shell", "shell": "sleep 60", "vram": "10GiB"})
    await h.svc.run_once()
    assert await h.state(first.task_id) in (TaskState.SCHEDULED, TaskState.RUNNING)
    second_record = await h.svc.status(second.task_id)
    assert second_record.state is TaskState.WAITING_GPU
    assert second_record.error == (
        "waiting for a device: gpu:0: needs 10.0 GiB, 9.0 GiB available after 1 reservation "
        "(10.0 GiB)"
    )
    await h.svc.cancel(first.task_id)
    await h.svc.drain(timeout_s=10)
    await h.svc.run_once()
    assert await h.state(second.task_id) in (TaskState.SCHEDULED, TaskState.RUNNING)
    await h.svc.cancel(second.task_id)
    await h.svc.drain(timeout_s=10)


async def test_visible_usage_of_a_task_is_not_counted_twice(make_harness: MakeHarness) -> None:
    from vramancer.tasks.workers import Active, visible_bytes

    h = await make_harness()
    snapshot = h.devices.snapshot()
    gpu = snapshot.gpus[0]
    me = os.getpid()
    from dataclasses import replace

    shown = replace(gpu, processes=(GpuProcess(pid=me, used_memory_bytes=3 * 1024**3),))
    snapshot = replace(snapshot, gpus=(shown,))
    record = None
    active = Active(record, "gpu:0", None, 4 * 1024**3, pgid=os.getpgid(me))  # type: ignore[arg-type]
    assert visible_bytes(snapshot, active) == 3 * 1024**3


async def test_vram_no_gpu_can_grant_is_refused_at_submit(make_harness: MakeHarness) -> None:
    h = await make_harness()
    with pytest.raises(InvalidInput, match="no GPU here can grant"):
        await h.svc.submit({"type": "cmd", "cmd": ["true"], "vram": "40GiB"})
    assert h.svc.counts()["queued"] == 0


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """The process is dead (or a zombie) now or soon: SIGKILL delivery is asynchronous."""
    deadline = time.monotonic() + within_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose (its parent has not reaped it yet).
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _until(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_a_preempted_task_is_stopped_and_queued_again_without_using_a_try(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness()
    sub = await h.svc.submit(
        {
            "type": "shell",
            "shell": "sleep 60",
            "vram": "16GiB",
            "priority": "background",
            "max_retries": 0,
        }
    )
    await h.svc.run_once()
    await _until(lambda: h.transitions(sub.task_id)[-1] == "running")
    model = h.arbiter.allocate(
        AllocationRequest(WorkloadType.LLM, Priority.USER_FACING, 10 * 2**30, device=DeviceId(0))
    )
    await h.svc.drain(timeout_s=10)
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.QUEUED
    assert record.attempts == 0
    assert record.error == "preempted by a higher-priority allocation"
    assert [a.owner for a in h.arbiter.allocations()] == [None]  # only the model holds VRAM
    h.arbiter.release_allocation(model.id)
    await h.svc.run_once()
    await _until(lambda: h.transitions(sub.task_id)[-1] == "running")
    await h.svc.cancel(sub.task_id)
    await h.svc.drain(timeout_s=10)
    assert await h.state(sub.task_id) is TaskState.CANCELLED
