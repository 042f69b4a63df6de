"""The HTTP edge of a real ``vramancer serve`` under hostile requests: huge bodies without a
token, JSON bodies over their cap, DNS rebinding, cross-origin writes, forged
``X-Forwarded-For``, and event streams that are opened in numbers or never read."""

from __future__ import annotations

import contextlib
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import ServerProcess, running_server
from tests.promtext import metric_value

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
BIG = 86 * MIB
CONFIG = """
[server]
max_event_streams = 3
max_event_streams_per_client = 2
event_stream_write_timeout_s = 1.0

[auth]
tokens = { "adm" = "admin", "op" = "operator", "view" = "viewer", "view2" = "viewer" }

[devices]
backends = []
[[devices.simulated]]
name = "sim0"
memory = "24GiB"
"""
OPEN_CONFIG = """
[devices]
backends = []
[[devices.simulated]]
name = "sim0"
memory = "24GiB"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("edge")
    with running_server(tmp, CONFIG, env={"VRM_DISABLE_RATE_LIMIT": "1"}) as proc:
        yield proc


def rss(server: ServerProcess) -> int:
    return int(psutil.Process(server.proc.pid).memory_info().rss)


def connect(server: ServerProcess, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", server.port))
    return sock


def head(method: str, path: str, port: int, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket, timeout: float = 5.0) -> tuple[int, bytes]:
    """Status and everything the server sent until it closed the connection (or timeout)."""
    sock.settimeout(timeout)
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data


def send_body_until_refused(sock: socket.socket, total: int) -> int:
    """Send ``total`` bytes of ``[[],[],...`` unless the server answers or stops taking them
    first; returns the bytes sent."""
    chunk = b"[]," * 21_846  # 64 KiB
    sent = 0
    sock.settimeout(10)
    with contextlib.suppress(OSError):
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # an answer (or the close) is there
            sock.sendall(chunk)
            sent += len(chunk)
    return sent


def test_a_huge_body_without_a_token_is_refused_before_it_is_read(server: ServerProcess) -> None:
    """86 MiB announced to a task route by a caller without a token: 401 at once, the server
    closes the connection instead of receiving the body, its memory does not grow, and it
    keeps answering others meanwhile."""
    before = rss(server)
    with connect(server) as sock:
        started = time.monotonic()
        announced = {"Content-Type": "application/json", "Content-Length": str(BIG)}
        sock.sendall(head("POST", "/api/tasks/submit", server.port, announced))
        sent = send_body_until_refused(sock, BIG)
        status, data = read_response(sock)
        took = time.monotonic() - started
    assert status == 401 and b'"code":"unauthorized"' in data.replace(b" ", b"")
    assert b"connection: close" in data.lower()
    assert sent < BIG // 4, f"the server took {sent} bytes of a body it refused"
    assert took < 10
    assert rss(server) - before < 64 * MIB
    assert httpx.get(server.url + "/healthz", timeout=2).status_code == 200


def test_json_bodies_over_max_json_body_are_refused_at_once_or_as_they_pass_it(
    server: ServerProcess,
) -> None:
    before = rss(server)
    with connect(server) as sock:  # announced: refused from the length alone
        sock.sendall(head("POST", "/api/tasks/submit_batch", server.port,
                          {"Authorization": "Bearer op", "Content-Type": "application/json",
                           "Content-Length": str(BIG)}))  # fmt: skip
        sent = send_body_until_refused(sock, BIG)
        status, data = read_response(sock)
    assert status == 413 and b"over the limit of 1.0 MiB" in data
    assert sent < BIG // 4
    with connect(server) as sock:  # chunked: refused once 1 MiB has arrived
        sock.sendall(head("POST", "/api/tasks/submit_batch", server.port,
                          {"Authorization": "Bearer op", "Content-Type": "application/json",
                           "Transfer-Encoding": "chunked"}))  # fmt: skip
        chunk = b"[]," * 21_846
        framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
        sent = 0
        sock.settimeout(10)
        with contextlib.suppress(OSError):
            while sent < BIG and not select.select([sock], [], [], 0)[0]:
                sock.sendall(framed)
                sent += len(chunk)
        status, data = read_response(sock)
    assert status in (413, 0)  # 0: the close overtook the answer (the reset can drop it)
    assert sent < BIG // 4, f"the server took {sent} bytes of a body over its limit"
    assert rss(server) - before < 64 * MIB


def test_a_422_does_not_echo_the_body(server: ServerProcess) -> None:
    body = {f"key{i}": [[]] * 10 for i in range(20_000)}  # ~ 0.6 MiB, 20 000 unknown keys
    body.update({"workload_type": "llm", "memory": "1GiB"})
    with server.client("op") as client:
        response = client.post("/v1/allocations", json=body)
    assert response.status_code == 422
    assert len(response.content) < 20_000
    assert response.json()["error"]["errors_total"] == 20_000


def test_openapi_needs_a_viewer_token(server: ServerProcess) -> None:
    assert httpx.get(server.url + "/openapi.json", timeout=10).status_code == 401
    with server.client("view") as client:
        assert "/v1/events" in client.get("/openapi.json").json()["paths"]


def _open_stream(stack: contextlib.ExitStack, server: ServerProcess, token: str) -> httpx.Response:
    client = stack.enter_context(server.client(token))
    response = stack.enter_context(client.stream("GET", "/v1/events"))
    if response.status_code == 200:
        lines = response.iter_lines()
        next(lines)  # the stream is open on the server
        stack.callback(lines.close)  # (dropping the iterator would close the connection)
    else:
        response.read()
    return response


def test_event_streams_are_capped_per_client_and_in_all(server: ServerProcess) -> None:
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(contextlib.ExitStack())
        assert _open_stream(first, server, "view").status_code == 200
        assert _open_stream(stack, server, "view").status_code == 200
        third = _open_stream(stack, server, "view")
        assert third.status_code == 429 and third.headers["retry-after"]
        assert third.json()["error"]["code"] == "too_many_streams"
        assert "this client has 2 event streams open" in third.json()["error"]["message"]
        assert _open_stream(stack, server, "view2").status_code == 200  # 3 open in all
        over = _open_stream(stack, server, "view2")
        assert over.status_code == 429 and "3 event streams are open" in over.text
        first.close()  # one of view's ends: its slot is free again
        deadline = time.monotonic() + 5
        while (late := _open_stream(stack, server, "view2")).status_code == 429:
            assert time.monotonic() < deadline, late.text
            time.sleep(0.1)
        assert late.status_code == 200


def _metric(server: ServerProcess, name: str) -> float:
    with server.client("view") as client:
        return metric_value(client.get("/metrics").text, name) or 0.0


def test_a_stream_that_is_never_read_is_dropped(server: ServerProcess) -> None:
    """The client opens a stream and stops reading; events pile up behind its shut window.
    After ``event_stream_write_timeout_s`` the server drops it and closes the connection."""
    dropped = _metric(server, "vramancer_events_streams_dropped_total")
    with connect(server, rcvbuf=4096) as sock:
        sock.sendall(head("GET", "/v1/events", server.port, {"Authorization": "Bearer view"}))
        assert sock.recv(12) == b"HTTP/1.1 200"
        deadline = time.monotonic() + 60
        owner = "x" * 200
        with server.client("op") as client:
            while _metric(server, "vramancer_events_streams_dropped_total") == dropped:
                assert time.monotonic() < deadline, "the stream was never dropped"
                for _ in range(50):  # two events each, ~500 bytes apiece
                    grant = client.post(
                        "/v1/allocations",
                        json={"workload_type": "other", "memory": "1MiB", "owner": owner},
                    )
                    assert grant.status_code == 201, grant.text
                    client.delete(f"/v1/allocations/{grant.json()['id']}")
        assert _metric(server, "vramancer_events_streams") == 0
        sock.settimeout(20)
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(65536):
                pass  # what was buffered, then the end: the server closed the connection


def test_without_tokens_a_rebound_host_is_refused(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A page on another site whose name resolves to 127.0.0.1 (DNS rebinding) would reach a
    token-less server as admin; its Host header gives it away."""
    open_server = server_factory(OPEN_CONFIG, env={"VRM_DISABLE_RATE_LIMIT": "1"})
    marker = tmp_path / "ran"
    task = {"type": "shell", "shell": f"touch {marker}"}
    evil = {"Host": f"rebind.attacker.example:{open_server.port}"}
    with open_server.client() as client:
        refused = client.post("/api/tasks/submit", json=task, headers=evil)
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert error["code"] == "host_not_allowed"
        assert error["host"] == evil["Host"]
        cross = client.post(
            "/api/tasks/submit", json=task, headers={"Origin": "http://rebind.attacker.example"}
        )
        assert cross.status_code == 403 and cross.json()["error"]["code"] == "cross_origin"
        time.sleep(0.5)
        assert client.get("/api/tasks/history").json()["tasks"] == []
        assert not marker.exists()
        named = {"Host": f"localhost:{open_server.port}"}
        assert client.post("/api/tasks/submit", json={"type": "noop"}, headers=named).is_success


def test_x_forwarded_for_does_not_buy_fresh_rate_limit_buckets(
    server_factory: Callable[..., ServerProcess],
) -> None:
    limited = server_factory(
        OPEN_CONFIG + "\n[server]\nrate_limit_burst = 5\nrate_limit_per_s = 0.1\n"
    )
    with limited.client() as client:
        codes = [
            client.get("/v1/devices", headers={"X-Forwarded-For": f"127.0.{i}.{i + 1}"}).status_code
            for i in range(10)
        ]
    assert codes[:5] == [200] * 5 and codes[5:] == [429] * 5
    with limited.client() as client:  # nor a foreign address: the header is not believed
        assert client.get("/healthz", headers={"X-Forwarded-For": "10.1.2.3"}).status_code == 200


def test_trusted_proxies_are_believed(server_factory: Callable[..., ServerProcess]) -> None:
    proxied = server_factory(
        OPEN_CONFIG + '\n[server]\ntrusted_proxies = ["127.0.0.1/32"]\n',
        env={"VRM_DISABLE_RATE_LIMIT": "1"},
    )
    with proxied.client() as client:
        assert client.get("/v1/devices").status_code == 200
        remote = client.get("/v1/devices", headers={"X-Forwarded-For": "10.1.2.3"})
        assert remote.status_code == 403
        assert "only this machine may call" in remote.json()["error"]["message"]
