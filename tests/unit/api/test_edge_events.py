"""``GET /v1/events`` bounds: clients that do not keep up are dropped (and told so), and the
number of open streams is capped in all and per client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from tests.promtext import metric_value
from vramancer import event_types as ev
from vramancer.api.routers import events
from vramancer.config import Settings
from vramancer.runtime import Runtime

SettingsFactory = Callable[..., Settings]


def _metric(rt: Runtime, name: str) -> float:
    return metric_value(rt.metrics.render().decode(), name) or 0.0


async def test_a_client_that_falls_a_queue_behind_is_told_and_dropped(
    settings_factory: SettingsFactory,
) -> None:
    async with Runtime(settings_factory()) as rt:
        stream = events._stream(rt, lambda _e: True, 0, None, 15.0)
        assert "connected" in await anext(stream)
        for i in range(events.QUEUE_EVENTS + 10):
            rt.events.publish(ev.BlockPinned(id=f"b{i}"))
        await asyncio.sleep(0.1)  # the bus hands events over on the loop
        last = await anext(stream)
        assert last.startswith("event: stream_dropped\n")
        assert '"reason": "slow_consumer"' in last and "Last-Event-ID" in last
        assert await anext(stream, None) is None
        assert _metric(rt, "vramancer_events_streams_dropped_total") == 1
        assert _metric(rt, "vramancer_events_streams") == 0


async def test_a_client_that_keeps_up_is_not_dropped(settings_factory: SettingsFactory) -> None:
    async with Runtime(settings_factory()) as rt:
        stream = events._stream(rt, lambda e: e.kind == "block_pinned", 0, None, 15.0)
        await anext(stream)
        got: list[str] = []
        total = 3 * events.QUEUE_EVENTS
        for i in range(total):
            rt.events.publish(ev.BlockPinned(id=f"b{i}"))
            if i % 50 == 49 or i == total - 1:
                await asyncio.sleep(0.01)
                while len(got) < i + 1:
                    got.append(await anext(stream))
        assert all(chunk.startswith("id: ") for chunk in got)
        assert len(got) == 3 * events.QUEUE_EVENTS
        await stream.aclose()
        assert _metric(rt, "vramancer_events_streams_dropped_total") == 0


async def test_a_client_that_reads_nothing_is_dropped_after_the_write_timeout(
    settings_factory: SettingsFactory,
) -> None:
    """The connection stops taking bytes: the send blocks; after ``write_timeout_s`` the stream
    ends, its slot is given back and the bus stops feeding it."""
    async with Runtime(settings_factory()) as rt:
        closed = []
        response = events.EventStreamResponse(
            events._stream(rt, lambda _e: True, 0, None, 15.0),
            rt=rt,
            write_timeout_s=0.3,
            on_close=lambda: closed.append(True),
        )
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if message["type"] == "http.response.body":  # the client's window is shut
                await asyncio.Event().wait()

        async def receive() -> dict[str, Any]:
            await asyncio.Event().wait()
            return {}

        scope = {"type": "http", "asgi": {"spec_version": "2.4"}}
        started = time.monotonic()
        await asyncio.wait_for(response(scope, receive, send), timeout=10)
        took = time.monotonic() - started
        assert 0.3 <= took < 0.3 + events.FAREWELL_TIMEOUT_S + 1.0
        assert closed == [True]
        assert _metric(rt, "vramancer_events_streams") == 0
        assert _metric(rt, "vramancer_events_streams_dropped_total") == 1
        # The farewell was attempted as the final body message.
        assert sent[-1]["more_body"] is False and b"stream_dropped" in sent[-1]["body"]


def test_stream_slots_cap_in_all_and_per_client() -> None:
    slots = events.StreamSlots(total=3, per_client=2)
    assert slots.take("a") is None and slots.take("a") is None
    refused = slots.take("a")
    assert refused is not None and "this client has 2 event streams open" in refused
    assert slots.take("b") is None
    refused = slots.take("c")
    assert refused is not None and "3 event streams are open" in refused
    slots.give("a")
    assert slots.take("c") is None and len(slots) == 3
    for key in ("a", "b", "c"):
        slots.give(key)
    assert len(slots) == 0 and slots.take("a") is None


def test_an_event_is_formatted_once_for_every_stream() -> None:
    from vramancer.events import Event

    first = Event(ev.BlockPut(id="a", tier="RAM", size=1), seq=7)
    text = events.format_event(first)
    assert events.format_event(first) is text  # the second stream reuses the message
    other = Event(ev.BlockPut(id="b", tier="RAM", size=1), seq=7)  # same seq, another bus
    assert '"id":"b"' in events.format_event(other)
    for seq in range(2 * events.QUEUE_EVENTS):  # the memory is bounded
        events.format_event(Event(ev.BlockPinned(id="k"), seq=seq))
    assert len(events._FORMATTED) <= events.QUEUE_EVENTS
