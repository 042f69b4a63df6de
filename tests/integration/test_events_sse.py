"""``GET /v1/events`` (server-sent events) read with httpx streaming from a real server."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema_rs
import pytest

from tests.helpers import ServerProcess, running_server
from tests.promtext import metric_value

pytestmark = pytest.mark.integration

CONFIG = """
[[devices.simulated]]
name = "sim0"
memory = "24GiB"
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(tmp_path_factory.mktemp("sse"), CONFIG) as proc:
        yield proc


def messages(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """Parse SSE lines into messages: fields, plus ``comments`` for ``:`` lines."""
    current: dict[str, Any] = {}
    for line in lines:
        if line == "":
            if current:
                yield current
            current = {}
        elif line.startswith(":"):
            current.setdefault("comments", []).append(line[1:].strip())
        else:
            name, _, value = line.partition(":")
            current[name] = value[1:] if value.startswith(" ") else value


def events_only(stream: Iterator[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    out = []
    for message in stream:
        if "event" in message:
            out.append(message)
            if len(out) == count:
                break
    return out


def allocate(server: ServerProcess, memory: str, priority: str = "normal") -> dict[str, Any]:
    with server.client() as c:
        response = c.post(
            "/v1/allocations", json={"workload_type": "llm", "priority": priority, "memory": memory}
        )
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body


def release_all(server: ServerProcess) -> None:
    with server.client() as c:
        for allocation in c.get("/v1/allocations").json()["allocations"]:
            c.delete(f"/v1/allocations/{allocation['id']}")


def test_live_events_with_a_kind_filter(server: ServerProcess) -> None:
    url = server.url + "/v1/events?kinds=allocation_granted,preempted"
    with httpx.stream("GET", url, timeout=10) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = messages(response.iter_lines())
        first = next(stream)
        assert first["retry"] == "3000" and first["comments"] == ["connected"]
        victim = allocate(server, "20GiB", "background")
        winner = allocate(server, "10GiB", "user_facing")
        got = events_only(stream, 3)
    release_all(server)
    assert [m["event"] for m in got] == ["allocation_granted", "preempted", "allocation_granted"]
    payloads = [json.loads(m["data"]) for m in got]
    assert [int(m["id"]) for m in got] == [p["seq"] for p in payloads]
    assert payloads[0]["data"]["id"] == victim["id"]
    assert payloads[1]["kind"] == "preempted"
    assert payloads[1]["data"]["allocation_id"] == victim["id"]
    assert payloads[1]["data"]["by"] == winner["id"]
    assert payloads[2]["data"]["id"] == winner["id"]
    assert payloads[0]["seq"] < payloads[1]["seq"] < payloads[2]["seq"]


def test_replay_sends_recent_events_first_and_prefix_filters(server: ServerProcess) -> None:
    ids = [allocate(server, "1GiB")["id"] for _ in range(3)]
    release_all(server)
    url = server.url + "/v1/events?kinds=allocation_*&replay=4"
    with httpx.stream("GET", url, timeout=10) as response:
        got = events_only(messages(response.iter_lines()), 4)
    assert [m["event"] for m in got] == [
        "allocation_granted",
        "allocation_released",
        "allocation_released",
        "allocation_released",
    ]
    assert json.loads(got[0]["data"])["data"]["id"] == ids[2]
    assert [json.loads(m["data"])["data"]["id"] for m in got[1:]] == ids


def test_last_event_id_resumes_after_that_event(server: ServerProcess) -> None:
    granted = allocate(server, "1GiB")
    release_all(server)
    with httpx.stream(
        "GET", server.url + "/v1/events?kinds=allocation_*&replay=2", timeout=10
    ) as response:
        grant_msg, release_msg = events_only(messages(response.iter_lines()), 2)
    assert json.loads(grant_msg["data"])["data"]["id"] == granted["id"]
    headers = {"Last-Event-ID": grant_msg["id"]}
    url = server.url + "/v1/events?kinds=allocation_*"
    with httpx.stream("GET", url, headers=headers, timeout=10) as response:
        (resumed,) = events_only(messages(response.iter_lines()), 1)
    assert resumed["id"] == release_msg["id"]
    assert resumed["event"] == "allocation_released"


def test_keep_alive_comments_when_idle(server: ServerProcess) -> None:
    url = server.url + "/v1/events?kinds=nothing_ever&keepalive_s=0.1"
    started = time.monotonic()
    with httpx.stream("GET", url, timeout=10) as response:
        stream = messages(response.iter_lines())
        next(stream)  # connected
        second, third = next(stream), next(stream)
    assert second == {"comments": ["keep-alive"]} and third == {"comments": ["keep-alive"]}
    assert time.monotonic() - started < 5


def test_bad_parameters_are_422(server: ServerProcess) -> None:
    with server.client() as c:
        assert c.get("/v1/events", params={"kinds": "a b"}).status_code == 422
        assert c.get("/v1/events", params={"replay": -1}).status_code == 422
        bad_id = c.get("/v1/events", headers={"Last-Event-ID": "abc"})
        assert bad_id.status_code == 422
        assert "Last-Event-ID" in bad_id.json()["error"]["message"]


def open_streams(server: ServerProcess) -> float:
    with server.client() as c:
        value = metric_value(c.get("/metrics").text, "vramancer_events_streams")
    if value is None:
        raise AssertionError("vramancer_events_streams is missing from /metrics")
    return value


def test_client_disconnect_ends_the_stream_on_the_server(server: ServerProcess) -> None:
    # keep the line iterators referenced: dropping one closes the connection (httpx)
    with httpx.stream("GET", server.url + "/v1/events", timeout=10) as first:
        first_lines = messages(first.iter_lines())
        next(first_lines)
        with httpx.stream("GET", server.url + "/v1/events", timeout=10) as second:
            second_lines = messages(second.iter_lines())
            next(second_lines)
            assert open_streams(server) == 2
        deadline = time.monotonic() + 5
        while open_streams(server) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert open_streams(server) == 1
    deadline = time.monotonic() + 5
    while open_streams(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_streams(server) == 0
    with server.client() as c:
        assert c.get("/healthz").json()["status"] == "ok"


def test_stream_ends_cleanly_when_the_server_stops(tmp_path: Any) -> None:
    with running_server(tmp_path, CONFIG) as server:
        ended: list[float] = []
        errors: list[BaseException] = []
        connected = threading.Event()

        def read() -> None:
            try:
                with httpx.stream("GET", server.url + "/v1/events", timeout=30) as response:
                    for message in messages(response.iter_lines()):
                        if message.get("comments") == ["connected"]:
                            connected.set()
                ended.append(time.monotonic())
            except BaseException as exc:
                errors.append(exc)

        reader = threading.Thread(target=read)
        reader.start()
        assert connected.wait(10)
        stopped_at = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        reader.join(15)
        assert not reader.is_alive()
        assert errors == []
        assert ended and ended[0] - stopped_at < 5
        # uvicorn re-raises the signal after its graceful shutdown
        assert server.proc.wait(timeout=15) in (0, -signal.SIGTERM)


def test_a_signal_during_register_does_not_deadlock() -> None:
    """The SIGTERM handler runs on the main thread between two bytecodes, possibly while that
    thread holds the watch's lock inside register(): triggering then must not deadlock."""
    from vramancer.api.routers.events import _ShutdownWatch

    watch = _ShutdownWatch()
    done: list[bool] = []

    def interrupted_register() -> None:
        with watch._lock:  # inside register() when the signal arrives
            watch.trigger()
            done.append(True)

    thread = threading.Thread(target=interrupted_register, daemon=True)
    thread.start()
    thread.join(timeout=2)
    assert done == [True] and not thread.is_alive()
    assert watch._stopping


def test_the_schema_route_describes_every_message_the_stream_sends(server: ServerProcess) -> None:
    with server.client() as c:
        response = c.get("/v1/events/schema")
    assert response.status_code == 200
    schema = response.json()
    assert schema["media_type"] == "text/event-stream"
    kinds = {k["kind"]: k["data"] for k in schema["kinds"]}
    assert {"runtime_started", "allocation_granted", "preempted", "task_state"} <= kinds.keys()
    assert "from" in kinds["model_migrated"]["properties"]  # the wire key, not the field name
    validate = jsonschema_rs.Draft202012Validator(schema["message"]).validate
    granted = allocate(server, "1GiB")
    release_all(server)
    url = server.url + "/v1/events?kinds=allocation_*,runtime_started&replay=1000"
    with httpx.stream("GET", url, timeout=10) as response:
        stream = messages(response.iter_lines())
        got = []
        for message in stream:
            if "event" in message:
                got.append(json.loads(message["data"]))
                last = got[-1]
                if last["kind"] == "allocation_released" and last["data"]["id"] == granted["id"]:
                    break
    assert got[0]["kind"] == "runtime_started"
    for payload in got:
        validate(payload)
        assert list(payload["data"]) == list(kinds[payload["kind"]]["properties"])
    jsonschema_rs.Draft202012Validator(schema["stream_dropped"]).validate(
        {"kind": "stream_dropped", "reason": "slow_consumer", "message": "behind"}
    )
