"""The model manager's background loop in a real ``vramancer serve``: Ollama down at start
(degraded mode, probed again every ``retry_interval_s``), and the idle reaper unloading a model
by itself after its ``idle_timeout_s``."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.ollama import FakeOllama
from tests.helpers import ServerProcess, running_server

pytestmark = pytest.mark.integration

VLM = "qwen3-vl:8b"


def config(ollama_url: str) -> str:
    return f"""
[ollama]
endpoint = "{ollama_url}"
retry_interval_s = 0.5
connect_timeout_s = 0.5

[[devices.simulated]]
name = "sim0"
memory = "12GiB"

[[models]]
name = "{VLM}"
backend = "ollama"
vram = "10.5GiB"
idle_timeout_s = 1.5

[[models]]
name = "clip"
backend = "torch"
factory = "tests.unit.models.tiny:tiny"
idle_timeout_s = 600

[gpu_manager]
vlm_model = "{VLM}"
clip_model = "clip"
tick_s = 0.1
"""


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    server = FakeOllama({VLM: "10.5GiB"}).start()
    server.go_down()  # down before VRAMancer starts
    yield server
    server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fake: FakeOllama) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("bg"), config(fake.url)) as proc:
        yield proc


def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_down_at_start_then_back_and_idle_unload(server: ServerProcess, fake: FakeOllama) -> None:
    with server.client() as client:
        status = client.get("/v1/gpu/status").json()
        assert status["degraded_mode"] is True
        assert "Ollama is unreachable" in status["degraded_reason"]
        assert client.post(f"/v1/models/{VLM}/load").status_code == 503
        clip = client.post("/v1/models/clip/load", json={"device": "cpu"})
        assert clip.status_code == 200  # other models keep working

        fake.come_back()

        def recovered() -> bool:
            return client.get("/v1/gpu/status").json()["degraded_mode"] is False

        assert eventually(recovered), "the probe did not notice Ollama came back"
        assert client.get("/v1/gpu/status").json()["degraded_reason"] is None

        started = time.monotonic()
        loaded = client.post(f"/v1/models/{VLM}/load")
        assert loaded.status_code == 200 and VLM in fake.loaded

        def reaped() -> bool:
            r = httpx.get(server.url + f"/v1/models/{VLM}/status", timeout=5)
            return bool(r.json()["state"] == "unloaded")

        assert eventually(reaped), "the idle reaper did not unload the VLM"
        idle = time.monotonic() - started
        assert 1.4 <= idle < 8.0
        assert VLM not in fake.loaded
        models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
        assert models["clip"]["state"] == "loaded"  # its own, longer timeout
    check_lifecycle_events_are_streamed(server)


def check_lifecycle_events_are_streamed(server: ServerProcess) -> None:
    """``GET /v1/events`` carries the model manager's events: what the test caused (degraded
    mode and back, a load, the idle unload) replayed in order, each a JSON message."""
    kinds = "degraded_mode,model_loaded,model_unloaded,idle_unload"
    url = server.url + f"/v1/events?kinds={kinds}&replay=50"
    got: list[dict[str, Any]] = []
    with httpx.stream("GET", url, timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                got.append(json.loads(line[len("data: ") :]))
                if got[-1]["kind"] == "idle_unload":
                    break
    vlm = [
        (e["kind"], e["data"].get("degraded")) for e in got if e["data"].get("model") in (None, VLM)
    ]
    assert vlm[:2] == [("degraded_mode", True), ("degraded_mode", False)]
    loaded = [e for e in got if e["kind"] == "model_loaded" and e["data"]["model"] == VLM]
    assert loaded and loaded[-1]["data"]["device"] == "gpu:0" and loaded[-1]["data"]["simulated"]
    unloaded = [e for e in got if e["kind"] == "model_unloaded" and e["data"]["model"] == VLM]
    assert unloaded[-1]["data"]["reason"] == "idle"
    idle = got[-1]["data"]
    assert idle["model"] == VLM and idle["idle_timeout_s"] == 1.5 and idle["idle_s"] >= 1.5
    seqs = [e["seq"] for e in got]
    assert seqs == sorted(seqs)
