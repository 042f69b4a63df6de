"""Edges of the CLI against a real ``vramancer serve``: VRM_URL without a scheme, a task with no
output, Ctrl-C during ``submit --wait``, and errors as JSON under ``--json``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.helpers import (
    OPERATOR_SIM_GPU_CONFIG,
    ServerProcess,
    free_port,
    operator_env,
    start_server,
)
from vramancer.cli.main import app

CONFIG = (
    OPERATOR_SIM_GPU_CONFIG
    + """
[tasks]
maintenance_idle_s = 0
maintenance_max_cpu_ratio = 1.0
"""
)

runner = CliRunner()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("cli-edges")
    proc = start_server(tmp, CONFIG, env={"VRM_DISABLE_RATE_LIMIT": "1"})
    yield proc
    proc.stop()
    if proc.proc.stdout:
        proc.proc.stdout.close()


def env_for(server: ServerProcess, url: str | None = None) -> dict[str, str]:
    return operator_env(url or server.url)


def test_a_url_without_a_scheme_means_http(server: ServerProcess) -> None:
    result = runner.invoke(
        app, ["tasks", "list", "--json"], env=env_for(server, f"localhost:{server.port}")
    )
    assert result.exit_code == 0, result.output
    assert "tasks" in json.loads(result.stdout)


@pytest.mark.parametrize(
    ("url", "why"),
    [("ftp://127.0.0.1:8470", "scheme 'ftp'"), ("localhost:notaport", "not a URL")],
)
def test_a_url_with_another_scheme_or_unparsable_is_a_one_line_error(
    tmp_path: Path, url: str, why: str
) -> None:
    config = tmp_path / "vramancer.toml"
    config.write_text(
        '[devices]\nbackends = []\n[[devices.simulated]]\nname = "s"\nmemory = "1GiB"\n'
    )
    # status would fall back to this machine for a server that does not answer: not here.
    result = runner.invoke(app, ["status"], env={"VRM_URL": url, "VRM_CONFIG": str(config)})
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: VRM_URL: "), result.stderr
    assert why in lines[0] and repr(url) in lines[0]


def wait_state(server: ServerProcess, task_id: str, states: set[str]) -> str:
    deadline = time.monotonic() + 15
    with server.client("op") as client:
        while time.monotonic() < deadline:
            status = client.get("/api/tasks/status", params={"task_id": task_id}).json()
            if status["state"] in states:
                return str(status["state"])
            time.sleep(0.1)
    raise AssertionError(f"task {task_id} never reached {states}")


def test_logs_of_a_task_without_output_say_so_on_stderr(server: ServerProcess) -> None:
    submitted = runner.invoke(app, ["submit", "--wait", "--", "true"], env=env_for(server))
    assert submitted.exit_code == 0, submitted.output
    task_id = submitted.stdout.splitlines()[0]
    logs = runner.invoke(app, ["tasks", "logs", task_id], env=env_for(server))
    assert logs.exit_code == 0, logs.output
    assert logs.stdout == ""
    assert logs.stderr.strip() == "(no output)"
    as_json = runner.invoke(app, ["tasks", "logs", task_id, "--json"], env=env_for(server))
    assert as_json.exit_code == 0 and as_json.stderr == ""
    data = json.loads(as_json.stdout)
    assert (data["stdout"], data["stderr"]) == ("", "")
    # A task that wrote something does not get the note.
    echoed = runner.invoke(app, ["submit", "--wait", "--", "echo", "hi"], env=env_for(server))
    task_id = echoed.stdout.splitlines()[0]
    logs = runner.invoke(app, ["tasks", "logs", task_id], env=env_for(server))
    assert (logs.stdout, logs.stderr) == ("hi\n", "")


def test_ctrl_c_during_submit_wait_says_the_task_still_runs(server: ServerProcess) -> None:
    env = {**os.environ, **env_for(server)}
    cmd = [sys.executable, "-m", "vramancer.main", "--mode", "cli"]
    proc = subprocess.Popen(
        [*cmd, "submit", "--wait", "--", "sleep", "30"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        task_id = proc.stdout.readline().strip()  # printed once the task is submitted
        assert task_id, proc.stderr.read() if proc.stderr else ""
        wait_state(server, task_id, {"running"})
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert f"task {task_id} still runs" in err
    assert f"vramancer tasks cancel {task_id}" in err
    assert "Traceback" not in err
    with server.client("op") as client:
        status = client.get("/api/tasks/status", params={"task_id": task_id}).json()
        assert status["state"] == "running"
        client.post(f"/api/tasks/{task_id}/cancel")


def test_an_error_under_json_is_printed_as_json(server: ServerProcess) -> None:
    missing = "no-such-task"
    plain = runner.invoke(app, ["tasks", "cancel", missing], env=env_for(server))
    assert plain.exit_code == 1
    assert plain.stderr.startswith("error: ")
    result = runner.invoke(app, ["tasks", "cancel", missing, "--json"], env=env_for(server))
    assert result.exit_code == 1
    assert result.stdout == ""
    error = json.loads(result.stderr)["error"]
    assert set(error) == {"message"} and "HTTP 404" in error["message"]
    # An unreachable server too (a closed port).
    closed = {"VRM_URL": f"http://127.0.0.1:{free_port()}"}
    result = runner.invoke(app, ["tasks", "list", "--json"], env=closed)
    assert result.exit_code == 1
    assert "cannot reach VRAMancer" in json.loads(result.stderr)["error"]["message"]
    # The next command without --json (same process) prints plain text again.
    plain = runner.invoke(app, ["tasks", "list"], env=closed)
    assert plain.exit_code == 1 and plain.stderr.startswith("error: cannot reach VRAMancer")
