"""The gateway's HTTP limits in process (the real app over httpx's ASGI transport, the fake
Ollama as backend): queue full 429 and queue timeout 503 with ``Retry-After``, the body cap,
Ollama's load request; and the pure translations between the two surfaces."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from tests.fakes.ollama import FakeOllama
from vramancer.api import gateway_front
from vramancer.api import gateway_proxy as gp
from vramancer.api.app import create_app
from vramancer.api.routers import gateway
from vramancer.config import Settings
from vramancer.runtime import Runtime

SettingsFactory = Callable[..., Settings]
CHAT = {"model": "a:8b", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def fake() -> Any:
    with FakeOllama({"a:8b": "8GiB"}) as server:
        yield server


@contextlib.asynccontextmanager
async def client(
    settings_factory: SettingsFactory, fake: FakeOllama, **gw: Any
) -> AsyncIterator[httpx.AsyncClient]:
    settings = settings_factory(
        ollama={"endpoint": fake.url},
        devices={"backends": [], "simulated": [{"name": "sim0", "memory": "12GiB"}]},
        models=[{"name": "a:8b", "backend": "ollama", "vram": "8GiB"}],
        gateway=gw,
    )
    async with Runtime(settings) as rt:
        app = create_app(runtime=rt)
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as c:
                yield c
        finally:
            await gateway_front.shutdown(app)


async def test_a_full_queue_is_429_with_retry_after(
    settings_factory: SettingsFactory, fake: FakeOllama
) -> None:
    async with client(settings_factory, fake, queue_length=0, max_wait_s=3) as c:
        reply = await c.post("/openai/v1/chat/completions", json=CHAT)
        assert reply.status_code == 429 and reply.headers["retry-after"] == "3"
        assert reply.json()["error"]["code"] == "queue_full"
        assert reply.json()["error"]["type"] == "rate_limit_error"
    assert fake.loads_of("a:8b") == 0


async def test_a_request_not_served_in_time_is_503_with_retry_after(
    settings_factory: SettingsFactory, fake: FakeOllama
) -> None:
    fake.load_delay_s = 1.0
    async with client(settings_factory, fake, timeout_s=0.2) as c:
        reply = await c.post("/ollama/api/chat", json=CHAT)
        assert reply.status_code == 503 and "retry-after" in reply.headers
        body = reply.json()
        assert body["code"] == "queue_timeout" and "a:8b" in body["error"]


async def test_the_body_cap_and_ollamas_load_request(
    settings_factory: SettingsFactory, fake: FakeOllama
) -> None:
    async with client(settings_factory, fake, max_body_bytes=2000) as c:
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 3000}]}
        assert (await c.post("/ollama/api/chat", json=big)).status_code == 413
        loaded = await c.post("/ollama/api/generate", json={"model": "a:8b"})
        assert loaded.status_code == 200 and loaded.json()["done_reason"] == "load"
        assert "a:8b" in fake.loaded
        version = (await c.get("/ollama/api/version")).json()
        assert version["version"] == gateway.OLLAMA_API_VERSION
        running = (await c.get("/ollama/api/ps")).json()["models"]
        assert [m["name"] for m in running] == ["a:8b"]


async def test_v1_gateway_lists_every_managed_model_idle_before_any_request(
    settings_factory: SettingsFactory, fake: FakeOllama
) -> None:
    async with client(settings_factory, fake) as c:
        assert (await c.get("/v1/gateway")).json() == {
            "models": [{"model": "a:8b", "queued": 0, "in_flight": 0, "oldest_wait_s": None}]
        }


def test_an_ollama_request_becomes_an_openai_one() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "q", "images": []}],
        "options": {"num_predict": 5, "temperature": 0.1, "num_ctx": 4096},
        "stream": False,
    }
    assert gp.openai_request(body, "served", chat=True) == {
        "model": "served",
        "stream": False,
        "messages": [{"role": "user", "content": "q"}],
        "max_tokens": 5,
        "temperature": 0.1,
    }
    generate = gp.openai_request({"prompt": "p", "system": "s"}, "served", chat=False)
    assert generate == {"model": "served", "stream": True, "prompt": "s\n\np"}


def test_an_openai_answer_becomes_an_ollama_one() -> None:
    answer = {
        "choices": [{"message": {"content": "hello"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1},
    }
    part = gp.ollama_answer(answer, "m", chat=True)
    assert part["message"] == {"role": "assistant", "content": "hello"}
    assert (part["done"], part["done_reason"], part["eval_count"]) == (True, "length", 1)
    line = json.loads(gp.ollama_part("m", "tok", False, False, None))
    assert line["response"] == "tok" and line["done"] is False
