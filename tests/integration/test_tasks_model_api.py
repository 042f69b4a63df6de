"""Tasks that name a managed model, over HTTP and the CLI against a real ``vramancer serve``
(one simulated GPU, a small torch model): the runtime wires the model manager into the task
service, so the model is loaded for the task; an unknown model is a 422 naming the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.helpers import ServerProcess, operator_env, running_server
from vramancer.cli.main import app

pytestmark = pytest.mark.integration

CONFIG = """
[auth]
tokens = { "op" = "operator" }

[devices]
backends = []
[[devices.simulated]]
name = "sim0"
memory = "12GiB"

[[models]]
name = "clip"
backend = "torch"
factory = "tests.unit.models.tiny:tiny"
vram = "500MiB"
idle_timeout_s = 600

[tasks]
maintenance_idle_s = 0
maintenance_max_cpu_ratio = 1.0
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(
        tmp_path_factory.mktemp("tasks-model"), CONFIG, env={"VRM_DISABLE_RATE_LIMIT": "1"}
    ) as proc:
        yield proc


@pytest.fixture(scope="module")
def op(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client("op") as client:
        yield client


def cli(server: ServerProcess, *args: str) -> Any:
    return CliRunner().invoke(app, list(args), env=operator_env(server.url))


def test_unknown_model_is_422_naming_the_field_and_queues_nothing(op: httpx.Client) -> None:
    before = op.get("/api/tasks/history").json()
    r = op.post("/api/tasks/submit", json={"type": "cmd", "cmd": ["true"], "model": "nope"})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "invalid_input"
    assert "model: no managed model 'nope' (models: clip)" in error["message"]
    assert op.get("/api/tasks/history").json() == before


def test_cli_submit_with_model_loads_it_for_the_task(
    server: ServerProcess, op: httpx.Client
) -> None:
    assert op.get("/v1/models").json()["models"][0]["state"] == "unloaded"
    run = cli(server, "submit", "--model", "clip", "--wait", "--", "sh", "-c", 'echo "$VRM_MODEL"')
    assert run.exit_code == 0, run.output
    task_id, *lines = run.stdout.splitlines()
    assert lines == ["clip"]
    status = op.get("/api/tasks/status", params={"task_id": task_id}).json()
    assert (status["state"], status["model"]) == ("done", "clip")
    clip = op.get("/v1/models").json()["models"][0]
    assert (clip["name"], clip["state"], clip["device"]) == ("clip", "loaded", "gpu:0")
    bad = cli(server, "submit", "--model", "nope", "--json", "--", "true")
    assert bad.exit_code == 1
    assert "model" in bad.output and "nope" in bad.output
    listed = json.loads(cli(server, "tasks", "list", "--json").stdout)
    assert task_id in json.dumps(listed)
