"""Model lifecycle over HTTP and the CLI against a real ``vramancer serve`` process whose
``[ollama] endpoint`` is the fake Ollama server, with one simulated 12 GiB GPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.ollama import FakeOllama
from tests.helpers import ServerProcess, running_server
from tests.promtext import metric_value
from vramancer.units import GIB

pytestmark = pytest.mark.integration

VLM = "qwen3-vl:8b"
OP, VIEW = "op-token", "view-token"


def config(ollama_url: str) -> str:
    return f"""
[ollama]
endpoint = "{ollama_url}"
retry_interval_s = 30

[[devices.simulated]]
name = "sim0"
memory = "12GiB"

[auth]
tokens = {{ "{OP}" = "operator", "{VIEW}" = "viewer" }}

[[models]]
name = "{VLM}"
backend = "ollama"
vram = "10.5GiB"
priority = "user_facing"
allowed_devices = ["gpu"]
idle_timeout_s = 120

[[models]]
name = "clip"
backend = "torch"
factory = "tests.unit.models.tiny:tiny"
vram = "500MiB"

[[models]]
name = "big:14b"
backend = "ollama"
vram = "11GiB"
allowed_devices = ["gpu"]

[gpu_manager]
vlm_model = "{VLM}"
clip_model = "clip"
retry_backoff_s = 0
load_timeout_s = 5
max_load_retries = 1
optimize_idle_s = 0

[profiles.everything_off]
"{VLM}" = "unloaded"
clip = "unloaded"
"""


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllama({VLM: int(10.5 * GIB), "big:14b": 11 * GIB}) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fake: FakeOllama) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("models"), config(fake.url)) as proc:
        yield proc


@pytest.fixture
def op(server: ServerProcess, fake: FakeOllama) -> Iterator[httpx.Client]:
    if not fake.up:
        fake.come_back()
    with server.client(OP) as client:
        yield client
        if not fake.up:
            fake.come_back()
        client.put("/v1/profile", json={"name": "everything_off"})


def models(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in client.get("/v1/models").json()["models"]}


def test_list_status_and_profiles(op: httpx.Client) -> None:
    data = op.get("/v1/models").json()
    assert data["profile"] in ("idle", "everything_off")
    assert data["degraded_mode"] is False
    by_name = {m["name"]: m for m in data["models"]}
    assert set(by_name) == {VLM, "clip", "big:14b"}
    vlm = by_name[VLM]
    for key in ("name", "backend", "state", "device", "last_used"):
        assert key in vlm
    assert (vlm["backend"], vlm["state"], vlm["device"]) == ("ollama", "unloaded", None)
    status = op.get("/v1/gpu/status").json()
    assert set(status) >= {
        "execution_mode",
        "vlm_state",
        "vlm_model",
        "clip_device",
        "vram",
        "idle_timeout_seconds",
        "last_vlm_request",
        "degraded_mode",
        "degraded_reason",
    }
    assert status["vlm_model"] == VLM and status["idle_timeout_seconds"] == 120
    assert (
        status["vram"]["total_mb"] == 12288 and status["vram"]["gpu_name"] == "Simulated GPU sim0"
    )
    profiles = op.get("/v1/profile").json()
    assert profiles["profiles"]["autopilot"] == {VLM: "unloaded", "clip": "gpu_if_free:1GiB"}
    assert profiles["profiles"]["recording"] == {VLM: "gpu", "clip": "cpu"}


def test_load_migrate_unload(op: httpx.Client, fake: FakeOllama) -> None:
    r = op.post(f"/v1/models/{VLM}/load")
    assert r.status_code == 200, r.text
    assert (r.json()["state"], r.json()["device"], r.json()["simulated"]) == (
        "loaded",
        "gpu:0",
        True,
    )
    assert VLM in fake.loaded
    assert op.get("/v1/gpu/status").json()["vram"]["used_mb"] == 10752
    gpus = op.get("/v1/devices").json()
    assert "10752" in json.dumps(gpus) or str(int(10.5 * GIB)) in json.dumps(gpus)
    r = op.post("/v1/models/clip/load", json={"device": "cpu"})
    assert r.json()["device"] == "cpu"
    r = op.post("/v1/models/clip/migrate", json={"device": "gpu:0"})
    assert r.status_code == 409  # 0.5 GiB does not fit beside the VLM under the 90 % budget
    assert r.json()["error"]["code"] == "insufficient_memory"
    r = op.post(f"/v1/models/{VLM}/unload")
    assert r.json()["state"] == "unloaded" and VLM not in fake.loaded
    r = op.post("/v1/models/clip/migrate", json={"device": "cuda:0"})  # torch's name: same GPU
    assert (r.json()["device"], r.json()["runs_on"]) == ("gpu:0", "cpu")
    assert op.get("/v1/gpu/status").json()["clip_device"] == "gpu:0"


def test_profile_switches_reconcile(op: httpx.Client) -> None:
    r = op.put("/v1/profile", json={"name": "autopilot", "dry_run": True})
    assert r.json()["dry_run"] is True
    r = op.put("/v1/profile", json={"name": "recording"})
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["ok"] and report["name"] == "recording"
    assert models(op)[VLM]["state"] == "loaded" and models(op)["clip"]["device"] == "cpu"
    r = op.put("/v1/profile", json={"name": "autopilot"})
    assert [s["description"] for s in r.json()["steps"]] == [
        f"unload {VLM} from gpu:0",
        "move clip to gpu:0",
    ]
    status = op.get("/v1/gpu/status").json()
    assert (status["execution_mode"], status["vlm_state"], status["clip_device"]) == (
        "autopilot",
        "unloaded",
        "gpu:0",
    )
    assert op.get("/v1/profile").json()["last_switch"]["name"] == "autopilot"


def test_errors_are_clear(op: httpx.Client, server: ServerProcess, fake: FakeOllama) -> None:
    r = op.post("/v1/models/nope/load")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = op.post("/v1/models/clip/migrate", json={"device": "gpu:9"})
    assert r.status_code == 422 and "does not exist" in r.json()["error"]["message"]
    r = op.post("/v1/models/clip/migrate", json={"device": "tpu"})
    assert r.status_code == 422
    r = op.post("/v1/models/clip/migrate", json={})
    assert r.status_code == 422
    r = op.put("/v1/profile", json={"name": "nope"})
    assert r.status_code == 404
    with server.client(VIEW) as viewer:
        assert viewer.get("/v1/models").status_code == 200
        assert viewer.post("/v1/models/clip/load").status_code == 403
        assert viewer.put("/v1/profile", json={"name": "idle"}).status_code == 403
    op.post(f"/v1/models/{VLM}/load")
    r = op.post("/v1/models/big:14b/load")
    assert r.status_code == 409
    message = r.json()["error"]["message"]
    assert re.search(r"needs 11.0 GiB, [\d.]+ [MG]iB free", message) and VLM in message
    assert r.json()["error"]["could_unload"] == [VLM]
    op.post(f"/v1/models/{VLM}/unload")
    fake.go_down()
    r = op.post(f"/v1/models/{VLM}/load")
    assert r.status_code == 503
    assert "unreachable" in r.json()["error"]["message"]
    status = op.get("/v1/gpu/status").json()
    assert status["degraded_mode"] is True and "unreachable" in status["degraded_reason"]
    r = op.put("/v1/profile", json={"name": "recording"})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "profile_switch_failed"
    assert r.json()["error"]["failed_step"] == 1
    assert models(op)["clip"]["device"] == "cpu"  # step 0 ran, the state is consistent
    assert op.post("/v1/models/clip/load").status_code == 200  # CLIP keeps working


def test_system_optimize_unloads_idle_models(op: httpx.Client) -> None:
    op.post("/v1/models/clip/load", json={"device": "cpu"})
    r = op.post("/v1/system/optimize")
    assert r.status_code == 200, r.text
    assert "unloaded clip from cpu (idle, 500.0 MiB)" in r.json()["actions_taken"]
    assert models(op)["clip"]["state"] == "unloaded"


def test_metrics_expose_model_states(op: httpx.Client) -> None:
    op.post("/v1/models/clip/load", json={"device": "cpu"})
    text = op.get("/metrics").text
    assert (
        metric_value(text, "vramancer_model_state", backend="torch", model="clip", state="loaded")
        == 1
    )
    assert "vramancer_model_load_duration_seconds_bucket" in text


def cli(server: ServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VRM_URL": server.url, "VRM_API_TOKEN": OP}
    return subprocess.run(
        [sys.executable, "-m", "vramancer.main", "--mode", "cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_models_and_profile(op: httpx.Client, server: ServerProcess) -> None:
    done = cli(server, "models", "load", "clip", "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "loaded"
    listed = cli(server, "models", "list")
    assert listed.returncode == 0 and "clip" in listed.stdout and "loaded" in listed.stdout
    moved = cli(server, "models", "migrate", "clip", "cuda:0")
    assert moved.returncode == 0 and "moved to gpu:0" in moved.stdout
    switched = cli(server, "profile", "set", "recording", "--json")
    assert switched.returncode == 0, switched.stderr
    assert json.loads(switched.stdout)["ok"] is True
    shown = cli(server, "profile", "show")
    assert "profile in force: recording" in shown.stdout
    bad = cli(server, "models", "migrate", "clip", "gpu:9")
    assert bad.returncode == 1 and "does not exist" in bad.stderr and "HTTP 422" in bad.stderr


def test_serve_refuses_a_profile_naming_an_unknown_model(tmp_path: Any) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[models]]\nname = "clip"\nbackend = "ollama"\n[profiles.p]\nghost = "gpu"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "vramancer.main",
            "--mode",
            "serve",
            "--port",
            "0",
            "--config",
            str(bad),
        ],
        env={**env, "VRM_DATA_DIR": str(tmp_path / "data")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "profiles.p.ghost: not a configured model (models: clip)" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_models_allocation_cannot_be_released_by_hand(op: httpx.Client) -> None:
    """The model's booking is memory really in use: DELETE /v1/allocations refuses it and
    says how to free it; nobody may book under a model's or a task's name either."""
    assert op.post("/v1/models/clip/load", json={"device": "gpu:0"}).status_code == 200
    (mine,) = [
        a for a in op.get("/v1/allocations").json()["allocations"] if a["owner"] == "model:clip"
    ]
    r = op.delete(f"/v1/allocations/{mine['id']}")
    assert r.status_code == 409
    error = r.json()["error"]
    assert error["code"] == "managed_allocation" and error["owner"] == "model:clip"
    assert "POST /v1/models/clip/unload" in error["message"]
    assert models(op)["clip"]["device"] == "gpu:0"  # still booked and loaded
    body = {"workload_type": "embedding", "memory": "1GiB", "owner": "model:clip"}
    spoof = op.post("/v1/allocations", json=body)
    assert spoof.status_code == 422 and spoof.json()["error"]["field"] == "owner"
    body["owner"] = "task:t-1"
    assert op.post("/v1/allocations", json=body).status_code == 422
