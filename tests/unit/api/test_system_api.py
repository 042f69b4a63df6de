"""/v1/system/*, /v1/models/can-load, /v1/models/recommend, /v1/devices and /metrics in-process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.promtext import metric_value
from tests.unit.api.asgi import asgi_client
from vramancer.config import Settings

SettingsFactory = Callable[..., Settings]
GIB = 1024**3
SIMS = {
    "backends": [],
    "simulated": [
        {"name": "sim0", "memory": "24GiB"},
        {"name": "sim1", "memory": "12GiB", "used": "11GiB"},
    ],
}


async def test_resources_come_from_the_cached_snapshot(settings_factory: SettingsFactory) -> None:
    async with asgi_client(settings_factory(devices=SIMS)) as (client, rt):
        body = (await client.get("/v1/system/resources")).json()
        assert [g["uuid"] for g in body["gpus"]] == ["sim-sim0", "sim-sim1"]
        assert body["gpus"][1]["over_threshold"] is True
        assert body["needs_optimization"] is True
        assert body["memory"]["total_bytes"] > 0 and body["cpu"]["count"] >= 1
        rt.devices.adjust_simulated(1, -10 * GIB)
        again = (await client.get("/v1/system/resources")).json()
        assert again["gpus"][1]["memory_used_bytes"] == GIB


async def test_devices_list_and_one_device(settings_factory: SettingsFactory) -> None:
    async with asgi_client(settings_factory(devices=SIMS, node_name="box1")) as (client, _):
        body = (await client.get("/v1/devices")).json()
        assert body["node"] == "box1" and body["cpu_only"] is False
        assert [(d["index"], d["backend"], d["simulated"]) for d in body["devices"]] == [
            (0, "simulated", True),
            (1, "simulated", True),
        ]
        assert body["devices"][1]["memory_free_bytes"] == GIB
        assert body["host"]["memory_total_bytes"] > 0
        one = await client.get("/v1/devices/1")
        assert one.status_code == 200 and one.json()["uuid"] == "sim-sim1"
        missing = await client.get("/v1/devices/9")
        assert missing.status_code == 404
        assert missing.json()["error"] == {"code": "not_found", "message": "no device with index 9"}
        assert (await client.get("/v1/devices/-1")).status_code == 422


async def test_can_load(settings_factory: SettingsFactory) -> None:
    async with asgi_client(settings_factory(devices=SIMS)) as (client, _):
        yes = await client.post(
            "/v1/models/can-load", json={"model_id": "mistral-7b", "estimated_size_mb": 14000}
        )
        assert yes.status_code == 200
        assert yes.json()["can_load"] is True and yes.json()["device"] == "gpu:0"
        assert isinstance(yes.json()["reason"], str)
        no = await client.post(
            "/v1/models/can-load", json={"model_id": "x", "estimated_size_mb": 900_000_000}
        )
        assert no.status_code == 200 and no.json()["can_load"] is False


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model_id": "m"}, "estimated_size_mb"),
        ({"model_id": "m", "estimated_size_mb": -5}, "estimated_size_mb"),
        ({"model_id": "m", "estimated_size_mb": "big"}, "estimated_size_mb"),
        ({"model_id": "", "estimated_size_mb": 1}, "model_id"),
        ({"model_id": "   ", "estimated_size_mb": 1}, "model_id"),
        ({"model_id": "m", "estimated_size_mb": 1, "extra": 1}, "extra"),
        ([], "body"),
    ],
)
async def test_can_load_bad_input_is_a_4xx_json_error_naming_the_field(
    settings_factory: SettingsFactory, body: Any, field: str
) -> None:
    async with asgi_client(settings_factory(devices=SIMS)) as (client, rt):
        before = rt.resources.get_metrics()["can_load_checks_total"]
        response = await client.post("/v1/models/can-load", json=body)
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "invalid_request" and field in error["message"]
        assert rt.resources.get_metrics()["can_load_checks_total"] == before  # nothing changed


async def test_can_load_refuses_a_body_that_is_not_json(settings_factory: SettingsFactory) -> None:
    async with asgi_client(settings_factory()) as (client, _):
        response = await client.post(
            "/v1/models/can-load", content=b"{nope", headers={"content-type": "application/json"}
        )
        assert response.status_code == 422
        assert response.json()["error"]["message"].startswith("body: not valid JSON (")
        listed = await client.post("/v1/models/can-load", json=[1])
        assert listed.json()["error"]["message"] == (
            "body: expected a JSON object (and Content-Type: application/json)"
        )
        empty = await client.post("/v1/models/can-load")
        assert empty.json()["error"]["message"] == "body: a JSON body is required"


async def test_recommend(settings_factory: SettingsFactory) -> None:
    async with asgi_client(settings_factory(devices=SIMS)) as (client, _):
        small = await client.get("/v1/models/recommend", params={"model_id": "m", "params": "1B"})
        assert small.status_code == 200
        assert small.json()["method"] == "int8" and small.json()["platform"] == "gpu"
        assert small.json()["reason"].startswith("simulated GPU: 24.0 GiB free > 0.6 ×")
        big = await client.get("/v1/models/recommend", params={"model_id": "Llama-3-70B"})
        assert big.json()["method"] == "int4"
        bad = await client.get("/v1/models/recommend", params={"model_id": "m", "params": "lots"})
        assert bad.status_code == 422
        assert bad.json()["error"]["message"].startswith("params: expected a parameter count")
        assert (await client.get("/v1/models/recommend")).status_code == 422


async def test_recommend_cpu_only(settings_factory: SettingsFactory) -> None:
    async with asgi_client(settings_factory(devices={"backends": []})) as (client, _):
        body = (await client.get("/v1/models/recommend", params={"model_id": "llama-7b"})).json()
        assert (body["method"], body["platform"]) == ("q4_k_m", "cpu")


async def test_optimize_returns_the_seed_shape(settings_factory: SettingsFactory) -> None:
    async with asgi_client(settings_factory(devices=SIMS)) as (client, _):
        body = (await client.post("/v1/system/optimize")).json()
        assert {"optimized", "actions_taken", "memory_before", "memory_after"} <= set(body)
        assert body["actions_taken"][0].startswith("gc: collected")


async def test_metrics_carry_device_labels(settings_factory: SettingsFactory) -> None:
    async with asgi_client(settings_factory(devices=SIMS, node_name="box1")) as (client, _):
        response = await client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        labels = {"backend": "simulated", "device": "sim-sim1", "node": "box1"}
        assert metric_value(response.text, "vramancer_gpu_memory_used_bytes", **labels) == 11 * GIB
        assert metric_value(response.text, "vramancer_gpu_memory_total_bytes", **labels) == 12 * GIB
        host = {"backend": "host", "device": "host", "node": "box1"}
        assert metric_value(response.text, "vramancer_host_memory_available_bytes", **host)
        assert metric_value(response.text, "vramancer_device_poll_duration_seconds_count") >= 1  # type: ignore[operator]


#: Units Prometheus' naming guide replaces with base units (bytes, seconds, ratio 0-1).
_NON_BASE_UNITS = ("_mb", "_mib", "_gb", "_gib", "_kb", "_ms", "_milliseconds", "_percent",
                   "_minutes", "_hours", "_megabytes", "_kilobytes")  # fmt: skip
#: Label names that would make series unbounded (one per task, request, block ...).
_UNBOUNDED_LABELS = {"task_id", "task", "request_id", "request", "id", "block_id", "block",
                     "allocation_id", "pid", "path", "url", "token", "client"}  # fmt: skip


async def test_every_exported_metric_follows_the_naming_rules(
    settings_factory: SettingsFactory,
) -> None:
    """The whole runtime's /metrics: ``vramancer_`` names, base units, counters ``_total``,
    no ``_created`` series, and no per-task or per-request label."""
    from prometheus_client.parser import text_string_to_metric_families

    async with asgi_client(settings_factory(devices=SIMS)) as (client, _):
        await client.post("/v1/system/optimize")  # so counters have samples
        await client.post("/v1/models/can-load", json={"model_id": "m", "estimated_size_mb": 1})
        text = (await client.get("/metrics")).text
    families = list(text_string_to_metric_families(text))
    assert len(families) > 20
    for family in families:
        assert family.name.startswith("vramancer_"), family.name
        assert not family.name.endswith(_NON_BASE_UNITS), family.name
        for sample in family.samples:
            assert not sample.name.endswith("_created"), sample.name
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
            assert not set(sample.labels) & _UNBOUNDED_LABELS, (sample.name, sample.labels)
    gpu = {f.name: f for f in families}["vramancer_gpu_memory_used_bytes"]
    assert {frozenset(s.labels) for s in gpu.samples} == {frozenset({"backend", "device", "node"})}
