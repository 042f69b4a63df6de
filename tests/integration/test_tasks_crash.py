"""SIGKILL the daemon in the middle of a run of many tasks, restart it on the same data dir:
every task ends exactly once as done.

Execution is at-least-once: a task that was running when the daemon died runs again (its
leftover process is killed at restart). "Exactly once as done" is what the queue promises:
each task reaches ``done`` once, and a daemon counts a completion only when it moved the task to
``done`` — so the tasks done at the crash plus the completions the restarted daemon counts add
up to the number of tasks, with no task counted twice. Each run appends the task id to a file: every
id is there at least once and at most as many times as the task was attempted.
"""

from __future__ import annotations

import sqlite3
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, start_server
from tests.promtext import metric_value

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_TASKS = 40
CONFIG = """
[devices]
backends = []

[tasks]
host_slots = 4
max_retries = 0
"""


def counts(client: httpx.Client) -> dict[str, int]:
    result: dict[str, int] = client.get("/api/tasks/stats").json()["counts"]
    return result


def completed_metric(server: ServerProcess) -> float:
    with server.client() as client:
        value = metric_value(
            client.get("/metrics").text, "vramancer_tasks_completed_total", type="cmd"
        )
    return value or 0.0


def test_sigkill_mid_run_then_restart_every_task_done_exactly_once(tmp_path: Path) -> None:
    ran = tmp_path / "ran.txt"
    script = f'echo "$VRM_TASK_ID" >> {ran}; sleep 0.3'
    tasks = [
        {"task_id": f"job-{i:03d}", "type": "cmd", "cmd": ["sh", "-c", script]}
        for i in range(N_TASKS)
    ]
    first = start_server(tmp_path, CONFIG)
    with first.client() as client:
        r = client.post("/api/tasks/submit_batch", json={"tasks": tasks})
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 60
        while True:  # kill while some tasks are done and others are running
            c = counts(client)
            if c["done"] >= 8 and c["running"] >= 1:
                break
            assert time.monotonic() < deadline, c
            time.sleep(0.02)
    first.kill()  # SIGKILL to the daemon's process group; task processes have their own
    if first.proc.stdout:
        first.proc.stdout.close()

    db = sqlite3.connect(first.data_dir / "tasks.sqlite")
    at_crash = dict(db.execute("SELECT id, state FROM tasks").fetchall())
    db.close()
    interrupted = {t for t, s in at_crash.items() if s in ("scheduled", "running")}
    assert interrupted, "the kill should catch tasks in flight"
    done_before = sum(1 for s in at_crash.values() if s == "done")

    second = start_server(tmp_path, CONFIG, data_dir=first.data_dir)
    try:
        with second.client() as client:
            deadline = time.monotonic() + 90
            while counts(client)["done"] < N_TASKS:
                assert time.monotonic() < deadline, counts(client)
                time.sleep(0.05)
            final = counts(client)
        done_after = completed_metric(second)
    finally:
        second.stop()
        if second.proc.stdout:
            second.proc.stdout.close()

    assert final["done"] == N_TASKS and sum(final.values()) == N_TASKS
    # Each task moved to done exactly once: the tasks done at the crash plus the completions
    # the restarted daemon counted add up (none of the done ones completed again).
    assert done_before + done_after == N_TASKS
    db = sqlite3.connect(first.data_dir / "tasks.sqlite")
    rows = db.execute("SELECT id, state, attempts, exit_code FROM tasks").fetchall()
    db.close()
    attempts = {task_id: n for task_id, _, n, _ in rows}
    assert {state for _, state, _, _ in rows} == {"done"}
    assert {code for _, _, _, code in rows} == {0}
    runs = Counter(ran.read_text().split())
    assert set(runs) == set(attempts)  # every task ran at least once
    for task_id, n in runs.items():
        assert n <= attempts[task_id], (task_id, n, attempts[task_id])
    for task_id in interrupted:
        assert attempts[task_id] >= 2, f"{task_id} was running at the crash and must run again"
    untouched = {t for t, s in at_crash.items() if s == "done"}
    assert all(attempts[t] == 1 and runs[t] == 1 for t in untouched)
