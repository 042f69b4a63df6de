"""``/openapi.json`` describes the answers: a response schema for every JSON route, the shared
error object for every 4xx and 5xx, media types for the raw-body routes; and the answers match
their models field for field (the models pass undeclared keys through)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import jsonschema_rs
import pytest

from tests.unit.api.asgi import asgi_client
from vramancer.api.schemas import Answer, ErrorResponse, SystemResources
from vramancer.config import Settings

SettingsFactory = Callable[..., Settings]
SIMS = {"backends": [], "simulated": [{"name": "sim0", "memory": "24GiB"}]}
#: Routes whose 2xx answer is not JSON, and the media type each declares.
RAW = {
    ("get", "/metrics"): "text/plain; version=0.0.4; charset=utf-8",
    ("get", "/v1/memory/blocks/{block_id}"): "application/octet-stream",
    ("get", "/v1/events"): "text/event-stream",
}


async def _schema(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    schema: dict[str, Any] = response.json()
    return schema


async def test_every_route_declares_its_answer_and_the_error_object(
    settings_factory: SettingsFactory,
) -> None:
    async with asgi_client(settings_factory(devices=SIMS)) as (client, _):
        schema = await _schema(client)
    untyped = []
    for path, item in schema["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            ok = next(code for code in responses if code.startswith("2"))
            content = responses[ok]["content"]
            raw = RAW.get((method, path))
            if raw is not None:
                assert list(content) == [raw], (method, path)
                continue
            if content["application/json"]["schema"] in ({}, {"type": "object"}):
                untyped.append(f"{method.upper()} {path}")
            assert "422" not in responses, (method, path)  # FastAPI's own, not our shape
            # the Ollama surface answers Ollama's own error shape (or ours, before the gateway)
            shape = "OllamaErrorResponse" if path.startswith("/ollama/") else "ErrorResponse"
            for code in ("4XX", "5XX"):
                ref = responses[code]["content"]["application/json"]["schema"]["$ref"]
                assert ref == f"#/components/schemas/{shape}", (method, path, code)
    assert not untyped


def _validator(schema: dict[str, Any], path: str, method: str = "get") -> Callable[[Any], None]:
    responses = schema["paths"][path][method]["responses"]
    ok = next(code for code in responses if code.startswith("2"))
    body_schema = responses[ok]["content"]["application/json"]["schema"]
    resolver = {"components": schema["components"], **body_schema}
    return jsonschema_rs.Draft202012Validator(resolver).validate


@pytest.mark.parametrize(
    "path",
    [
        "/healthz",
        "/v1/system/resources",
        "/v1/devices",
        "/v1/devices/{index}",
        "/v1/gpu/status",
        "/v1/profile",
        "/v1/models",
        "/v1/allocations",
        "/v1/arbiter",
        "/v1/memory/tiers",
        "/v1/memory/blocks",
        "/v1/events/schema",
    ],
)
async def test_answers_match_their_schema_and_keep_every_field(
    settings_factory: SettingsFactory, path: str
) -> None:
    async with asgi_client(settings_factory(devices=SIMS)) as (client, rt):
        schema = await _schema(client)
        await client.put("/v1/memory/blocks/a", content=b"abc")
        response = await client.get(path.replace("{index}", "0"))
        assert response.status_code == 200
        _validator(schema, path)(response.json())
        if path == "/v1/system/resources":  # the library's dict, unchanged by the model
            assert response.json() == rt.resources.check_resources()


async def test_errors_match_the_error_object(settings_factory: SettingsFactory) -> None:
    async with asgi_client(settings_factory(devices=SIMS)) as (client, _):
        for response in (
            await client.get("/v1/devices/7"),
            await client.post("/v1/models/can-load", json={"model_id": ""}),
            await client.get("/v1/memory/blocks/missing"),
        ):
            assert 400 <= response.status_code < 500
            ErrorResponse.model_validate(response.json())


def test_models_keep_keys_they_do_not_declare() -> None:
    """A field a subsystem adds to its answer reaches the client (answers only grow)."""

    class Small(Answer):
        a: int

    assert Small.model_validate({"a": 1, "added": [2]}).model_dump() == {"a": 1, "added": [2]}
    assert "node" in SystemResources.model_fields


async def test_task_answers_match_their_schema(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(devices=SIMS)
    settings.tasks.maintenance_idle_s = 0
    async with asgi_client(settings) as (client, rt):
        schema = await _schema(client)
        submitted = await client.post(
            "/api/tasks/submit", json={"type": "cmd", "cmd": ["echo", "hi"], "env": {"A": "b"}}
        )
        _validator(schema, "/api/tasks/submit", "post")(submitted.json())
        task_id = submitted.json()["task_id"]
        await rt.tasks.wait([task_id], timeout_s=30)
        batch = await client.post("/api/tasks/submit_batch", json={"tasks": [{"type": "noop"}]})
        _validator(schema, "/api/tasks/submit_batch", "post")(batch.json())
        answers = {
            "/api/tasks/status": await client.get("/api/tasks/status", params={"task_id": task_id}),
            "/api/tasks/history": await client.get("/api/tasks/history"),
            "/api/tasks/stats": await client.get("/api/tasks/stats"),
            "/api/tasks/{task_id}/logs": await client.get(f"/api/tasks/{task_id}/logs"),
        }
        for path, response in answers.items():
            assert response.status_code == 200, (path, response.text)
            _validator(schema, path)(response.json())
        assert answers["/api/tasks/{task_id}/logs"].json()["stdout"] == "hi\n"
        assert answers["/api/tasks/status"].json()["state"] == "done"
