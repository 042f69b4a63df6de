"""``GET /v1/devices``: each GPU's used (driver), reserved, external memory and its holders, and
the ``vramancer_gpu_memory_reserved_bytes`` / ``..._external_bytes`` gauges (real runtime,
simulated GPUs, a real task process)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx

from tests.promtext import metric_value
from tests.unit.api.asgi import asgi_client
from vramancer.config import Settings

SettingsFactory = Callable[..., Settings]
GIB = 1024**3
DEVICES = {
    "backends": [],
    "simulated": [
        {"name": "sim0", "memory": "24GiB"},
        {"name": "sim1", "memory": "8GiB"},
    ],
}
MODELS = [{"name": "clip", "backend": "torch", "factory": "tests.unit.models.tiny:tiny",
           "vram": "3GiB"}]  # fmt: skip


async def _running(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    for _ in range(200):
        body: dict[str, Any] = (
            await client.get("/api/tasks/status", params={"task_id": task_id})
        ).json()
        if body["state"] == "running":
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"task never ran: {body}")


async def test_each_gpu_lists_its_model_task_allocation_and_external_memory(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory(devices=DEVICES, models=MODELS, node_name="box1")
    async with asgi_client(settings) as (client, rt):
        assert (await client.post("/v1/models/clip/load", json={"device": "gpu:0"})).is_success
        alloc = await client.post(
            "/v1/allocations",
            json={"workload_type": "image", "memory": "2GiB", "device": "gpu:0", "owner": "comfy"},
        )
        assert alloc.status_code == 201, alloc.text
        submitted = await client.post(
            "/api/tasks/submit",
            json={"type": "cmd", "cmd": ["sleep", "30"], "gpu": 0, "vram": "6GiB"},
        )
        task_id = submitted.json()["task_id"]
        task = await _running(client, task_id)

        body = (await client.get("/v1/devices")).json()
        gpu0 = body["devices"][0]
        # the model "loaded" on a simulated GPU moves its used counter; the task does not
        assert gpu0["memory_used_bytes"] == 3 * GIB
        assert gpu0["memory_reserved_bytes"] == 11 * GIB
        assert gpu0["memory_external_bytes"] == 0
        rows = [(h["kind"], h["id"], h["name"], h["owner"], h["bytes"]) for h in gpu0["holders"]]
        assert rows == [
            ("task", task_id, "cmd: sleep 30", "local", 6 * GIB),
            ("model", "clip", "clip", None, 3 * GIB),
            ("allocation", alloc.json()["id"], "image (normal)", "comfy", 2 * GIB),
        ]
        by_kind = {h["kind"]: h for h in gpu0["holders"]}
        assert by_kind["task"]["pid"] is not None
        assert abs(by_kind["task"]["since"] - task["started_at"]) < 5
        assert by_kind["model"]["since"] is not None and by_kind["model"]["pid"] is None

        one = (await client.get("/v1/devices/0")).json()
        assert one["holders"] == gpu0["holders"]

        # 2 GiB used on sim1 by something that is not VRAMancer
        rt.devices.set_simulated(1, used_bytes=2 * GIB)
        gpu1 = (await client.get("/v1/devices/1")).json()
        assert (gpu1["memory_reserved_bytes"], gpu1["memory_external_bytes"]) == (0, 2 * GIB)
        assert [(h["kind"], h["id"], h["bytes"]) for h in gpu1["holders"]] == [
            ("external", "unattributed", 2 * GIB)
        ]

        metrics = (await client.get("/metrics")).text
        labels = {"backend": "simulated", "node": "box1"}
        reserved = "vramancer_gpu_memory_reserved_bytes"
        external = "vramancer_gpu_memory_external_bytes"
        assert metric_value(metrics, reserved, device="sim-sim0", **labels) == 11 * GIB
        assert metric_value(metrics, external, device="sim-sim1", **labels) == 2 * GIB

        await client.post(f"/api/tasks/{task_id}/cancel")


async def test_memory_used_outside_vramancer_is_not_granted(
    settings_factory: SettingsFactory,
) -> None:
    """An 8 GiB GPU with 2 GiB used by another program: a 7 GiB request is refused (409)
    naming the external bytes; 6 GiB fits."""
    devices = {"backends": [], "simulated": [{"name": "sim0", "memory": "8GiB", "used": "2GiB"}]}
    async with asgi_client(settings_factory(devices=devices)) as (client, _):
        body = {"workload_type": "other", "memory": "7GiB", "device": "gpu:0"}
        refused = await client.post("/v1/allocations", json=body)
        assert refused.status_code == 409
        error = refused.json()["error"]
        assert error["code"] == "insufficient_memory"
        assert error["external_bytes"] == 2 * GIB and error["available_bytes"] == 6 * GIB
        assert "2.0 GiB used outside VRAMancer" in error["message"]
        arbiter = (await client.get("/v1/arbiter")).json()
        assert arbiter["state"]["devices"][0]["external_bytes"] == 2 * GIB
        granted = await client.post(
            "/v1/allocations", json={**body, "workload_type": "llm", "memory": "6GiB"}
        )
        assert granted.status_code == 201
        reason = granted.json()["quality_reason"]
        assert reason.startswith("quality 0.") and "6.0 GiB granted as asked" in reason
        assert "should run lighter" in reason


async def test_a_task_holder_shows_what_it_runs_to_its_owner_and_admins_only(
    settings_factory: SettingsFactory,
) -> None:
    tokens = {"tokens": {"adm": "admin", "op": "operator", "op2": "operator"}}
    devices = {"backends": [], "simulated": [{"name": "sim0", "memory": "24GiB"}]}
    async with asgi_client(settings_factory(devices=devices, auth=tokens), token="op") as (
        client,
        _,
    ):
        body = {"type": "shell", "shell": "sleep 30 # secret-ish", "gpu": 0, "vram": "1GiB"}
        task_id = (await client.post("/api/tasks/submit", json=body)).json()["task_id"]
        await _running(client, task_id)

        async def names(token: str) -> list[str]:
            headers = {"Authorization": f"Bearer {token}"}
            listed = (await client.get("/v1/devices", headers=headers)).json()
            one = (await client.get("/v1/devices/0", headers=headers)).json()
            assert one["holders"] == listed["devices"][0]["holders"]
            return [h["name"] for h in one["holders"]]

        assert await names("op") == ["shell: sleep 30 # secret-ish"]
        assert await names("adm") == ["shell: sleep 30 # secret-ish"]
        assert await names("op2") == ["shell task"]
        await client.post(f"/api/tasks/{task_id}/cancel")
