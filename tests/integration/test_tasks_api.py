"""The tasks API and CLI against a real ``vramancer serve`` (tokens, simulated GPUs)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from tests.helpers import ServerProcess, free_port, start_server
from vramancer.cli.main import app

pytestmark = pytest.mark.integration

CONFIG = """
[auth]
tokens = { "adm" = "admin", "op" = "operator", "view" = "viewer" }

[devices]
backends = []
[[devices.simulated]]
name = "sim0"
memory = "24GiB"
[[devices.simulated]]
name = "sim1"
memory = "12GiB"

[tasks]
maintenance_idle_s = 0
maintenance_max_cpu_ratio = 1.0
backoff_base_s = 0.1
max_payload_bytes = 4096
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("tasks-api")
    proc = start_server(tmp, CONFIG, env={"VRM_DISABLE_RATE_LIMIT": "1"})
    yield proc
    proc.stop()
    if proc.proc.stdout:
        proc.proc.stdout.close()


@pytest.fixture(scope="module")
def op(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client("op") as client:
        yield client


@pytest.fixture(scope="module")
def viewer(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client("view") as client:
        yield client


def wait_state(client: httpx.Client, task_id: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = client.get("/api/tasks/status", params={"task_id": task_id}).json()
        if status["state"] in ("done", "failed", "cancelled"):
            return status
        assert time.monotonic() < deadline, f"{task_id} still {status['state']}"
        time.sleep(0.05)


def total_tasks(client: httpx.Client) -> int:
    counts = client.get("/api/tasks/stats").json()["counts"]
    return sum(counts.values())


def test_submit_status_logs_and_history(op: httpx.Client) -> None:
    body = {"type": "cmd", "cmd": ["sh", "-c", "echo out-$VRM_TASK_ID; echo oops >&2"], "gpu": 1}
    r = op.post("/api/tasks/submit", json=body)
    assert r.status_code == 200, r.text
    task_id = r.json()["task_id"]
    status = wait_state(op, task_id)
    assert (status["state"], status["exit_code"], status["attempts"]) == ("done", 0, 1)
    assert status["device"] == "gpu:1"
    logs = op.get(f"/api/tasks/{task_id}/logs").json()
    assert logs["stdout"] == f"out-{task_id}\n"
    assert logs["stderr"] == "oops\n"
    second = op.post("/api/tasks/submit", json={"type": "noop"}).json()["task_id"]
    wait_state(op, second)
    first_page = op.get("/api/tasks/history", params={"limit": 1}).json()
    assert [t["task_id"] for t in first_page["tasks"]] == [second]
    next_page = op.get(
        "/api/tasks/history", params={"limit": 1, "cursor": first_page["next_cursor"]}
    ).json()
    assert [t["task_id"] for t in next_page["tasks"]] == [task_id]
    done = op.get("/api/tasks/history", params={"state": "done", "limit": 1000}).json()
    assert {task_id, second} <= {t["task_id"] for t in done["tasks"]}


def test_submit_batch_queues_every_task(op: httpx.Client) -> None:
    r = op.post("/api/tasks/submit_batch", json={"tasks": [{"type": "noop"}] * 50})
    assert r.status_code == 200, r.text
    ids = r.json()["task_ids"]
    assert len(set(ids)) == 50
    for task_id in ids:
        assert wait_state(op, task_id)["state"] == "done"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"type": "bogus"}, 422, "type"),
        ({"type": "cmd"}, 422, "'cmd'"),
        ({"type": "cmd", "cmd": ["true"], "timeout": -5}, 422, "timeout"),
        ({"type": "cmd", "cmd": ["true"], "gpu": 9}, 422, "gpu 9 does not exist"),
        ({"type": "cmd", "cmd": ["true"], "vram": "100GiB"}, 422, "VRAM"),
        ({"type": "cmd", "cmd": ["echo", "x" * 5000]}, 413, "max_payload_bytes"),
        ({"type": "cmd", "cmd": "true"}, 422, "cmd"),
        ({"type": "cmd", "cmd": ["true"], "gpu": True}, 422, "gpu"),
        ({"type": "cmd", "cmd": ["true"], "timeout": "NaN"}, 422, "timeout"),
        ({"type": "cmd", "cmd": ["true"], "priority": "urgent"}, 422, "priority"),
        ({"type": "cmd", "cmd": ["true"], "env": {"1A": "x"}}, 422, "env"),
        ({"type": "noop", "gpu": 0}, 422, "gpu"),
    ],
)
def test_bad_submissions_are_4xx_and_queue_nothing(
    op: httpx.Client, body: dict[str, Any], status: int, field: str
) -> None:
    before = total_tasks(op)
    r = op.post("/api/tasks/submit", json=body)
    assert r.status_code == status, r.text
    assert field in r.json()["error"]["message"], r.text
    batch = op.post("/api/tasks/submit_batch", json={"tasks": [{"type": "noop"}, body]})
    assert batch.status_code == status, batch.text
    assert field in batch.json()["error"]["message"], batch.text
    assert total_tasks(op) == before


def test_viewer_may_not_run_code(viewer: httpx.Client, op: httpx.Client) -> None:
    before = total_tasks(op)
    for body in (
        {"type": "shell", "shell": "true"},
        {"type": "cmd", "cmd": ["true"]},
        {"type": "python", "python": "os:getpid"},
    ):
        r = viewer.post("/api/tasks/submit", json=body)
        assert r.status_code == 403, r.text
        assert "operator role" in r.json()["error"]["message"]
    mixed = viewer.post(
        "/api/tasks/submit_batch",
        json={"tasks": [{"type": "noop"}, {"type": "shell", "shell": "true"}]},
    )
    assert mixed.status_code == 403
    assert total_tasks(op) == before
    ok = viewer.post("/api/tasks/submit", json={"type": "noop"})
    assert ok.status_code == 200
    task_id = ok.json()["task_id"]
    assert viewer.get("/api/tasks/status", params={"task_id": task_id}).status_code == 200
    assert viewer.post(f"/api/tasks/{task_id}/cancel").status_code == 403


def test_unknown_tasks_and_bad_queries(op: httpx.Client, server: ServerProcess) -> None:
    assert op.get("/api/tasks/status", params={"task_id": "nope"}).status_code == 404
    assert op.post("/api/tasks/nope/cancel").status_code == 404
    assert op.get("/api/tasks/nope/logs").status_code == 404
    bad_queries = [
        ("/api/tasks/history", {"cursor": "abc"}, "cursor"),
        ("/api/tasks/history", {"cursor": "9" * 20}, "cursor"),  # past SQLite's integers
        ("/api/tasks/history", {"cursor": "\u00b2"}, "cursor"),  # a digit to str.isdigit()
        ("/api/tasks/history", {"state": "sleeping"}, "state"),
        ("/api/tasks/history", {"limit": 0}, "limit"),
        ("/api/tasks/history", {"since": "yesterday"}, "since"),
        ("/api/tasks/status", {}, "task_id"),
    ]
    known = op.post("/api/tasks/submit", json={"type": "cmd", "cmd": ["echo", "hi"]}).json()
    wait_state(op, known["task_id"])
    logs = f"/api/tasks/{known['task_id']}/logs"
    for name in ("stdout_offset", "stderr_offset", "max_bytes"):
        bad_queries += [(logs, {name: 10**22}, name), (logs, {name: 2**60}, name)]
    for path, params, field in bad_queries:
        r = op.get(path, params=params)
        assert r.status_code == 422, (path, params, r.text)
        assert field in r.json()["error"]["message"], (params, r.text)
    past_end = op.get(logs, params={"stdout_offset": 2**40}).json()
    assert (past_end["stdout"], past_end["stdout_next"]) == ("", 2**40)
    with server.client() as anonymous:
        assert anonymous.post("/api/tasks/submit", json={"type": "noop"}).status_code == 401


def test_cancel_a_running_task_over_http(op: httpx.Client) -> None:
    task_id = op.post("/api/tasks/submit", json={"type": "cmd", "cmd": ["sleep", "60"]}).json()[
        "task_id"
    ]
    deadline = time.monotonic() + 10
    while op.get("/api/tasks/status", params={"task_id": task_id}).json()["state"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert op.post(f"/api/tasks/{task_id}/cancel").status_code == 200
    assert wait_state(op, task_id)["state"] == "cancelled"
    again = op.post(f"/api/tasks/{task_id}/cancel")
    assert again.status_code == 409


def test_metrics_are_exported(op: httpx.Client) -> None:
    """Counters by type; wait and run time histograms by device only (bounded labels)."""
    task_id = op.post("/api/tasks/submit", json={"type": "cmd", "cmd": ["true"], "gpu": 1})
    assert wait_state(op, task_id.json()["task_id"])["state"] == "done"
    samples = {}
    for family in text_string_to_metric_families(op.get("/metrics").text):
        if family.name.startswith("vramancer_tasks_"):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append(sample.labels)
    for name in (
        "vramancer_tasks_submitted_total",
        "vramancer_tasks_completed_total",
        "vramancer_tasks_running",
        "vramancer_tasks_queue_depth",
        "vramancer_tasks_purged_total",
    ):
        assert name in samples, name
    # ``node`` may be added to every series by the registry; nothing per task, ever.
    assert any(s.get("type") == "cmd" for s in samples["vramancer_tasks_completed_total"])
    for histogram in ("vramancer_tasks_run_seconds", "vramancer_tasks_wait_seconds"):
        series = samples[histogram + "_count"]
        assert any(labels.get("device") == "gpu:1" for labels in series), series
        for labels in samples[histogram + "_bucket"] + series:
            assert set(labels) - {"le", "node"} == {"device"}, labels


# ------------------------------------------------------------------------------ CLI


def cli(server: ServerProcess, *args: str, token: str = "op") -> Any:
    runner = CliRunner()
    return runner.invoke(app, list(args), env={"VRM_URL": server.url, "VRM_API_TOKEN": token})


def test_cli_submit_wait_follows_output_and_exit_code(server: ServerProcess) -> None:
    ok = cli(server, "submit", "--wait", "--", "sh", "-c", "echo one; echo two")
    assert ok.exit_code == 0, ok.output
    lines = ok.stdout.splitlines()
    task_id = lines[0]
    assert lines[1:] == ["one", "two"]
    failed = cli(server, "submit", "--retries", "0", "--wait", "--", "sh", "-c", "exit 5")
    assert failed.exit_code == 5
    watched = cli(server, "watch", task_id, "--json")
    assert watched.exit_code == 0
    assert '"state": "done"' in watched.stdout
    listed = cli(server, "tasks", "list", "--json", "--limit", "5")
    assert task_id in listed.stdout
    table = cli(server, "tasks", "list", "--limit", "5")
    assert task_id in table.stdout  # the whole id, even on an 80-column terminal
    logs = cli(server, "tasks", "logs", task_id)
    assert logs.stdout == "one\ntwo\n"


def test_cli_follows_every_attempt_and_shows_the_logs_of_each(server: ServerProcess) -> None:
    script = (
        'echo "a$VRM_TASK_ATTEMPT"; [ "$VRM_TASK_ATTEMPT" -ge 2 ] || { sleep 0.5; echo b; exit 1; }'
    )
    run = cli(server, "submit", "--retries", "1", "--wait", "--", "sh", "-c", script)
    assert run.exit_code == 0, run.output
    task_id, *lines = run.stdout.splitlines()
    assert lines == ["a1", "b", "a2"]  # the end of attempt 1 is printed before attempt 2
    first = cli(server, "tasks", "logs", task_id, "--attempt", "1")
    assert first.stdout == "a1\nb\n"
    assert cli(server, "tasks", "logs", task_id).stdout == "a2\n"
    missing = cli(server, "tasks", "logs", task_id, "--attempt", "3")
    assert missing.exit_code == 1 and "attempt must be between 1 and 2" in missing.output


def test_cli_submit_options_and_cancel(server: ServerProcess, op: httpx.Client) -> None:
    sub = cli(
        server,
        "submit",
        "--gpu",
        "0",
        "--vram",
        "1GiB",
        "--timeout",
        "30",
        "--priority",
        "high",
        "--env",
        "A=b",
        "--json",
        "--",
        "sleep",
        "30",
    )
    assert sub.exit_code == 0, sub.output
    task_id = sub.stdout.split('"task_id": "')[1].split('"')[0]
    status = op.get("/api/tasks/status", params={"task_id": task_id}).json()
    assert status["spec"]["env"] == {"A": "b"}
    assert (status["gpu"], status["vram_bytes"], status["priority"]) == (0, 1024**3, "high")
    cancelled = cli(server, "tasks", "cancel", task_id)
    assert cancelled.exit_code == 0
    assert wait_state(op, task_id)["state"] == "cancelled"
    bad = cli(server, "submit", "--vram", "lots", "--", "true")
    assert bad.exit_code == 2
    refused = cli(server, "submit", "--", "true", token="view")
    assert refused.exit_code == 1
    assert "operator role" in refused.output


def test_cli_submit_runs_in_the_directory_it_is_typed_in(
    server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "train.sh").write_text('echo "in $PWD"\n')
    monkeypatch.chdir(tmp_path / "job")
    here = cli(server, "submit", "--wait", "--", "sh", "train.sh")
    assert here.exit_code == 0, here.output
    assert here.stdout.splitlines()[1:] == [f"in {tmp_path / 'job'}"]
    monkeypatch.chdir(tmp_path)
    given = cli(server, "submit", "--cwd", "job", "--wait", "--", "sh", "train.sh")
    assert given.stdout.splitlines()[1:] == [f"in {tmp_path / 'job'}"], given.output
    scratch = cli(server, "submit", "--scratch", "--wait", "--", "sh", "-c", 'echo "$PWD"')
    task_id, where = scratch.stdout.splitlines()
    assert (Path(where).name, Path(where).parents[1]) == (task_id, server.data_dir / "scratch")
    both = cli(server, "submit", "--scratch", "--cwd", "/tmp", "--", "true")
    assert both.exit_code == 2 and "--scratch and --cwd" in both.output


def test_cli_validate_passes_against_the_server(server: ServerProcess) -> None:
    result = cli(server, "validate", "--timeout", "30")
    assert result.exit_code == 0, result.output
    assert "PASS:" in result.stdout


def test_cli_validate_fails_with_the_reason_when_no_server_answers(tmp_path: Path) -> None:
    runner = CliRunner()
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, ["validate"], env={"VRM_URL": url})
    assert result.exit_code == 1
    assert "FAIL: server and devices answer: cannot reach" in result.stdout
