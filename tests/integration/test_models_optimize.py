"""``POST /v1/system/optimize`` end to end against a real ``vramancer serve`` process: under
memory pressure it switches a model to its configured smaller variant (Ollama really loads the
other tag) and unloads the least recently used model; it reports what it did."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.ollama import FakeOllama
from tests.helpers import ServerProcess, running_server
from vramancer.units import GIB, MIB

pytestmark = pytest.mark.integration

VLM, SMALL = "qwen3-vl:8b", "qwen3-vl:2b"


def config(ollama_url: str) -> str:
    return f"""
[ollama]
endpoint = "{ollama_url}"

[[devices.simulated]]
name = "sim0"
memory = "12GiB"

[[models]]
name = "{VLM}"
backend = "ollama"
vram = "10.5GiB"
priority = "user_facing"
allowed_devices = ["gpu"]
smaller_variant = "{SMALL}"
smaller_variant_vram = "2GiB"

[[models]]
name = "a:6b"
backend = "ollama"
vram = "6.5GiB"

[[models]]
name = "b:4b"
backend = "ollama"
vram = "4GiB"

[gpu_manager]
pressure_ratio = 0.85
optimize_idle_s = 3600
retry_backoff_s = 0
"""


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    sizes: dict[str, int | str] = {VLM: int(10.5 * GIB), SMALL: 2 * GIB, "a:6b": int(6.5 * GIB)}
    with FakeOllama({**sizes, "b:4b": 4 * GIB}) as server:
        yield server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fake: FakeOllama) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("optimize"), config(fake.url)) as proc:
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
        for name in (VLM, "a:6b", "b:4b"):
            c.post(f"/v1/models/{name}/unload")


def models(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in client.get("/v1/models").json()["models"]}


def gpu_used_mb(client: httpx.Client) -> int:
    return int(client.get("/v1/gpu/status").json()["vram"]["used_mb"])


def test_optimize_switches_to_the_smaller_variant(client: httpx.Client, fake: FakeOllama) -> None:
    assert client.post(f"/v1/models/{VLM}/load").status_code == 200
    assert gpu_used_mb(client) == int(10.5 * GIB) // MIB  # 87.5 % of the GPU: pressure
    r = client.post("/v1/system/optimize")
    assert r.status_code == 200, r.text
    report = r.json()
    assert (
        f"switched {VLM} to smaller variant {SMALL} on gpu:0 (10.5 GiB -> 2.0 GiB)"
        in report["actions_taken"]
    )
    assert report["optimized"] is True
    assert report["memory_before"]["gpu_used_bytes"] - report["memory_after"]["gpu_used_bytes"] == (
        int(10.5 * GIB) - 2 * GIB
    )
    vlm = models(client)[VLM]
    assert (vlm["state"], vlm["variant"], vlm["used_vram_bytes"]) == ("loaded", SMALL, 2 * GIB)
    assert set(fake.running()) == {SMALL}  # Ollama really swapped the tags
    assert gpu_used_mb(client) == 2048
    again = client.post("/v1/system/optimize").json()["actions_taken"]
    assert not [a for a in again if VLM in a]  # no pressure left: nothing more to do


def test_optimize_unloads_the_least_recently_used(client: httpx.Client, fake: FakeOllama) -> None:
    assert client.post("/v1/models/a:6b/load").status_code == 200
    time.sleep(0.05)
    assert client.post("/v1/models/b:4b/load").status_code == 200  # 10.5 of 12 GiB: pressure
    r = client.post("/v1/system/optimize")
    assert r.status_code == 200, r.text
    actions = r.json()["actions_taken"]
    assert "unloaded a:6b from gpu:0 (least recently used, 6.5 GiB)" in actions
    assert not [a for a in actions if "b:4b" in a]  # 4 of 12 GiB after a: below the ratio
    state = {name: m["state"] for name, m in models(client).items()}
    assert (state["a:6b"], state["b:4b"]) == ("unloaded", "loaded")
    assert set(fake.running()) == {"b:4b"}
