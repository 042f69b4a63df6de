"""Auth, roles, X-API-ROLE, rate limiting and error bodies, through the real app in-process."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

from tests.unit.api.asgi import asgi_client
from vramancer.api import ratelimit
from vramancer.api.app import create_app
from vramancer.config import Settings
from vramancer.runtime import Runtime

TOKENS = {"adm": "admin", "op": "operator", "view": "viewer"}
SettingsFactory = Callable[..., Settings]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_without_tokens_every_caller_is_admin(settings_factory: SettingsFactory) -> None:
    async with asgi_client(settings_factory()) as (client, _):
        assert (await client.get("/v1/system/resources")).status_code == 200
        assert (await client.post("/v1/system/optimize")).status_code == 200


async def test_tokens_are_required_except_for_healthz(settings_factory: SettingsFactory) -> None:
    async with asgi_client(settings_factory(auth={"tokens": TOKENS})) as (client, _):
        health = await client.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        missing = await client.get("/v1/devices")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json() == {
            "error": {"code": "unauthorized", "message": "a bearer token is required"}
        }
        unknown = await client.get("/v1/devices", headers=bearer("guess"))
        assert unknown.status_code == 401 and unknown.json()["error"]["message"] == "unknown token"
        metrics = await client.get("/metrics")
        assert metrics.status_code == 401
        assert (await client.get("/metrics", headers=bearer("view"))).status_code == 200


@pytest.mark.parametrize(("token", "status"), [("view", 403), ("op", 200), ("adm", 200)])
async def test_optimize_needs_the_operator_role(
    settings_factory: SettingsFactory, token: str, status: int
) -> None:
    async with asgi_client(settings_factory(auth={"tokens": TOKENS})) as (client, _):
        response = await client.post("/v1/system/optimize", headers=bearer(token))
        assert response.status_code == status
        if status == 403:
            assert response.json()["error"] == {
                "code": "forbidden",
                "message": "this needs the operator role; the caller has viewer",
            }
        assert (await client.get("/v1/system/resources", headers=bearer(token))).status_code == 200


async def test_x_api_role_narrows_but_never_widens(settings_factory: SettingsFactory) -> None:
    async with asgi_client(settings_factory(auth={"tokens": TOKENS})) as (client, _):
        narrowed = await client.post(
            "/v1/system/optimize", headers={**bearer("adm"), "X-API-ROLE": "viewer"}
        )
        assert narrowed.status_code == 403
        assert "the caller has viewer" in narrowed.json()["error"]["message"]
        widened = await client.post(
            "/v1/system/optimize", headers={**bearer("view"), "X-API-ROLE": "admin"}
        )
        assert widened.status_code == 403
        assert "the caller has viewer" in widened.json()["error"]["message"]
        same = await client.post(
            "/v1/system/optimize", headers={**bearer("op"), "X-API-ROLE": "Operator"}
        )
        assert same.status_code == 200
        bad = await client.get("/v1/devices", headers={**bearer("adm"), "X-API-ROLE": "root"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
        assert "X-API-ROLE must be one of viewer, operator, admin" in bad.json()["error"]["message"]


async def test_x_api_role_narrows_the_implicit_admin_without_tokens(
    settings_factory: SettingsFactory,
) -> None:
    async with asgi_client(settings_factory()) as (client, _):
        response = await client.post("/v1/system/optimize", headers={"X-API-ROLE": "viewer"})
        assert response.status_code == 403


async def test_rate_limit_answers_429_with_retry_after(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(
        disable_rate_limit=False, server={"rate_limit_burst": 3, "rate_limit_per_s": 0.5}
    )
    async with asgi_client(settings) as (client, _):
        codes = [(await client.get("/v1/devices")).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        limited = await client.get("/v1/devices")
        assert limited.status_code == 429
        assert int(limited.headers["retry-after"]) >= 1
        assert limited.json()["error"]["code"] == "rate_limited"
        assert (await client.get("/healthz")).status_code == 200  # never limited
        # Without configured tokens a bearer string is no identity: same address, same bucket.
        assert (await client.get("/v1/devices", headers=bearer("someone"))).status_code == 429


async def test_configured_tokens_have_their_own_buckets_made_up_ones_do_not(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory(
        disable_rate_limit=False,
        auth={"tokens": TOKENS},
        server={"rate_limit_burst": 2, "rate_limit_per_s": 0.01},
    )
    async with asgi_client(settings) as (client, _):
        view = [(await client.get("/v1/devices", headers=bearer("view"))).status_code]
        view += [(await client.get("/v1/devices", headers=bearer("view"))).status_code]
        assert view == [200, 200]
        assert (await client.get("/v1/devices", headers=bearer("view"))).status_code == 429
        # Another configured token: its own bucket.
        assert (await client.get("/v1/devices", headers=bearer("op"))).status_code == 200
        # Made-up tokens are counted against the address, so guessing cannot dodge the limit.
        guesses = [
            (await client.get("/v1/devices", headers=bearer(f"guess{i}"))).status_code
            for i in range(4)
        ]
        assert guesses == [401, 401, 429, 429]


def test_buckets_forget_idle_clients_first_when_the_table_is_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ratelimit, "MAX_CLIENTS", 10)
    now = [0.0]
    buckets = ratelimit.TokenBuckets(1.0, 5, clock=lambda: now[0])
    for _ in range(5):
        assert buckets.allow("limited") == 0.0
    assert buckets.allow("limited") > 0  # empty
    now[0] = 0.5
    for i in range(9):  # one request each: full again a second later
        assert buckets.allow(f"idle{i}") == 0.0
    now[0] = 1.6
    buckets.allow("new")  # 11 buckets > 10: the refilled idle ones go, not everyone
    assert len(buckets) == 2  # "limited" (1.6 tokens) and "new"
    assert buckets.allow("limited") == 0.0  # 1.6 tokens: one more request, then empty again
    assert buckets.allow("limited") > 0, "a limited client must not be reset by a flood"
    for i in range(20):  # allowed requests of new clients also keep the table bounded
        buckets.allow(f"burst{i}")
    assert len(buckets) <= 10


async def test_rate_limit_off_with_the_setting(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(disable_rate_limit=True, server={"rate_limit_burst": 1})
    async with asgi_client(settings) as (client, _):
        codes = {(await client.get("/v1/devices")).status_code for _ in range(5)}
        assert codes == {200}


async def test_oversized_bodies_are_refused_with_413(settings_factory: SettingsFactory) -> None:
    async with asgi_client(settings_factory(server={"max_json_body": 64})) as (client, _):
        response = await client.post(
            "/v1/models/can-load", content=b"{" + b" " * 100 + b"}",
            headers={"content-type": "application/json"},
        )  # fmt: skip
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"


async def test_chunked_bodies_over_the_limit_are_refused_with_413(
    settings_factory: SettingsFactory,
) -> None:
    """A body without Content-Length is counted as it arrives; nothing is parsed or changed."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model_id": "m", '
        for _ in range(20):
            yield b" " * 10
        yield b'"estimated_size_mb": 1}'

    async with asgi_client(settings_factory(server={"max_json_body": 64})) as (client, rt):
        before = rt.resources.get_metrics()["can_load_checks_total"]
        response = await client.post(
            "/v1/models/can-load", content=chunks(), headers={"content-type": "application/json"}
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
        assert rt.resources.get_metrics()["can_load_checks_total"] == before

        async def small() -> AsyncIterator[bytes]:
            yield b'{"model_id": "m", "estimated_size_mb": 1}'

        ok = await client.post(
            "/v1/models/can-load", content=small(), headers={"content-type": "application/json"}
        )
        assert ok.status_code == 200 and ok.json()["can_load"] is True


@contextlib.asynccontextmanager
async def client_at(settings: Settings, address: str) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose requests come from ``address`` (as a peer on another machine would)."""
    async with Runtime(settings) as rt:
        transport = httpx.ASGITransport(app=create_app(runtime=rt), client=(address, 4321))
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
            yield client


@pytest.mark.parametrize(
    ("address", "status"), [("10.1.2.3", 403), ("::1", 200), ("127.0.0.9", 200)]
)
async def test_without_tokens_only_local_callers_get_in(
    settings_factory: SettingsFactory, address: str, status: int
) -> None:
    """However the app is served (uvicorn --factory, a port mapping), no tokens means local only."""
    async with client_at(settings_factory(), address) as client:
        response = await client.get("/v1/devices")
        assert response.status_code == status
        if status == 403:
            assert "only this machine may call" in response.json()["error"]["message"]
        assert (await client.get("/healthz")).status_code == 200
    async with client_at(settings_factory(auth={"tokens": TOKENS}), address) as client:
        ok = await client.get("/v1/devices", headers=bearer("view"))
        assert ok.status_code == 200  # with tokens, any address with a valid token
