"""Hardening of the task service: bounded bodies, tasks owned by their submitter, the allow-list
resolved once from the daemon's PATH, private files, maintenance that cannot starve, and the
daemon's own maintenance lane."""

from __future__ import annotations

import os
import stat
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from tests.unit.tasks.conftest import GPU_24, MakeHarness

from vramancer.devices.settings import SimulatedDevice
from vramancer.errors import Forbidden, InvalidInput
from vramancer.tasks.errors import IdempotencyKeyTaken, QuotaExceeded, TaskIdTaken
from vramancer.tasks.model import (
    MAX_ARG_CHARS,
    MAX_ARGV,
    MAX_ENV_VARS,
    EnvView,
    TaskState,
    owner_of,
)

PY = sys.executable
ALICE = owner_of("alice-token")
BOB = owner_of("bob-token")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ----------------------------------------------------------------------------- 1. bounds


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"type": "cmd", "cmd": ["x"] * (MAX_ARGV + 1)}, "cmd"),
        ({"type": "cmd", "cmd": ["echo", "a" * (MAX_ARG_CHARS + 1)]}, "cmd.1"),
        ({"type": "shell", "shell": "a" * (MAX_ARG_CHARS + 1)}, "shell"),
        (
            {"type": "cmd", "cmd": ["true"], "env": {f"V{i}": "" for i in range(MAX_ENV_VARS + 1)}},
            "env",
        ),
        ({"type": "cmd", "cmd": ["true"], "env": {"V": "x" * 40_000}}, "env.V"),
        ({"type": "cmd", "cmd": ["true"], "cwd": "/" + "d" * 5000}, "cwd"),
        ({"type": "noop", "idempotency_key": "k" * 257}, "idempotency_key"),
        ({"type": "noop", "task_id": "t" * 129}, "task_id"),
        ({"type": "noop", "payload": {"blob": "z" * (1024 * 1024 + 1)}}, "payload"),
    ],
)
async def test_oversized_fields_are_refused_naming_the_field(
    make_harness: MakeHarness, body: dict[str, object], field: str
) -> None:
    h = await make_harness()
    with pytest.raises(InvalidInput) as refused:
        await h.svc.submit(body)
    assert refused.value.details["field"] == field
    assert sum(h.svc.counts().values()) == 0


async def test_a_huge_batch_is_refused_by_its_length_before_any_item_is_looked_at(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness()
    junk = [1] * 1_000_000
    t0 = time.perf_counter()
    with pytest.raises(InvalidInput) as refused:
        await h.svc.submit_batch(junk)
    assert time.perf_counter() - t0 < 0.5
    assert refused.value.details["field"] == "tasks"
    assert "1000000 tasks in one batch; at most 1000 ([tasks] max_batch)" in refused.value.message


async def test_a_batch_item_that_is_not_an_object_is_refused_by_its_index(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness()
    with pytest.raises(InvalidInput) as refused:
        await h.svc.submit_batch([{"type": "noop"}, 1])
    assert refused.value.details["field"] == "tasks[1]"
    assert sum(h.svc.counts().values()) == 0


# ----------------------------------------------------------------------------- 2. owners


async def test_another_owners_idempotency_key_is_refused_and_never_returns_their_task(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness()
    mine = await h.svc.submit({"type": "noop", "idempotency_key": "nightly"}, owner=ALICE)
    with pytest.raises(IdempotencyKeyTaken) as refused:
        await h.svc.submit(
            {"type": "cmd", "cmd": ["true"], "idempotency_key": "nightly"}, owner=BOB
        )
    assert refused.value.http_status == 409
    assert refused.value.code == "idempotency_key_taken"
    assert mine.task_id not in refused.value.message
    again = await h.svc.submit({"type": "noop", "idempotency_key": "nightly"}, owner=ALICE)
    assert (again.task_id, again.created) == (mine.task_id, False)
    assert h.svc.counts()["queued"] == 1


async def test_another_owners_task_id_is_refused(make_harness: MakeHarness) -> None:
    h = await make_harness()
    await h.svc.submit({"type": "noop", "task_id": "build-1"}, owner=ALICE)
    with pytest.raises(TaskIdTaken) as refused:
        await h.svc.submit({"type": "cmd", "cmd": ["true"], "task_id": "build-1"}, owner=BOB)
    assert refused.value.code == "task_id_taken"
    assert (await h.svc.status("build-1")).type.value == "noop"


async def test_a_viewer_has_a_quota_of_maintenance_tasks_not_ended(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(viewer_max_queued=2)
    await h.svc.submit_batch([{"type": "noop"}, {"type": "warmup"}], owner=ALICE, viewer=True)
    with pytest.raises(QuotaExceeded) as refused:
        await h.svc.submit({"type": "noop"}, owner=ALICE, viewer=True)
    assert refused.value.http_status == 429
    assert "viewer_max_queued" in refused.value.message
    # another viewer has its own quota; an operator has none
    await h.svc.submit({"type": "noop"}, owner=BOB, viewer=True)
    await h.svc.submit_batch([{"type": "noop"}] * 3, owner=ALICE)
    await h.svc.run_until_idle()
    await h.svc.submit({"type": "noop"}, owner=ALICE, viewer=True)  # the first ones ended
    assert h.svc.counts()["done"] == 6


async def test_a_viewers_payload_is_bounded(make_harness: MakeHarness) -> None:
    h = await make_harness(viewer_max_payload_bytes=32)
    with pytest.raises(InvalidInput) as refused:
        await h.svc.submit(
            {"type": "warmup", "payload": {"max_blocks": 1, "pad": "x" * 40}}, viewer=True
        )
    assert refused.value.details["field"] == "payload"
    assert "viewer_max_payload_bytes" in refused.value.message
    await h.svc.submit({"type": "warmup", "payload": {"max_blocks": 1}}, viewer=True)


async def test_env_values_are_shown_by_who_asks(make_harness: MakeHarness) -> None:
    h = await make_harness()
    env = {"API_TOKEN": "t0ps3cret", "DB_PASSWORD": "hunter2", "MODE": "fast"}
    sub = await h.svc.submit({"type": "cmd", "cmd": ["true"], "env": env}, owner=ALICE)
    record = await h.svc.status(sub.task_id)
    assert record.as_dict(EnvView.FULL)["spec"]["env"] == env
    assert record.as_dict(EnvView.NO_SECRETS)["spec"]["env"] == {
        "API_TOKEN": "<redacted>",
        "DB_PASSWORD": "<redacted>",
        "MODE": "fast",
    }
    assert record.as_dict(EnvView.NAMES)["spec"]["env"] == dict.fromkeys(env, "<redacted>")
    assert record.as_dict()["owner"] == ALICE


# ----------------------------------------------------------------------------- 3. allow-list


def _tool(folder: Path, name: str, says: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/sh\necho {says}\n")
    path.chmod(0o755)


async def test_an_allowed_program_runs_from_the_daemons_path_whatever_the_tasks_path_says(
    make_harness: MakeHarness, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _tool(ours, "mytool", "ours")
    _tool(theirs, "mytool", "theirs")
    _tool(theirs, "onlythere", "theirs")
    monkeypatch.setenv("PATH", f"{ours}:{os.environ['PATH']}")
    h = await make_harness(allowed_commands=["mytool", "onlythere"])
    monkeypatch.setenv("PATH", f"{theirs}:{os.environ['PATH']}")  # changes nothing any more
    task_path = {"PATH": f"{theirs}:/usr/bin:/bin"}
    sub = await h.svc.submit({"type": "cmd", "cmd": ["mytool"], "env": task_path})
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert (record.state, record.stdout_tail) == (TaskState.DONE, "ours\n")
    with pytest.raises(InvalidInput) as refused:
        await h.svc.submit({"type": "cmd", "cmd": ["onlythere"], "env": task_path})
    assert refused.value.details["field"] == "cmd"
    assert "not on" in refused.value.message or "no such program" in refused.value.message
    with pytest.raises(Forbidden):
        await h.svc.submit({"type": "cmd", "cmd": [str(theirs / "mytool")]})
    assert sum(h.svc.counts().values()) == 1


# ----------------------------------------------------------------------------- 4. file modes


async def test_queue_logs_and_scratch_are_private_whatever_the_umask(
    make_harness: MakeHarness, tmp_path: Path
) -> None:
    old = os.umask(0)
    try:
        data = tmp_path / "fresh" / "data"
        h = await make_harness(data_dir=data)
        sub = await h.svc.submit(
            {"type": "cmd", "cmd": ["sh", "-c", 'stat -c %a "$VRM_SCRATCH_DIR"; echo err >&2']}
        )
        await h.svc.run_until_idle()
        record = await h.svc.status(sub.task_id)
    finally:
        os.umask(old)
    assert record.stdout_tail == "700\n"
    assert mode(data) == 0o700
    for name in ("tasks.sqlite", "tasks.sqlite-wal", "tasks.sqlite-shm", "tasks.lock"):
        assert mode(data / name) == 0o600, name
    logs = data / "task-logs" / sub.task_id[:2]
    assert mode(data / "task-logs") == mode(logs) == 0o700
    assert mode(logs / f"{sub.task_id}.1.stdout") == mode(logs / f"{sub.task_id}.1.stderr") == 0o600
    assert mode(data / "scratch") == 0o700


async def test_files_an_earlier_version_left_readable_are_made_private_at_start(
    make_harness: MakeHarness, tmp_path: Path
) -> None:
    data = tmp_path / "old"
    (data / "task-logs" / "ab").mkdir(parents=True)
    old_log = data / "task-logs" / "ab" / "abc.1.stdout"
    old_log.write_text("secret output")
    (data / "tasks.sqlite").write_bytes(b"")
    for path, m in ((data, 0o755), (data / "task-logs", 0o755), (data / "task-logs" / "ab", 0o755)):
        path.chmod(m)
    for path in (old_log, data / "tasks.sqlite"):
        path.chmod(0o644)
    await make_harness(data_dir=data)
    assert mode(data) == mode(data / "task-logs") == mode(data / "task-logs" / "ab") == 0o700
    assert mode(old_log) == mode(data / "tasks.sqlite") == 0o600


# ----------------------------------------------------------------------------- 6. maintenance


async def test_a_maintenance_task_runs_after_maintenance_max_wait_s_even_on_a_busy_machine(
    make_harness: MakeHarness,
) -> None:
    busy = SimulatedDevice(name="busy", memory="8GiB", utilization=0.5)
    h = await make_harness(gpus=[busy], maintenance_max_wait_s=300.0)
    sub = await h.svc.submit({"type": "noop"})
    window = h.svc.maintenance_window()
    assert window["reason"] == "GPU 0 50% busy > idle_busy_ratio 5%"
    h.clock.advance(299.0)
    h.refresh()
    await h.svc.run_until_idle()
    assert await h.state(sub.task_id) is TaskState.QUEUED
    h.clock.advance(1.0)
    h.refresh()
    await h.svc.run_until_idle()
    assert await h.state(sub.task_id) is TaskState.DONE


async def test_without_maintenance_max_wait_s_a_busy_machine_keeps_maintenance_waiting(
    make_harness: MakeHarness,
) -> None:
    busy = SimulatedDevice(name="busy", memory="8GiB", utilization=0.5)
    h = await make_harness(gpus=[busy], maintenance_max_wait_s=0.0)
    sub = await h.svc.submit({"type": "noop"})
    h.clock.advance(10 * 24 * 3600.0)
    h.refresh()
    await h.svc.run_until_idle()
    assert await h.state(sub.task_id) is TaskState.QUEUED


async def test_the_maintenance_window_names_a_busy_cpu(
    make_harness: MakeHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = await make_harness(maintenance_max_cpu_ratio=0.9)
    real = h.devices.snapshot()
    busy = replace(real, host=replace(real.host, cpu_utilization_ratio=0.93))
    monkeypatch.setattr(h.devices, "snapshot", lambda: busy)
    assert h.svc.maintenance_window() == {
        "waiting": 0,
        "idle": False,
        "reason": "CPU 93% > maintenance_max_cpu_ratio 90%",
        "max_wait_s": 300.0,
        "auto_maintenance": False,
    }


async def test_the_daemon_queues_its_own_maintenance_in_idle_windows(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(gpus=[GPU_24], auto_maintenance=True, auto_maintenance_interval_s=60.0)
    await h.svc.run_until_idle()
    assert sum(h.svc.counts().values()) == 0  # the first round comes one interval after start
    h.clock.advance(60.0)
    h.refresh()
    await h.svc.run_until_idle()
    page = await h.svc.history()
    assert sorted(r.type.value for r in page.tasks) == ["compress", "rebalance", "warmup"]
    assert {(r.state, r.owner, r.as_dict()["system"]) for r in page.tasks} == {
        (TaskState.DONE, "system", True)
    }
    assert (len(h.memory.warmups), len(h.memory.compressions)) == (1, 1)
    h.clock.advance(59.0)
    h.refresh()
    await h.svc.run_until_idle()
    assert len((await h.svc.history()).tasks) == 3
    h.clock.advance(1.0)
    h.refresh()
    await h.svc.run_until_idle()
    assert len((await h.svc.history()).tasks) == 6


async def test_the_daemons_maintenance_is_not_queued_twice_while_one_waits(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(
        auto_maintenance=True, auto_maintenance_interval_s=60.0, maintenance_idle_s=1000.0
    )
    await h.svc.run_until_idle()
    for _ in range(3):
        h.clock.advance(60.0)
        h.refresh()
        await h.svc.run_until_idle()
    assert h.svc.counts()["queued"] == 3  # one of each kind, waiting for an idle window


async def test_auto_maintenance_off_queues_nothing(make_harness: MakeHarness) -> None:
    h = await make_harness(auto_maintenance=False, auto_maintenance_interval_s=1.0)
    for _ in range(3):
        h.clock.advance(10.0)
        h.refresh()
        await h.svc.run_until_idle()
    assert sum(h.svc.counts().values()) == 0
