"""Hardening of the tasks API against a real ``vramancer serve``: bounded batches, tasks owned by
their submitter, what viewers may see and queue, the allow-list, private files, task processes
that die with the daemon, and ``vramancer validate`` on a machine with no idle window."""

from __future__ import annotations

import os
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.helpers import ServerProcess, running_server, start_server
from vramancer.cli.tasks_validate import run_validation
from vramancer.tasks.model import owner_of

pytestmark = pytest.mark.integration

CONFIG = """
[auth]
tokens = { "adm" = "admin", "op" = "operator", "view" = "viewer", "view2" = "viewer" }

[devices]
backends = []

[tasks]
allowed_commands = ["mytool", "onlythere", "sh", "sleep"]
maintenance_idle_s = 100000     # no idle window: maintenance tasks stay queued
maintenance_max_wait_s = 0
maintenance_max_cpu_ratio = 1.0  # the reason then is the idle time, whatever the CPU does
viewer_max_queued = 2
viewer_max_payload_bytes = 64
backoff_base_s = 0.1
kill_grace_s = 0.2
"""


def _tool(folder: Path, name: str, script: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("tasks-hardening")
    ours, theirs = tmp / "ours", tmp / "theirs"
    marker = tmp / "theirs-ran"
    _tool(ours, "mytool", "echo ours")
    _tool(theirs, "mytool", f"touch {marker}; echo theirs")
    _tool(theirs, "onlythere", f"touch {marker}; echo theirs")
    return {"tmp": tmp, "ours": ours, "theirs": theirs, "marker": marker}


@pytest.fixture(scope="module")
def server(dirs: dict[str, Path]) -> Iterator[ServerProcess]:
    env = {"VRM_DISABLE_RATE_LIMIT": "1", "PATH": f"{dirs['ours']}:{os.environ['PATH']}"}
    proc = start_server(dirs["tmp"], CONFIG, env=env)
    yield proc
    proc.stop()
    if proc.proc.stdout:
        proc.proc.stdout.close()


@pytest.fixture(scope="module")
def clients(server: ServerProcess) -> Iterator[dict[str, httpx.Client]]:
    made = {name: server.client(name) for name in ("adm", "op", "view", "view2")}
    yield made
    for client in made.values():
        client.close()


def total(client: httpx.Client) -> int:
    return sum(client.get("/api/tasks/stats").json()["counts"].values())


def wait_state(client: httpx.Client, task_id: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = client.get("/api/tasks/status", params={"task_id": task_id}).json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        assert time.monotonic() < deadline, f"{task_id} still {status['state']}"
        time.sleep(0.05)


def test_a_batch_over_max_batch_is_refused_naming_the_setting(
    clients: dict[str, httpx.Client],
) -> None:
    op = clients["op"]
    before = total(op)
    r = op.post("/api/tasks/submit_batch", json={"tasks": [{"type": "noop"}] * 1001})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "tasks"
    assert "at most 1000 ([tasks] max_batch)" in error["message"]
    assert total(op) == before


def test_single_fields_and_ids_are_bounded(clients: dict[str, httpx.Client]) -> None:
    op = clients["op"]
    long_env = {"type": "cmd", "cmd": ["sleep", "0"], "env": {"A": "x" * 40_000}}
    r = op.post("/api/tasks/submit", json=long_env)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["fields"] == ["body.env.A"]
    argv = {"type": "cmd", "cmd": ["sleep"] * 5000}
    r = op.post("/api/tasks/submit", json=argv)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["fields"] == ["body.cmd"]
    for path in (f"/api/tasks/{'x' * 129}/logs", f"/api/tasks/{'x' * 129}/cancel"):
        method = op.post if path.endswith("cancel") else op.get
        assert method(path).status_code == 422


def test_a_million_item_batch_costs_neither_time_nor_memory(
    server: ServerProcess, clients: dict[str, httpx.Client]
) -> None:
    daemon = psutil.Process(server.proc.pid)
    rss = daemon.memory_info().rss
    t0 = time.monotonic()
    r = clients["op"].post(
        "/api/tasks/submit_batch",
        content=b'{"tasks":[' + b",".join([b"1"] * 1_000_000) + b"]}",
        headers={"Content-Type": "application/json"},
    )
    elapsed = time.monotonic() - t0
    assert r.status_code in (413, 422), r.text
    assert elapsed < 5.0
    assert daemon.memory_info().rss - rss < 300 * 1024 * 1024


def test_a_viewers_idempotency_key_does_not_capture_an_operators_task(
    clients: dict[str, httpx.Client],
) -> None:
    view, op = clients["view"], clients["op"]
    noop = view.post("/api/tasks/submit", json={"type": "noop", "idempotency_key": "deploy"})
    assert noop.status_code == 200, noop.text
    before = total(op)
    body = {"type": "shell", "shell": "echo deploying", "idempotency_key": "deploy"}
    r = op.post("/api/tasks/submit", json=body)
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "idempotency_key_taken"
    assert noop.json()["task_id"] not in r.text
    by_id = op.post(
        "/api/tasks/submit",
        json={"type": "shell", "shell": "true", "task_id": noop.json()["task_id"]},
    )
    assert by_id.status_code == 409, by_id.text
    assert by_id.json()["error"]["code"] == "task_id_taken"
    assert total(op) == before
    same = view.post("/api/tasks/submit", json={"type": "noop", "idempotency_key": "deploy"})
    assert same.json() == {"task_id": noop.json()["task_id"], "created": False}


def test_task_env_is_hidden_from_viewers_and_secrets_from_all_but_admins(
    clients: dict[str, httpx.Client],
) -> None:
    env = {"API_TOKEN": "t0ps3cret", "MODE": "fast"}
    sub = clients["op"].post(
        "/api/tasks/submit", json={"type": "cmd", "cmd": ["sleep", "0"], "env": env}
    )
    assert sub.status_code == 200, sub.text
    task_id = sub.json()["task_id"]
    wait_state(clients["op"], task_id)

    def shown(who: str) -> dict[str, str]:
        status = clients[who].get("/api/tasks/status", params={"task_id": task_id}).json()
        page = clients[who].get("/api/tasks/history", params={"limit": 1000}).json()["tasks"]
        listed = next(t for t in page if t["task_id"] == task_id)
        assert listed["spec"]["env"] == status["spec"]["env"]
        result: dict[str, str] = status["spec"]["env"]
        return result

    assert shown("adm") == env
    assert shown("op") == {"API_TOKEN": "<redacted>", "MODE": "fast"}
    assert shown("view") == {"API_TOKEN": "<redacted>", "MODE": "<redacted>"}
    assert "t0ps3cret" not in clients["view"].get("/api/tasks/history").text


def test_logs_and_command_text_are_the_owners_and_admins_only(
    clients: dict[str, httpx.Client],
) -> None:
    secret = "s3cr3t-in-argv"
    sub = clients["op"].post(
        "/api/tasks/submit", json={"type": "shell", "shell": f"echo {secret}; echo err >&2"}
    )
    assert sub.status_code == 200, sub.text
    task_id = sub.json()["task_id"]
    assert wait_state(clients["op"], task_id)["state"] == "done"
    logs = f"/api/tasks/{task_id}/logs"
    for who in ("op", "adm"):  # the owner and an admin read the logs
        r = clients[who].get(logs)
        assert r.status_code == 200, r.text
        assert (r.json()["stdout"], r.json()["stderr"]) == (f"{secret}\n", "err\n")
    r = clients["view"].get(logs)  # another caller: 403, and nothing of the output
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "forbidden"
    assert secret not in r.text
    assert clients["view"].get(logs, params={"attempt": 1}).status_code == 403
    # ... nor of the command, in status and history; the owner and admins see it.
    status = clients["view"].get("/api/tasks/status", params={"task_id": task_id}).json()
    assert status["spec"]["shell"] == "<redacted>"
    assert (status["stdout_tail"], status["stderr_tail"]) == ("<redacted>", "<redacted>")
    page = clients["view"].get("/api/tasks/history", params={"limit": 1000}).text
    assert secret not in page
    for who in ("op", "adm"):
        shown = clients[who].get("/api/tasks/status", params={"task_id": task_id}).json()
        assert secret in shown["spec"]["shell"] and shown["stdout_tail"] == f"{secret}\n"
    # An operator is "another caller" for an admin's task, and cmd keeps its list shape.
    mine = clients["adm"].post("/api/tasks/submit", json={"type": "cmd", "cmd": ["sleep", "0"]})
    adm_task = mine.json()["task_id"]
    wait_state(clients["adm"], adm_task)
    assert clients["op"].get(f"/api/tasks/{adm_task}/logs").status_code == 403
    seen = clients["op"].get("/api/tasks/status", params={"task_id": adm_task}).json()
    assert seen["spec"]["cmd"] == ["<redacted>"]
    # A viewer reads the logs of its own task; an unknown task stays 404.
    noop = clients["view"].post("/api/tasks/submit", json={"type": "noop"}).json()["task_id"]
    assert clients["view"].get(f"/api/tasks/{noop}/logs").status_code == 200
    assert clients["view"].get("/api/tasks/nope/logs").status_code == 404


def test_viewers_have_a_payload_limit_and_a_quota_of_queued_maintenance(
    clients: dict[str, httpx.Client],
) -> None:
    view2 = clients["view2"]
    big = view2.post(
        "/api/tasks/submit", json={"type": "warmup", "payload": {"max_blocks": 1, "pad": "x" * 80}}
    )
    assert big.status_code == 422, big.text
    assert big.json()["error"]["field"] == "payload"
    assert "viewer_max_payload_bytes" in big.json()["error"]["message"]
    for _ in range(2):
        assert view2.post("/api/tasks/submit", json={"type": "noop"}).status_code == 200
    over = view2.post("/api/tasks/submit", json={"type": "noop"})
    assert over.status_code == 429, over.text
    assert over.json()["error"]["code"] == "quota_exceeded"
    assert "viewer_max_queued" in over.json()["error"]["message"]
    assert clients["op"].post("/api/tasks/submit", json={"type": "noop"}).status_code == 200


def test_an_allowed_program_is_the_daemons_whatever_path_the_task_gives(
    clients: dict[str, httpx.Client], dirs: dict[str, Path]
) -> None:
    op = clients["op"]
    task_env = {"PATH": f"{dirs['theirs']}:/usr/bin:/bin"}
    sub = op.post("/api/tasks/submit", json={"type": "cmd", "cmd": ["mytool"], "env": task_env})
    assert sub.status_code == 200, sub.text
    status = wait_state(op, sub.json()["task_id"])
    assert (status["state"], status["stdout_tail"]) == ("done", "ours\n")
    refused = op.post(
        "/api/tasks/submit", json={"type": "cmd", "cmd": ["onlythere"], "env": task_env}
    )
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["field"] == "cmd"
    time.sleep(0.3)
    assert not dirs["marker"].exists()


def test_validate_says_what_it_waits_for_and_leaves_nothing_queued(
    server: ServerProcess, clients: dict[str, httpx.Client]
) -> None:
    started = time.time()
    result = run_validation(server.url, "op", step_timeout_s=8.0)
    assert result["result"] == "FAIL"
    assert result["message"].startswith("noop ran in an idle window: ")
    assert "waiting for an idle window: idle for" in result["message"]
    assert "maintenance_idle_s 100000 s" in result["message"]
    mine = owner_of("op")
    query = {"limit": 1000, "since": started}
    page = clients["adm"].get("/api/tasks/history", params=query).json()["tasks"]
    assert len(page) >= 6 and {t["owner"] for t in page} == {mine}
    left = [t["task_id"] for t in page if t["state"] not in ("done", "failed", "cancelled")]
    assert left == []
    noop = [t for t in page if t["type"] == "noop"]
    assert [t["state"] for t in noop] == ["cancelled"]


def test_the_data_directory_and_task_files_are_private(
    server: ServerProcess, clients: dict[str, httpx.Client]
) -> None:
    op = clients["op"]
    sub = op.post("/api/tasks/submit", json={"type": "shell", "shell": "echo out; echo err >&2"})
    task_id = sub.json()["task_id"]
    assert wait_state(op, task_id)["state"] == "done"
    data = server.data_dir
    logs = data / "task-logs" / task_id[:2]
    private = {
        data: 0o700,
        data / "tasks.sqlite": 0o600,
        data / "tasks.sqlite-wal": 0o600,
        data / "task-logs": 0o700,
        logs: 0o700,
        logs / f"{task_id}.1.stdout": 0o600,
        logs / f"{task_id}.1.stderr": 0o600,
    }
    assert {p: stat.S_IMODE(p.stat().st_mode) for p in private} == private


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)  # leave nothing behind, then fail
        return False
    return True


def _started_pids(client: httpx.Client, body: dict[str, Any], timeout_s: float) -> tuple[int, int]:
    """Submit ``body`` (a task that prints the pid of what it started in the background,
    then its own) and wait until both are in its output."""
    task_id = client.post("/api/tasks/submit", json=body).json()["task_id"]
    deadline = time.monotonic() + timeout_s
    while True:
        out = client.get(f"/api/tasks/{task_id}/logs").json()["stdout"].split()
        if len(out) == 2:
            return int(out[0]), int(out[1])
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.05)


WARM_SCRIPT = """
import subprocess, sys, time
background = subprocess.Popen(["sleep", "300"])
print(background.pid, flush=True)
import os
print(os.getpid(), flush=True)
time.sleep(300)
"""


@pytest.mark.slow
def test_a_sigkilled_daemons_warm_task_and_what_it_started_die_with_it(tmp_path: Path) -> None:
    """A task forked from the warm runner is the runner's child, not the daemon's: its group
    is listed with the guard all the same, so what it started in the background dies too."""
    script = tmp_path / "starts_sleep.py"
    script.write_text(WARM_SCRIPT)
    first = start_server(tmp_path, "[devices]\nbackends = []\n")
    try:
        with first.client() as client:
            body = {"type": "cmd", "cmd": ["python", str(script)], "warm": True, "max_retries": 0}
            background, main = _started_pids(client, body, timeout_s=30)
        assert psutil.Process(main).ppid() != first.proc.pid  # forked by the warm runner
        assert _alive(main) and _alive(background)
    finally:
        first.kill(signal.SIGKILL)
        if first.proc.stdout:
            first.proc.stdout.close()
    assert _wait_gone(main, 5.0), "the warm task outlived its daemon"
    assert _wait_gone(background, 5.0), "what the warm task started outlived its daemon"


@pytest.mark.slow
@pytest.mark.parametrize("guard_killed", [False, True])
def test_a_sigkilled_daemons_task_processes_die_with_it(tmp_path: Path, guard_killed: bool) -> None:
    """The task's whole process group dies with the daemon (its guard kills it); when the
    guard was killed too, the next start kills what is left."""
    config = "[devices]\nbackends = []\n"
    script = "sleep 300 & echo $!; echo $$; exec sleep 300"
    first = start_server(tmp_path, config)
    try:
        with first.client() as client:
            body = {"type": "cmd", "cmd": ["sh", "-c", script], "max_retries": 0}
            background, main = _started_pids(client, body, timeout_s=20)
        assert _alive(main) and _alive(background)
        if guard_killed:
            (guard,) = [
                child
                for child in psutil.Process(first.proc.pid).children()
                if any(part.endswith("guard.py") for part in child.cmdline())
            ]
            guard.kill()
            assert _wait_gone(guard.pid, 5.0)
    finally:
        first.kill(signal.SIGKILL)
        if first.proc.stdout:
            first.proc.stdout.close()
    if not guard_killed:
        # the guard kills at once; the margin is for a machine loaded by other work
        assert _wait_gone(main, 10.0), "the task outlived its daemon"
        assert _wait_gone(background, 10.0), "what the task started outlived its daemon"
        return
    assert _alive(main) and _alive(background)  # nothing left to kill them: the next start does
    with running_server(tmp_path, config, data_dir=first.data_dir):
        assert _wait_gone(main, 5.0), "the next start left the task running"
        assert _wait_gone(background, 5.0), "the next start left the task's leftovers running"
        assert _wait_gone(background, 5.0), "the next start left the task's leftovers running"


def test_validate_on_a_host_without_idle_window_waits_for_the_maintenance_deadline(
    tmp_path: Path,
) -> None:
    """No idle window ever comes, but the daemon runs a maintenance task anyway once it has
    waited ``maintenance_max_wait_s``: validation passes when that is longer than a step."""
    config = CONFIG.replace("maintenance_max_wait_s = 0", "maintenance_max_wait_s = 25")
    with running_server(tmp_path, config, env={"VRM_DISABLE_RATE_LIMIT": "1"}) as server:
        result = run_validation(server.url, "op", step_timeout_s=3.0)
    # the steps before the noop's take a few seconds: it runs well after they end
    assert result["result"] == "PASS", result["message"]
    assert [step["ok"] for step in result["steps"]] == [True] * 10
