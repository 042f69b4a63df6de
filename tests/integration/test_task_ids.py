"""Shortened task ids against a real ``vramancer serve``: any unique start of at least 4
characters of an id works wherever an id is taken (the HTTP routes, and the CLI's ``watch``,
``tasks cancel`` and ``tasks logs``); one that starts several ids is a 409 listing them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import (
    OPERATOR_SIM_GPU_CONFIG,
    ServerProcess,
    operator_env,
    running_server,
    wait_for,
)
from vramancer.cli.main import app

CONFIG = OPERATOR_SIM_GPU_CONFIG

runner = CliRunner()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp: Path = tmp_path_factory.mktemp("task-ids")
    with running_server(tmp, CONFIG, env={"VRM_DISABLE_RATE_LIMIT": "1"}) as proc:
        yield proc


def submit(server: ServerProcess, task_id: str, cmd: list[str]) -> None:
    with server.client("op") as client:
        body = {"type": "cmd", "cmd": cmd, "task_id": task_id}
        assert client.post("/api/tasks/submit", json=body).status_code == 200


def state(server: ServerProcess, task_id: str) -> str:
    with server.client("op") as client:
        return str(client.get("/api/tasks/status", params={"task_id": task_id}).json()["state"])


def test_the_http_routes_take_a_unique_prefix(server: ServerProcess) -> None:
    submit(server, "prefix-http-1", ["echo", "one"])
    wait_for(lambda: state(server, "prefix-http-1") == "done", what="task done")
    with server.client("op") as client:
        status = client.get("/api/tasks/status", params={"task_id": "prefix-http"})
        assert status.status_code == 200 and status.json()["task_id"] == "prefix-http-1"
        logs = client.get("/api/tasks/prefix-http/logs")
        assert logs.status_code == 200 and logs.json()["stdout"] == "one\n"
        # A second task that starts the same way: the short form is now ambiguous.
        submit(server, "prefix-http-2", ["sleep", "30"])
        for answer in (
            client.get("/api/tasks/status", params={"task_id": "prefix-http"}),
            client.get("/api/tasks/prefix-http/logs"),
            client.post("/api/tasks/prefix-http/cancel"),
        ):
            assert answer.status_code == 409, answer.text
            error = answer.json()["error"]
            assert error["code"] == "ambiguous_task_id"
            assert error["candidates"] == ["prefix-http-1", "prefix-http-2"]
            assert "prefix-http-1, prefix-http-2" in error["message"]
        assert state(server, "prefix-http-2") != "cancelled"  # nothing changed
        cancelled = client.post("/api/tasks/prefix-http-2/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["task_id"] == "prefix-http-2"
        # Too short, or the start of nothing: 404.
        for short in ("pre", "prefix-none"):
            missing = client.get("/api/tasks/status", params={"task_id": short})
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        too_short = client.get("/api/tasks/pre/logs").json()["error"]
        assert too_short["code"] == "not_found" and "at least 4 characters" in too_short["message"]


def test_the_cli_takes_the_12_characters_the_dashboard_shows(server: ServerProcess) -> None:
    env = operator_env(server.url)
    done = runner.invoke(app, ["submit", "--wait", "--", "echo", "from-cli"], env=env)
    assert done.exit_code == 0, done.output
    short = done.stdout.splitlines()[0][:12]
    logs = runner.invoke(app, ["tasks", "logs", short], env=env)
    assert (logs.exit_code, logs.stdout) == (0, "from-cli\n"), logs.output
    watched = runner.invoke(app, ["watch", short], env=env)
    assert watched.exit_code == 0 and "from-cli" in watched.stdout, watched.output
    sleeping = runner.invoke(app, ["submit", "--", "sleep", "30"], env=env)
    task_id = sleeping.stdout.strip()
    cancelled = runner.invoke(app, ["tasks", "cancel", task_id[:12], "--json"], env=env)
    assert cancelled.exit_code == 0, cancelled.output
    assert json.loads(cancelled.stdout)["task_id"] == task_id
    assert wait_for(lambda: state(server, task_id) == "cancelled", what="cancelled")


def test_the_cli_names_the_candidates_of_an_ambiguous_prefix(server: ServerProcess) -> None:
    env = operator_env(server.url)
    submit(server, "twin-cli-a", ["true"])
    submit(server, "twin-cli-b", ["true"])
    for command in (["watch", "twin-cli"], ["tasks", "logs", "twin"], ["tasks", "cancel", "twin"]):
        result = runner.invoke(app, command, env=env)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("error: task id ")
        assert "twin-cli-a, twin-cli-b" in result.stderr and "HTTP 409" in result.stderr
