"""``vramancer alloc list|request|release|state`` against a real ``vramancer serve`` process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from tests.helpers import ServerProcess, running_server
from vramancer.cli.main import app
from vramancer.units import GIB

pytestmark = pytest.mark.integration

CONFIG = """
[[devices.simulated]]
name = "sim0"
memory = "24GiB"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("alloc-cli"), CONFIG) as proc:
        yield proc


@pytest.fixture
def runner(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("VRM_URL", server.url)
    monkeypatch.delenv("VRM_API_TOKEN", raising=False)
    return CliRunner()


def test_request_list_release_json(runner: CliRunner) -> None:
    result = runner.invoke(
        app,
        ["alloc", "request", "llm", "4GiB", "--priority", "high", "--device", "gpu:0",
         "--owner", "cli-test", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    granted = json.loads(result.stdout)
    assert granted["memory_bytes"] == 4 * GIB
    assert granted["priority"] == "high"
    assert granted["device"] == "gpu:0"
    assert granted["owner"] == "cli-test"

    listed = json.loads(runner.invoke(app, ["alloc", "list", "--json"]).stdout)
    assert [a["id"] for a in listed["allocations"]] == [granted["id"]]

    human = runner.invoke(app, ["alloc", "list"])
    assert human.exit_code == 0
    assert granted["id"] in human.stdout and "4.0 GiB" in human.stdout

    state = json.loads(runner.invoke(app, ["alloc", "state", "--json"]).stdout)
    assert state["state"]["allocated_bytes"] == 4 * GIB

    released = runner.invoke(app, ["alloc", "release", granted["id"], "--json"])
    assert released.exit_code == 0
    assert json.loads(released.stdout) == {"released": granted["id"]}
    again = runner.invoke(app, ["alloc", "release", granted["id"]])
    assert again.exit_code == 1
    assert "no allocation" in again.output and "404" in again.output


def test_a_torch_device_name_is_the_same_gpu(runner: CliRunner) -> None:
    result = runner.invoke(app, ["alloc", "request", "llm", "1GiB", "--device", "cuda:0", "--json"])
    assert result.exit_code == 0, result.output
    granted = json.loads(result.stdout)
    assert granted["device"] == "gpu:0"
    assert runner.invoke(app, ["alloc", "release", granted["id"]]).exit_code == 0


def test_no_room_is_a_clear_error(runner: CliRunner) -> None:
    result = runner.invoke(app, ["alloc", "request", "image", "100GiB"])
    assert result.exit_code == 1
    assert "not enough VRAM" in result.output and "409" in result.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["alloc", "request", "llm", "lots"], "memory"),
        (["alloc", "request", "llm", "1GiB", "--min-quality", "1.5"], "--min-quality"),
        (["alloc", "request", "chat", "1GiB"], "workload_type"),
        (["alloc", "request", "llm", "1GiB", "--wait", "11"], "--wait"),
        (["alloc", "request", "llm", "1GiB", "--device", "tpu:0"], "device"),
    ],
)
def test_bad_usage_names_the_field(runner: CliRunner, args: list[str], needle: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert needle.lower() in result.output.lower()


def test_human_request_output_through_the_real_entry_point(server: ServerProcess) -> None:
    env = {**server.env, "VRM_URL": server.url}
    proc = subprocess.run(
        [sys.executable, "-m", "vramancer.main", "--mode", "cli",
         "alloc", "request", "embedding", "512MiB", "--priority", "user_facing"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "granted alloc-" in proc.stdout and "512.0 MiB" in proc.stdout
    allocation_id = proc.stdout.split("granted ", 1)[1].split(":", 1)[0]
    with server.client() as c:
        assert c.delete(f"/v1/allocations/{allocation_id}").status_code == 200
