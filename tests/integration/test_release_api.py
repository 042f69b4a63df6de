"""The release agent over HTTP against a real ``vramancer serve``: prepare in the background
(its test step a GPU task of the daemon), confirmation, roles, and tasks run in a release."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.gitrepo import BUILD, TEST, GitRepo
from tests.helpers import ServerProcess, operator_env, start_server, toml_value, wait_for
from vramancer.client import Client

pytestmark = pytest.mark.integration

CONFIG = """
[auth]
tokens = {{ "adm" = "admin", "op" = "operator", "view" = "viewer" }}

[devices]
backends = []
[[devices.simulated]]
name = "sim0"
memory = "8GiB"

[release]
repo = {repo}
dir = {dir}
build = {build}
test = {test}
vram = "1GiB"
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, GitRepo]]:
    tmp = tmp_path_factory.mktemp("release-api")
    repo = GitRepo(tmp / "repo")
    text = CONFIG.format(
        repo=toml_value(str(repo.path)),
        dir=toml_value(str(tmp / "deploy")),
        build=toml_value(BUILD),
        test=toml_value(TEST),
    )
    server = start_server(tmp, text, env={"VRM_DISABLE_RATE_LIMIT": "1"})
    try:
        yield server, repo
    finally:
        server.kill()
        if server.proc.stdout:
            server.proc.stdout.close()


@pytest.fixture
def clients(world: tuple[ServerProcess, GitRepo]) -> Iterator[dict[str, httpx.Client]]:
    server, _ = world
    made = {token: server.client(token) for token in ("view", "op", "adm")}
    try:
        yield made
    finally:
        for each in made.values():
            each.close()


def prepared(api: httpx.Client) -> dict[str, Any]:
    """Start a prepare and wait for it; the release's result."""
    started = api.post("/v1/release/prepare")
    assert started.status_code == 202, started.text
    status = wait_for(
        lambda: (s := api.get("/v1/release").json())["job"]["running"] is False and s,
        timeout=120,
        what="the prepare to end",
    )
    assert status["job"]["error"] is None or "failed" in status["job"]["error"]
    release = status["job"]["release"]
    return next(r for r in status["releases"] if r["name"] == release)


def finished(api: httpx.Client, task_id: str) -> dict[str, Any]:
    result: dict[str, Any] = wait_for(
        lambda: (
            (t := api.get("/api/tasks/status", params={"task_id": task_id}).json())["state"]
            in ("done", "failed", "cancelled")
            and t
        ),
        timeout=60,
    )
    return result


def test_release_over_http(
    world: tuple[ServerProcess, GitRepo], clients: dict[str, httpx.Client]
) -> None:
    server, repo = world
    viewer, op, adm = clients["view"], clients["op"], clients["adm"]
    repo.commit(passing=True, version="v1")

    empty = viewer.get("/v1/release").json()
    assert empty["configured"] is True and empty["releases"] == [] and empty["current"] is None
    assert viewer.post("/v1/release/prepare").status_code == 403

    first = prepared(op)
    assert first["state"] == "passed"
    assert first["test"]["gpu"] == "gpu:0" and first["test"]["task_id"]
    assert first["build"]["exit_code"] == 0

    logs = op.get("/v1/release/logs", params={"release": first["name"], "step": "test"})
    assert logs.status_code == 200, logs.text
    assert logs.json()["release"] == first["name"] and "tests pass" in logs.json()["test"]
    assert "build" not in logs.json() or logs.json()["build"] is None
    assert viewer.get("/v1/release/logs").status_code == 403
    assert op.get("/v1/release/logs", params={"release": "../x"}).status_code == 422
    assert op.get("/v1/release/logs", params={"step": "deploy"}).status_code == 422

    # accept: admin only, and only with {"confirm": true}
    assert op.post("/v1/release/accept", json={"confirm": True}).status_code == 403
    for body in (None, {}, {"confirm": False}):
        refused = adm.post("/v1/release/accept", json=body)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["code"] == "confirmation_required"
    assert viewer.get("/v1/release").json()["current"] is None
    done = adm.post("/v1/release/accept", json={"confirm": True})
    assert done.status_code == 200, done.text
    assert done.json()["release"] == first["name"]
    assert viewer.get("/v1/release").json()["current"] == first["name"]

    # a task in "current" keeps the release it started in when another is accepted under it
    repo.commit(passing=True, version="v2")
    second = prepared(op)
    assert viewer.get("/v1/release").json()["candidate"] == second["name"]
    body = {
        "type": "shell",
        "shell": "cat version.txt; pwd; sleep 2; cat version.txt",
        "release": "current",
    }
    task_id = op.post("/api/tasks/submit", json=body).json()["task_id"]
    wait_for(
        lambda: (
            op.get("/api/tasks/status", params={"task_id": task_id}).json()["state"] == "running"
        ),
        timeout=30,
    )
    assert adm.post("/v1/release/accept", json={"confirm": True}).status_code == 200
    assert finished(op, task_id)["state"] == "done"
    out = op.get(f"/api/tasks/{task_id}/logs").json()["stdout"].split()
    assert out[0] == "v1" and out[2] == "v1"
    assert Path(out[1]) == Path(first["path"]).resolve() / "checkout"

    # rollback to a named release; nothing to reject
    back = adm.post("/v1/release/rollback", json={"confirm": True, "release": first["name"]})
    assert back.status_code == 200 and back.json()["release"] == first["name"]
    with Client(server.url, "op") as vrm:  # the library's client, from any directory
        ran = vrm.run("cat", "version.txt", release="current", timeout_s=60)
        assert ran["state"] == "done" and vrm.logs(ran["task_id"])["stdout"] == "v1\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    env |= operator_env(server.url)
    cli = subprocess.run(
        [sys.executable, "-m", "vramancer.main", "--mode", "cli", "submit", "--release",
         "current", "--json", "--", "cat", "version.txt"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert finished(op, json.loads(cli.stdout)["task_id"])["state"] == "done"
    nothing = adm.post("/v1/release/reject", json={"confirm": True})
    assert nothing.status_code == 409 and nothing.json()["error"]["code"] == "release_refused"
    bad = adm.post("/v1/release/rollback", json={"confirm": True, "release": "../../etc"})
    assert bad.status_code == 422

    # a failing commit: the test task fails, nothing becomes the candidate
    repo.commit(passing=False, version="v3")
    third = prepared(op)
    assert third["state"] == "failed" and third["test"]["exit_code"] == 3
    assert viewer.get("/v1/release").json()["candidate"] is None


def test_task_release_field(clients: dict[str, httpx.Client]) -> None:
    op = clients["op"]
    both = {"type": "shell", "shell": "true", "release": "current", "cwd": "/tmp"}
    refused = op.post("/api/tasks/submit", json=both)
    assert refused.status_code == 422 and "cwd or release" in refused.text
    wrong = op.post("/api/tasks/submit", json={"type": "shell", "shell": "true", "release": "../x"})
    assert wrong.status_code == 422
    body = {"type": "shell", "shell": "true", "release": "candidate", "max_retries": 0}
    task_id = op.post("/api/tasks/submit", json=body).json()["task_id"]
    ended = finished(op, task_id)
    assert ended["state"] == "failed"
    assert "release 'candidate'" in ended["error"] and "no candidate release" in ended["error"]


def test_a_daemon_stopping_kills_its_prepare(tmp_path: Path) -> None:
    """SIGTERM while a prepare builds: the build (in its own session) is killed, the release
    is recorded failed, and the daemon exits."""
    repo = GitRepo(tmp_path / "repo")
    repo.commit(passing=True, version="v1")
    pidfile = tmp_path / "build.pid"
    text = (
        "[release]\n"
        f"repo = {toml_value(str(repo.path))}\n"
        f"dir = {toml_value(str(tmp_path / 'deploy'))}\n"
        f"build = {toml_value(f'echo $$ > {pidfile}; exec sleep 120')}\n"
    )
    server = start_server(tmp_path, text)
    try:
        with server.client() as api:
            assert api.post("/v1/release/prepare").status_code == 202
            wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=60)
            status = api.get("/v1/release").json()
            assert status["releases"][0]["state"] == "building"
            assert status["job"]["running"] is True and status["busy"]["action"] == "prepare"
            busy = api.post("/v1/release/prepare")
            assert busy.status_code == 409
        build_pid = int(pidfile.read_text())
        server.stop()
        assert server.proc.returncode is not None
    finally:
        server.kill()
        if server.proc.stdout:
            server.proc.stdout.close()
    with pytest.raises(ProcessLookupError):
        os.kill(build_pid, 0)
    result = json.loads(next((tmp_path / "deploy" / "releases").glob("*/result.json")).read_text())
    assert result["state"] == "failed" and "the agent stopped" in result["error"]
