"""HA at the edge and the model gateway: a standby refuses gateway requests like writes; a
primary in sync mode answers them without waiting for a peer (an answer is not a change)."""

from __future__ import annotations

from types import SimpleNamespace

import httpx
from starlette.types import Receive, Scope, Send

from vramancer.api.ha_gate import HaMiddleware


async def ok(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


class Ha:
    def __init__(self, primary: bool) -> None:
        self.is_primary, self.sync, self.primary = primary, True, "peer:8470"
        self.confirms = 0

    async def confirm(self) -> bool:
        self.confirms += 1
        return False  # no peer answers


async def post(ha: Ha, path: str) -> httpx.Response:
    app = HaMiddleware(ok, runtime=SimpleNamespace(ha=ha))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        return await client.post(path, json={})


async def test_a_sync_primary_answers_gateway_requests_without_a_peer() -> None:
    ha = Ha(primary=True)
    assert (await post(ha, "/openai/v1/chat/completions")).status_code == 200
    assert (await post(ha, "/ollama/api/chat")).status_code == 200
    assert ha.confirms == 0
    assert (await post(ha, "/v1/models/m/load")).status_code == 503  # a write still waits


async def test_a_standby_refuses_gateway_requests() -> None:
    reply = await post(Ha(primary=False), "/ollama/api/chat")
    assert reply.status_code == 409 and reply.json()["error"]["code"] == "standby"
