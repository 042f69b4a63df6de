"""Who holds what, against a real ``vramancer serve``: ``status``/``top`` (people and
``--json``), the arbiter refusing memory used outside VRAMancer, and a waiting task's reason in
``tasks list`` and ``watch``."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from tests.helpers import ServerProcess, running_server
from tests.poolprocs import VRAMANCER
from vramancer.cli.main import app
from vramancer.units import GIB

pytestmark = pytest.mark.integration

CONFIG = """
[devices]
backends = []
[[devices.simulated]]
name = "sim0"
memory = "24GiB"
[[devices.simulated]]
name = "sim1"
memory = "8GiB"
used = "2GiB"

[tasks]
slots_per_device = 1
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("holders"), CONFIG) as proc:
        yield proc


def cli(server: ServerProcess, *args: str) -> Any:
    env = {"VRM_URL": server.url, "COLUMNS": "200"}
    return CliRunner().invoke(app, list(args), env=env)


def wait_state(client: httpx.Client, task_id: str, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get("/api/tasks/status", params={"task_id": task_id}).json()
        if body["state"] == state:
            return body
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never reached {state}: {body}")


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


def test_status_top_and_tasks_show_who_holds_what_and_why_a_task_waits(
    server: ServerProcess, client: httpx.Client
) -> None:
    granted = cli(server, "alloc", "request", "image", "2GiB", "--device", "gpu:0",
                  "--owner", "comfy", "--json")  # fmt: skip
    assert granted.exit_code == 0, granted.output
    allocation = json.loads(granted.stdout)
    assert allocation["quality_reason"].startswith("quality 1.00 = full")

    first = cli(server, "submit", "--gpu", "0", "--vram", "6GiB", "--", "sleep", "30")
    assert first.exit_code == 0, first.output
    first_id = first.stdout.split()[0]
    running = wait_state(client, first_id, "running")
    second = cli(server, "submit", "--gpu", "0", "--vram", "4GiB", "--", "true")
    second_id = second.stdout.split()[0]
    waiting = wait_state(client, second_id, "waiting_gpu")
    assert waiting["waiting_reason"] == (
        f"waiting for a device: gpu:0: slots_per_device=1 taken by task {first_id}"
    )

    # status --json is GET /v1/devices: used (driver), reserved, external and the holders
    data = json.loads(cli(server, "status", "--json").stdout)
    gpu0, gpu1 = data["devices"]
    assert (gpu0["memory_used_bytes"], gpu0["memory_reserved_bytes"]) == (0, 8 * GIB)
    assert [(h["kind"], h["id"], h["owner"], h["bytes"]) for h in gpu0["holders"]] == [
        ("task", first_id, "local", 6 * GIB),
        ("allocation", allocation["id"], "comfy", 2 * GIB),
    ]
    assert isinstance(gpu0["holders"][0]["pid"], int)
    assert abs(gpu0["holders"][0]["since"] - running["started_at"]) < 5
    assert (gpu1["memory_external_bytes"], gpu1["holders"][0]["id"]) == (2 * GIB, "unattributed")
    assert client.get("/v1/devices").json()["devices"][0]["holders"] == gpu0["holders"]

    human = cli(server, "status")
    assert human.exit_code == 0, human.output
    out = human.stdout
    assert "used 0 B (driver) · reserved 8.0 GiB · external 0 B · total 24.0 GiB" in out
    assert "used 2.0 GiB (driver) · reserved 0 B · external 2.0 GiB · total 8.0 GiB" in out
    assert f"cmd: sleep 30 {first_id}" in out and "6.0 GiB" in out and "local ·" in out
    assert f"image (normal) {allocation['id']}" in out and "comfy ·" in out
    assert "in use outside VRAMancer, not reported per process" in out

    top = cli(server, "top", "--once", "--json")
    assert json.loads(top.stdout.splitlines()[0])["devices"][1]["memory_external_bytes"] == 2 * GIB

    listed = cli(server, "tasks", "list")
    assert f"{second_id}: waiting for a device: gpu:0: slots_per_device=1 taken by task" in (
        listed.stdout
    )

    # 2 GiB of the 8 GiB GPU are someone else's: 7 GiB cannot be granted there
    refused = cli(server, "alloc", "request", "llm", "7GiB", "--device", "gpu:1")
    assert refused.exit_code != 0
    assert "2.0 GiB used outside VRAMancer" in refused.output

    client.post(f"/api/tasks/{first_id}/cancel")
    wait_state(client, second_id, "done")
    assert (
        client.get("/api/tasks/status", params={"task_id": second_id}).json()["waiting_reason"]
        is None
    )
    client.delete(f"/v1/allocations/{allocation['id']}")


def test_watch_prints_the_waiting_reason_again_when_it_changes(
    server: ServerProcess, client: httpx.Client
) -> None:
    """A task waits for the slot and for memory an allocation holds; the allocation is given
    back (the reason changes, watch says so), then the running task ends and it runs."""
    held = client.post(
        "/v1/allocations", json={"workload_type": "other", "memory": "20GiB", "device": "gpu:0"}
    ).json()
    first = client.post(
        "/api/tasks/submit", json={"type": "cmd", "cmd": ["sleep", "30"], "gpu": 0}
    ).json()["task_id"]
    wait_state(client, first, "running")
    second = client.post(
        "/api/tasks/submit", json={"type": "cmd", "cmd": ["true"], "gpu": 0, "vram": "4GiB"}
    ).json()["task_id"]
    before = wait_state(client, second, "waiting_gpu")["waiting_reason"]
    assert "needs 4.0 GiB" in before and f"taken by task {first}" in before
    env = {**os.environ, "VRM_URL": server.url, "COLUMNS": "300"}
    watch = subprocess.Popen(
        [VRAMANCER, "watch", second], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert watch.stderr is not None
    try:
        lines = [watch.stderr.readline().decode().strip()]  # the first reason, printed
        client.delete(f"/v1/allocations/{held['id']}")
        lines.append(watch.stderr.readline().decode().strip())  # the new one
        client.post(f"/api/tasks/{first}/cancel")
        _, rest = watch.communicate(timeout=30)
    finally:
        watch.kill()
    lines += rest.decode().splitlines()
    assert "needs 4.0 GiB" in lines[0], lines
    assert lines[1] == (
        f"waiting_gpu (waiting for a device: gpu:0: slots_per_device=1 taken by task {first})"
    ), lines
    assert watch.returncode == 0
