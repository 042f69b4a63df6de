"""Who may call, decided from the headers before any body is read: Host (DNS rebinding), browser
cross-origin writes, repeated auth headers, the token; body caps per route; short 422s."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.unit.api.asgi import asgi_client
from vramancer.api import errors
from vramancer.api.app import create_app
from vramancer.api.guard import Gate, match_token
from vramancer.config import Role, Settings
from vramancer.runtime import Runtime

TOKENS = {"adm": "admin", "op": "operator", "view": "viewer"}
SettingsFactory = Callable[..., Settings]
NOOP = {"type": "noop"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def raw_app(settings: Settings) -> AsyncIterator[Any]:
    async with Runtime(settings) as rt:
        yield create_app(runtime=rt)


async def call(
    app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]]
) -> tuple[int, dict[str, str], bytes, int]:
    """One request straight through ASGI; returns status, headers, body and how many times the
    app asked for the request body (its receive channel)."""
    reads = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"[[],[]," * 1000, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
        "root_path": "", "headers": headers, "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8470),
    }  # fmt: skip
    await app(scope, receive, send)
    start = sent[0]
    response_headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], response_headers, body, reads


async def test_a_caller_without_a_token_is_refused_before_its_body_is_read(
    settings_factory: SettingsFactory,
) -> None:
    big = [(b"host", b"127.0.0.1:8470"), (b"content-type", b"application/json"),
           (b"content-length", b"90000000")]  # fmt: skip
    async with raw_app(settings_factory(auth={"tokens": TOKENS})) as app:
        status, headers, body, reads = await call(app, "POST", "/api/tasks/submit", big)
        assert (status, reads) == (401, 0)
        assert json.loads(body)["error"]["code"] == "unauthorized"
        assert headers["connection"] == "close"  # the unread body is never received
        chunked = [(b"host", b"localhost"), (b"transfer-encoding", b"chunked"),
                   (b"authorization", b"Bearer guess")]  # fmt: skip
        status, _, body, reads = await call(app, "POST", "/v1/allocations", chunked)
        assert (status, reads) == (401, 0)
        assert json.loads(body)["error"]["message"] == "unknown token"


async def test_a_json_body_over_max_json_body_is_refused_unread_raw_blocks_keep_max_body(
    settings_factory: SettingsFactory,
) -> None:
    settings = settings_factory(server={"max_json_body": 1000, "max_body": 100_000})
    async with raw_app(settings) as app:
        announced = [(b"host", b"localhost"), (b"content-length", b"5000")]
        status, headers, body, reads = await call(app, "POST", "/api/tasks/submit", announced)
        assert (status, reads) == (413, 0) and headers["connection"] == "close"
        assert json.loads(body)["error"] == {
            "code": "payload_too_large",
            "message": "request body of 4.9 KiB is over the limit of 1000 B",
            "max_bytes": 1000,
        }
        # Chunked: read until the limit is passed (O(limit)), then refused.
        chunked = [(b"host", b"localhost"), (b"transfer-encoding", b"chunked"),
                   (b"content-type", b"application/json")]  # fmt: skip
        status, _, body, reads = await call(app, "POST", "/api/tasks/submit", chunked)
        assert status == 413 and reads == 1  # the first 7000-byte chunk already passed 1000
    async with asgi_client(settings) as (client, _):
        block = await client.put("/v1/memory/blocks/big", content=b"x" * 50_000)
        assert block.status_code == 200 and block.json()["size"] == 50_000
        too_big = await client.put("/v1/memory/blocks/big", content=b"x" * 100_001)
        assert too_big.status_code == 413


@pytest.mark.parametrize(
    "host",
    ["localhost", "localhost:8470", "127.0.0.1:1", "[::1]:8470", "127.0.0.9", "LOCALHOST.",
     "box.lan:8470"],
)  # fmt: skip
async def test_without_tokens_loopback_names_and_allowed_hosts_are_accepted(
    settings_factory: SettingsFactory, host: str
) -> None:
    settings = settings_factory(server={"allowed_hosts": ["Box.LAN"]})
    async with asgi_client(settings) as (client, _):
        response = await client.post("/v1/system/optimize", headers={"Host": host})
        assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "host", ["rebind.attacker.example:8470", "127.0.0.1.attacker.example", "10.0.0.1", "box"]
)
async def test_without_tokens_any_other_host_is_refused(
    settings_factory: SettingsFactory, host: str
) -> None:
    """DNS rebinding: a page on another site names its own host, resolved to this machine."""
    async with asgi_client(settings_factory()) as (client, rt):
        response = await client.post("/api/tasks/submit", json=NOOP, headers={"Host": host})
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "host_not_allowed" and error["host"] == host
        assert repr(host) in error["message"] and "allowed_hosts" in error["message"]
        assert (await client.get("/v1/devices", headers={"Host": host})).status_code == 400
        assert (await client.get("/healthz", headers={"Host": host})).status_code == 200
        assert (await client.get("/", headers={"Host": host})).status_code == 200
        assert rt.tasks.counts().get("queued", 0) == 0


async def test_with_tokens_allowed_hosts_is_checked_when_set(
    settings_factory: SettingsFactory,
) -> None:
    other = {"Host": "elsewhere.example", **bearer("view")}
    async with asgi_client(settings_factory(auth={"tokens": TOKENS})) as (client, _):
        assert (await client.get("/v1/devices", headers=other)).status_code == 200
    settings = settings_factory(auth={"tokens": TOKENS}, server={"allowed_hosts": ["gpu.lan"]})
    async with asgi_client(settings) as (client, _):
        assert (await client.get("/v1/devices", headers=other)).status_code == 400
        named = {"Host": "gpu.lan:8470", **bearer("view")}
        assert (await client.get("/v1/devices", headers=named)).status_code == 200
        assert (await client.get("/v1/devices", headers=bearer("view"))).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "cross-site", "Origin": "http://localhost"},
        {"Sec-Fetch-Site": "same-site", "Origin": "http://localhost:3000"},
    ],
)
async def test_browser_writes_from_another_origin_are_refused(
    settings_factory: SettingsFactory, headers: dict[str, str]
) -> None:
    async with asgi_client(settings_factory()) as (client, rt):
        response = await client.post("/api/tasks/submit", json=NOOP, headers=headers)
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "cross_origin"
        delete = await client.delete("/v1/memory/blocks/b", headers=headers)
        assert delete.status_code == 403
        assert rt.tasks.counts().get("queued", 0) == 0
        # Reading is not a write (and a browser cannot read the answer across origins).
        assert (await client.get("/v1/devices", headers=headers)).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"},
        {"Origin": "http://127.0.0.1:8470"},  # an older browser: Origin only, a loopback name
        {"Sec-Fetch-Site": "none"},  # typed by the user
        {},
    ],
)
async def test_same_origin_writes_pass(
    settings_factory: SettingsFactory, headers: dict[str, str]
) -> None:
    async with asgi_client(settings_factory()) as (client, _):
        response = await client.post("/api/tasks/submit", json=NOOP, headers=headers)
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("name", ["Authorization", "X-API-ROLE", "Host"])
async def test_a_repeated_auth_header_is_a_400(
    settings_factory: SettingsFactory, name: str
) -> None:
    values = {"Authorization": ("Bearer view", "Bearer adm"), "X-API-ROLE": ("viewer", "admin"),
              "Host": ("localhost", "localhost")}[name]  # fmt: skip
    headers = [(b"host", b"localhost")] if name != "Host" else []
    headers += [(name.lower().encode(), v.encode()) for v in values]
    if name != "Authorization":
        headers.append((b"authorization", b"Bearer adm"))
    async with raw_app(settings_factory(auth={"tokens": TOKENS})) as app:
        status, _, body, _ = await call(app, "GET", "/v1/devices", headers)
        assert status == 400
        message = json.loads(body)["error"]["message"]
        assert message == f"the {name} header is given more than once"


async def test_openapi_needs_a_token_when_tokens_are_configured(
    settings_factory: SettingsFactory,
) -> None:
    async with asgi_client(settings_factory(auth={"tokens": TOKENS})) as (client, _):
        for path in ("/openapi.json", "/docs", "/docs/static/swagger-ui.css"):
            assert (await client.get(path)).status_code == 401, path
        schema = await client.get("/openapi.json", headers=bearer("view"))
        assert schema.status_code == 200 and "/v1/devices" in schema.json()["paths"]
        assert (await client.get("/", headers={})).status_code == 200  # the page holds no data
    async with asgi_client(settings_factory()) as (client, _):
        assert (await client.get("/openapi.json")).status_code == 200


def test_tokens_are_matched_whole_and_only_configured_ones() -> None:
    tokens = {"abc": "viewer", "abcd": "admin"}
    assert match_token(b"abc", tokens) == "abc"
    assert match_token(b"abcd", tokens) == "abcd"
    assert match_token(b"ab", tokens) is None
    assert match_token("é".encode(), {"é": "viewer"}) == "é"
    gate = Gate({"t": Role.VIEWER})
    assert gate.any_host


async def test_a_422_never_echoes_a_large_body(settings_factory: SettingsFactory) -> None:
    """Thousands of problems (here: unknown keys) are counted, a few are described."""
    body = {f"k{i}-" + "x" * 50: [[]] * 5 for i in range(5000)}
    body.update({"workload_type": "llm", "memory": "1GiB"})
    async with asgi_client(settings_factory()) as (client, _):
        response = await client.post("/v1/allocations", json=body)
        assert response.status_code == 422
        assert len(response.content) < 20_000
        error = response.json()["error"]
        assert error["errors_total"] == 5000 and len(error["fields"]) == 20
        assert error["message"].endswith("and 4980 more")
        huge = await client.post("/v1/allocations", json={"workload_type": "llm",
                                                          "memory": "9" * 100_000})  # fmt: skip
        assert huge.status_code == 422 and len(huge.content) < 2_000


async def test_the_validation_handler_caps_every_part() -> None:
    from fastapi.exceptions import RequestValidationError

    long = "x" * 10_000
    problem = {"type": "value_error", "loc": ("body", long), "msg": long, "input": long}
    problems = [problem] * 1000
    response = await errors._validation(None, RequestValidationError(problems))  # type: ignore[arg-type]
    assert len(response.body) < 20 * 2 * errors.MAX_PART_CHARS + 1000


async def test_request_sizes_given_as_strings_are_bounded(
    settings_factory: SettingsFactory,
) -> None:
    async with asgi_client(settings_factory()) as (client, _):
        long_size = "1" + " " * 10_000 + "GiB"
        response = await client.post(
            "/v1/allocations", json={"workload_type": "llm", "memory": long_size}
        )
        assert response.status_code == 422
        assert response.json()["error"]["fields"] == ["body.memory"]


async def test_a_huge_host_is_refused_and_quoted_short(settings_factory: SettingsFactory) -> None:
    async with asgi_client(settings_factory()) as (client, _):
        response = await client.get("/v1/devices", headers={"Host": "h" * 8000})
        assert response.status_code == 400
        assert len(response.content) < 1000
