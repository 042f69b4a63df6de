"""``/v1/allocations`` and ``/v1/arbiter`` against a real ``vramancer serve`` process.

The server has one simulated 24 GiB GPU, so the arbiter's budget is 0.9 × 24 GiB.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, running_server
from tests.promtext import metric_value
from vramancer.units import GIB

pytestmark = pytest.mark.integration

SIM_CONFIG = """
[[devices.simulated]]
name = "sim0"
memory = "24GiB"
"""
AUTH_CONFIG = (
    SIM_CONFIG
    + """
[auth]
tokens = { "op-token" = "operator", "view-token" = "viewer" }
"""
)
BUDGET = int(24 * GIB * 0.9)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("alloc"), SIM_CONFIG) as proc:
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c
        for allocation in c.get("/v1/allocations").json()["allocations"]:
            c.delete(f"/v1/allocations/{allocation['id']}")


def test_budget_comes_from_the_simulated_gpu(client: httpx.Client) -> None:
    body = client.get("/v1/arbiter").json()
    assert body["state"]["budget_bytes"] == BUDGET
    assert body["state"]["devices"] == [
        {
            "device": "gpu:0",
            "budget_bytes": BUDGET,
            "allocated_bytes": 0,
            "available_bytes": BUDGET,
            "external_bytes": 0,
        }
    ]
    assert set(body["stats"]) >= {"total_allocations", "preemptions", "avg_quality"}


def test_request_list_release(client: httpx.Client) -> None:
    response = client.post(
        "/v1/allocations",
        json={"workload_type": "llm", "priority": "high", "memory": "10GiB", "device": "gpu:0"},
    )
    assert response.status_code == 201, response.text
    granted = response.json()
    assert {k: granted[k] for k in ("workload_type", "priority", "memory_bytes", "device")} == {
        "workload_type": "llm",
        "priority": "high",
        "memory_bytes": 10 * GIB,
        "device": "gpu:0",
    }
    assert granted["quality_target"] == 1.0
    assert granted["id"]
    listing = client.get("/v1/allocations").json()
    assert [a["id"] for a in listing["allocations"]] == [granted["id"]]
    assert listing["allocated_bytes"] == 10 * GIB
    assert listing["available_bytes"] == BUDGET - 10 * GIB
    assert client.get(f"/v1/allocations/{granted['id']}").json()["memory_bytes"] == 10 * GIB
    assert client.delete(f"/v1/allocations/{granted['id']}").status_code == 200
    missing = client.delete(f"/v1/allocations/{granted['id']}")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert client.get("/v1/allocations").json()["allocations"] == []


def test_no_room_is_409_with_requested_and_available_bytes(client: httpx.Client) -> None:
    client.post(
        "/v1/allocations", json={"workload_type": "image", "priority": "high", "memory": 15 * GIB}
    )
    response = client.post(
        "/v1/allocations", json={"workload_type": "llm", "priority": "high", "memory": "10GiB"}
    )
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "insufficient_memory"
    assert error["requested_bytes"] == 10 * GIB
    assert error["available_bytes"] == BUDGET - 15 * GIB
    assert "10.0 GiB" in error["message"]


def test_quality_falls_under_pressure_and_min_quality_refuses(client: httpx.Client) -> None:
    client.post(
        "/v1/allocations",
        json={"workload_type": "other", "priority": "user_facing", "memory": "18GiB"},
    )
    squeezed = client.post(
        "/v1/allocations",
        json={"workload_type": "image", "priority": "background", "memory": "1GiB"},
    ).json()
    assert 0.3 <= squeezed["quality_target"] < 1.0
    refused = client.post(
        "/v1/allocations",
        json={
            "workload_type": "llm",
            "priority": "background",
            "memory": "1GiB",
            "min_quality": 0.99,
        },
    )
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "insufficient_quality"
    qualities = client.get("/v1/arbiter").json()["state"]["qualities"]
    assert qualities["llm"] < 1.0


def test_preemption_over_http(client: httpx.Client) -> None:
    victim = client.post(
        "/v1/allocations",
        json={"workload_type": "image", "priority": "background", "memory": "18GiB", "owner": "sd"},
    ).json()
    winner = client.post(
        "/v1/allocations",
        json={"workload_type": "llm", "priority": "user_facing", "memory": "8GiB"},
    )
    assert winner.status_code == 201
    taken = client.get(f"/v1/allocations/{victim['id']}")
    assert taken.status_code == 409
    assert taken.json()["error"]["code"] == "preempted"
    assert taken.json()["error"]["by"] == winner.json()["id"]
    assert [a["id"] for a in client.get("/v1/allocations").json()["allocations"]] == [
        winner.json()["id"]
    ]
    metrics = client.get("/metrics").text
    assert metric_value(metrics, "vramancer_arbiter_preemptions_total", priority="background") == 1


def test_wait_s_times_out_with_504(client: httpx.Client) -> None:
    client.post(
        "/v1/allocations",
        json={"workload_type": "llm", "priority": "user_facing", "memory": "20GiB"},
    )
    response = client.post(
        "/v1/allocations",
        json={"workload_type": "llm", "priority": "normal", "memory": "4GiB", "wait_s": 0.2},
    )
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "arbiter_timeout"


def test_wait_s_is_granted_when_memory_frees_during_the_wait(
    client: httpx.Client, server: ServerProcess
) -> None:
    holder = client.post(
        "/v1/allocations",
        json={"workload_type": "llm", "priority": "user_facing", "memory": "20GiB"},
    ).json()
    releaser = threading.Timer(
        0.3, lambda: httpx.delete(f"{server.url}/v1/allocations/{holder['id']}")
    )
    releaser.start()
    started = time.monotonic()
    response = client.post(
        "/v1/allocations",
        json={"workload_type": "llm", "priority": "normal", "memory": "4GiB", "wait_s": 8},
    )
    releaser.join()
    assert response.status_code == 201, response.text
    assert 0.2 < time.monotonic() - started < 8
    assert [a["id"] for a in client.get("/v1/allocations").json()["allocations"]] == [
        response.json()["id"]
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"workload_type": "chat", "memory": "1GiB"}, "workload_type"),
        ({"workload_type": "llm", "priority": "asap", "memory": "1GiB"}, "priority"),
        ({"workload_type": "llm", "memory": "a lot"}, "memory"),
        ({"workload_type": "llm", "memory": 0}, "memory"),
        ({"workload_type": "llm", "memory": "1GiB", "min_quality": 2}, "min_quality"),
        ({"workload_type": "llm", "memory": "1GiB", "colour": "red"}, "colour"),
        ({"workload_type": "llm"}, "memory"),
        ({"workload_type": "llm", "memory": "1GiB", "wait_s": 60}, "wait_s"),
    ],
)
def test_bad_bodies_are_422_naming_the_field(
    client: httpx.Client, body: dict[str, object], field: str
) -> None:
    response = client.post("/v1/allocations", json=body)
    assert response.status_code == 422, response.text
    assert field in response.json()["error"]["message"]
    assert client.get("/v1/allocations").json()["allocations"] == []


def test_a_torch_device_name_is_the_same_gpu(client: httpx.Client) -> None:
    response = client.post(
        "/v1/allocations", json={"workload_type": "llm", "memory": "1GiB", "device": "cuda:0"}
    )
    assert response.status_code == 201, response.text
    assert response.json()["device"] == "gpu:0"
    assert client.delete(f"/v1/allocations/{response.json()['id']}").status_code == 200


@pytest.mark.parametrize("device", ["tpu:0", "gpu:9", "cpu"])
def test_bad_devices_are_422(client: httpx.Client, device: str) -> None:
    response = client.post(
        "/v1/allocations", json={"workload_type": "llm", "memory": "1GiB", "device": device}
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_input"
    assert response.json()["error"]["field"] == "device"


def test_roles(tmp_path: Path) -> None:
    with running_server(tmp_path, AUTH_CONFIG) as server:
        body = {"workload_type": "embedding", "priority": "normal", "memory": "512MiB"}
        with server.client("view-token") as viewer, server.client("op-token") as operator:
            assert viewer.get("/v1/allocations").status_code == 200
            assert viewer.get("/v1/arbiter").status_code == 200
            assert viewer.post("/v1/allocations", json=body).status_code == 403
            granted = operator.post("/v1/allocations", json=body)
            assert granted.status_code == 201
            path = f"/v1/allocations/{granted.json()['id']}"
            assert viewer.delete(path).status_code == 403
            narrowed = operator.post("/v1/allocations", json=body, headers={"X-API-ROLE": "viewer"})
            assert narrowed.status_code == 403
            assert operator.delete(path).status_code == 200
        with server.client() as anonymous:
            assert anonymous.get("/v1/allocations").status_code == 401
