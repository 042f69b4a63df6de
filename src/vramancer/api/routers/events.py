"""``GET /v1/events``: the event bus as server-sent events (``text/event-stream``).

Each event is one SSE message::

    id: 42
    event: model_loaded
    data: {"kind": "model_loaded", "seq": 42, "timestamp": 1764230400.1, "data": {...}}

``?kinds=a,b`` keeps only those kinds (``task_*`` matches a prefix); ``?replay=N`` first sends
the last N recent events; a ``Last-Event-ID`` header (what browsers send on reconnect) replays
the recent events after that id. A ``: keep-alive`` comment goes out every ``keepalive_s``
(15 s) so proxies keep the connection open. The stream ends when the client goes away, and
when the server stops: uvicorn waits for open responses before it shuts the app down, so the
stream watches for SIGINT/SIGTERM itself (chaining to uvicorn's handlers) and for the runtime
stopping.

Streams cost the server for as long as they are open, so they are bounded: at most ``[server]
max_event_streams`` open in all and ``max_event_streams_per_client`` per client (its token,
else its address); beyond, 429 ``too_many_streams`` with ``Retry-After``. A client that does
not keep up is dropped: when :data:`QUEUE_EVENTS` events wait for it, or when it has read
nothing for ``[server] event_stream_write_timeout_s``, the stream ends with one last message
(when the connection still takes it)::

    event: stream_dropped
    data: {"kind": "stream_dropped", "reason": "slow_consumer", "message": "..."}

and the client reconnects with ``Last-Event-ID`` to get what it missed from the recent events.

``GET /v1/events/schema`` gives the JSON Schema of every event kind's ``data`` (one class per
kind in :mod:`vramancer.event_types`), of a whole message, and of ``stream_dropped``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import signal
import threading
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import Counter
from pydantic import Field
from starlette.types import Receive, Scope, Send

from vramancer import event_types
from vramancer.api.deps import RuntimeDep, authenticate
from vramancer.api.errors import error_response
from vramancer.api.ratelimit import client_key
from vramancer.api.schemas import Answer, ErrorResponse
from vramancer.errors import InvalidInput
from vramancer.events import Event, EventBus
from vramancer.runtime import Runtime

router = APIRouter(tags=["events"])

#: Seconds between keep-alive comments when nothing happens.
KEEPALIVE_S = 15.0
#: How often the stream checks that the runtime is still running.
RUNNING_CHECK_S = 1.0
#: The most events one ``replay`` may ask for (the bus keeps a bounded history anyway).
MAX_REPLAY = 1000
#: What a browser's EventSource waits before reconnecting, in milliseconds.
RETRY_MS = 3000
#: Events that may wait for one stream's client; a client this far behind is dropped.
QUEUE_EVENTS = 256
#: How long the last message of a dropped stream may take to go out.
FAREWELL_TIMEOUT_S = 1.0
#: ``Retry-After`` of a refused stream, in seconds.
RETRY_AFTER_S = 5


def _dropped_message(why: str) -> str:
    data = json.dumps({"kind": "stream_dropped", "reason": "slow_consumer", "message": why})
    return f"event: stream_dropped\ndata: {data}\n\n"


#: The JSON Schema of the ``data`` line of the last message of a dropped stream.
STREAM_DROPPED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The stream's last message: the client did not keep up and was dropped; "
    "reconnect with Last-Event-ID.",
    "properties": {
        "kind": {"const": "stream_dropped"},
        "reason": {"type": "string", "enum": ["slow_consumer"]},
        "message": {"type": "string"},
    },
    "required": ["kind", "reason", "message"],
    "additionalProperties": False,
}


class StreamSlots:
    """Counts open streams, in all and per client, against the two caps."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._open: dict[str, int] = {}
        self._count = 0
        self._lock = threading.Lock()

    def take(self, key: str) -> str | None:
        """Take a slot for ``key``; returns None, or why no slot is free."""
        with self._lock:
            if self._count >= self.total:
                return f"{self._count} event streams are open, the most this server keeps"
            mine = self._open.get(key, 0)
            if mine >= self.per_client:
                return f"this client has {mine} event streams open, the most one client may"
            self._open[key] = mine + 1
            self._count += 1
            return None

    def give(self, key: str) -> None:
        with self._lock:
            left = self._open.get(key, 0) - 1
            if left > 0:
                self._open[key] = left
            else:
                self._open.pop(key, None)
            self._count = max(0, self._count - 1)

    def __len__(self) -> int:
        return self._count


class _ShutdownWatch:
    """Sets an asyncio event on every open stream's loop when SIGINT/SIGTERM arrives.

    The handlers are chained in front of whatever was installed (uvicorn's), from the main
    thread only, once per process; the previous handler is always called.
    """

    def __init__(self) -> None:
        # Reentrant: the signal handler runs on the main thread between two bytecodes, maybe
        # while that thread holds the lock in register()/unregister(); a plain Lock would
        # deadlock the server on a SIGTERM arriving then.
        self._lock = threading.RLock()
        self._installed = False
        self._stopping = False
        self._streams: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def register(
        self, stop: asyncio.Event | None = None
    ) -> tuple[asyncio.AbstractEventLoop, asyncio.Event]:
        entry = (asyncio.get_running_loop(), stop if stop is not None else asyncio.Event())
        with self._lock:
            self._install_locked()
            self._streams.add(entry)
            if self._stopping:
                entry[1].set()
        return entry

    def unregister(self, entry: tuple[asyncio.AbstractEventLoop, asyncio.Event]) -> None:
        with self._lock:
            self._streams.discard(entry)

    def _install_locked(self) -> None:
        if self._installed or threading.current_thread() is not threading.main_thread():
            return
        self._installed = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            signal.signal(sig, self._chain(previous))

    def _chain(self, previous: Any) -> Callable[[int, FrameType | None], None]:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.trigger()
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                signal.raise_signal(signum)

        return handler

    def trigger(self) -> None:
        """End every open stream (the server is stopping)."""
        with self._lock:
            self._stopping = True
            streams = list(self._streams)
        for loop, event in streams:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)


_WATCH = _ShutdownWatch()

#: Put in a stream's queue to wake it (never sent: a stream recognises it by identity).
_WAKE = Event(event_types.RuntimeStarted(node=""), seq=-1)


class _Stop(asyncio.Event):
    """A stream's stop flag; setting it also wakes the stream waiting on its queue (one wait,
    not a task per flag and queue for every event)."""

    def __init__(self, queue: asyncio.Queue[Event]) -> None:
        super().__init__()
        self._queue = queue

    def set(self) -> None:
        super().set()
        with contextlib.suppress(asyncio.QueueEmpty, asyncio.QueueFull):
            if self._queue.full():
                self._queue.get_nowait()
            self._queue.put_nowait(_WAKE)


def _parse_kinds(kinds: str | None) -> tuple[set[str], tuple[str, ...]]:
    """``a,b,task_*`` → exact kinds and prefixes."""
    exact: set[str] = set()
    prefixes: list[str] = []
    for raw in (kinds or "").split(","):
        name = raw.strip()
        if not name:
            continue
        if not all(c.isalnum() or c in "_.*-" for c in name) or "*" in name[:-1]:
            raise InvalidInput(
                f"kinds: {name!r} is not an event kind (letters, digits, '_', a trailing '*')",
                field="kinds",
            )
        if name.endswith("*"):
            prefixes.append(name[:-1])
        else:
            exact.add(name)
    return exact, tuple(prefixes)


def _matcher(kinds: str | None) -> Callable[[Event], bool]:
    exact, prefixes = _parse_kinds(kinds)
    if not exact and not prefixes:
        return lambda _event: True
    return lambda event: event.kind in exact or event.kind.startswith(prefixes)


def format_event(event: Event) -> str:
    """One SSE message: ``id``, ``event`` and a one-line JSON ``data`` field.

    Every open stream sends the same event object: it is formatted once (the last
    :data:`QUEUE_EVENTS` are remembered, by identity), not once per stream."""
    key = id(event)
    cached = _FORMATTED.get(key)
    if cached is not None and cached[0] is event:
        return cached[1]
    data = json.dumps(event.as_dict(), default=str, separators=(",", ":"))
    text = f"id: {event.seq}\nevent: {event.kind}\ndata: {data}\n\n"
    _FORMATTED[key] = (event, text)  # holding the event keeps its id from being reused
    if len(_FORMATTED) > QUEUE_EVENTS:
        with contextlib.suppress(RuntimeError, StopIteration):  # (another loop's thread)
            _FORMATTED.pop(next(iter(_FORMATTED)), None)
    return text


#: id(event) -> (event, its message), oldest first. Streams run on one event loop.
_FORMATTED: dict[int, tuple[Event, str]] = {}


def _backlog(
    bus: EventBus, wanted: Callable[[Event], bool], replay: int, last_id: int | None
) -> list[Event]:
    recent = bus.recent(limit=MAX_REPLAY)
    if last_id is not None:
        return [e for e in recent if e.seq > last_id and wanted(e)]
    if replay <= 0:
        return []
    return [e for e in recent if wanted(e)][-replay:]


async def _stream(
    rt: Runtime,
    wanted: Callable[[Event], bool],
    replay: int,
    last_id: int | None,
    keepalive_s: float,
) -> AsyncIterator[str]:
    bus = rt.events
    # Subscribe before reading the backlog so nothing falls in between.
    queue = bus.queue(maxsize=QUEUE_EVENTS)
    stop = _Stop(queue)
    entry = _WATCH.register(stop)
    loop = asyncio.get_running_loop()
    streams = rt.metrics.gauge("vramancer_events_streams", "Open GET /v1/events streams.")
    streams.inc()
    try:
        yield f"retry: {RETRY_MS}\n: connected\n\n"
        sent = 0
        for old in _backlog(bus, wanted, replay, last_id):
            sent = old.seq
            yield format_event(old)
        last_write = loop.time()
        while not stop.is_set() and rt.running:
            if queue.full():
                yield _dropped_message(
                    f"the client fell {QUEUE_EVENTS} events behind, so this stream was dropped; "
                    "reconnect with Last-Event-ID for the recent events it missed"
                )
                # (Counted once it went out: a write that times out is counted by the response.)
                _dropped_total(rt).inc()
                return
            wait = min(RUNNING_CHECK_S, max(0.0, last_write + keepalive_s - loop.time()))
            event = await _next(queue, wait)
            if event is not None and event.seq > sent and wanted(event):
                last_write = loop.time()
                yield format_event(event)
            elif loop.time() - last_write >= keepalive_s:
                last_write = loop.time()
                yield ": keep-alive\n\n"
    finally:
        streams.dec()
        bus.close_queue(queue)
        _WATCH.unregister(entry)


def _dropped_total(rt: Runtime) -> Counter:
    return rt.metrics.counter(
        "vramancer_events_streams_dropped_total",
        "GET /v1/events streams dropped because their client did not keep up.",
    )


class EventStreamResponse(StreamingResponse):
    """``text/event-stream`` whose writes time out: a client that reads nothing for
    ``write_timeout_s`` is dropped. ``on_close`` runs once the response ends, however."""

    def __init__(
        self,
        content: AsyncIterator[str],
        *,
        rt: Runtime,
        write_timeout_s: float,
        on_close: Callable[[], None],
    ) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.rt = rt
        self.write_timeout_s = write_timeout_s
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _aclose(self.body_iterator)
            self.on_close()

    async def stream_response(self, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        async for chunk in self.body_iterator:
            body = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
            if not await _write(send, body, True, self.write_timeout_s):
                await self._drop(send)
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _drop(self, send: Send) -> None:
        """The client read nothing for ``write_timeout_s``: stop feeding it, say so if the
        connection still takes it, else end without it (the server closes the connection)."""
        await _aclose(self.body_iterator)
        _dropped_total(self.rt).inc()
        why = (
            f"the client read nothing for {self.write_timeout_s:g} s, so this stream was "
            "dropped; reconnect with Last-Event-ID for the recent events it missed"
        )
        await _write(send, _dropped_message(why).encode(), False, FAREWELL_TIMEOUT_S)


async def _write(send: Send, body: bytes, more: bool, timeout_s: float) -> bool:
    """Send one body message; False when it did not go out within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            await send({"type": "http.response.body", "body": body, "more_body": more})
    except TimeoutError:
        return False
    return True


async def _aclose(iterator: Any) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(RuntimeError):  # already running or closed
            await aclose()


async def _next(queue: asyncio.Queue[Event], timeout: float) -> Event | None:
    """The next event, or None after ``timeout`` or when woken (``_Stop``)."""
    if queue.empty():
        try:
            async with asyncio.timeout(timeout):
                event = await queue.get()
        except TimeoutError:
            return None
    else:
        event = queue.get_nowait()
    return None if event is _WAKE else event


class EventKindSchema(Answer):
    """One event kind: its SSE ``event:`` name and the JSON Schema of its ``data``."""

    kind: str
    description: str
    data: dict[str, Any] = Field(description="JSON Schema of the message's data object.")


class EventStreamSchema(Answer):
    """What ``GET /v1/events`` sends."""

    media_type: str = Field(description="The stream's media type.")
    message: dict[str, Any] = Field(
        description="JSON Schema of one message's data line (kind, seq, timestamp, data)."
    )
    kinds: list[EventKindSchema] = Field(description="Every event kind the bus publishes.")
    stream_dropped: dict[str, Any] = Field(
        description="JSON Schema of the data line of a dropped stream's last message."
    )


@functools.cache
def _schema() -> EventStreamSchema:
    return EventStreamSchema(
        media_type="text/event-stream",
        message=event_types.message_schema(),
        kinds=[
            EventKindSchema(
                kind=cls.kind,
                description=" ".join((cls.__doc__ or "").split()),
                data=event_types.data_schema(cls),
            )
            for cls in event_types.EVENT_TYPES
        ],
        stream_dropped=STREAM_DROPPED_SCHEMA,
    )


@router.get("/v1/events/schema", response_model=EventStreamSchema)
async def events_schema() -> EventStreamSchema:
    """The JSON Schema of every event kind ``GET /v1/events`` may send."""
    return _schema()


@router.get(
    "/v1/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "Server-sent events, one per bus event, until the client leaves; "
            "each message's data line is described by GET /v1/events/schema.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        429: {
            "model": ErrorResponse,
            "description": "Too many event streams are open (in all, or for this client).",
        },
    },
)
async def events(
    request: Request,
    rt: RuntimeDep,
    kinds: Annotated[
        str | None, Query(max_length=1000, description="Comma-separated kinds; 'task_*' prefixes.")
    ] = None,
    replay: Annotated[int, Query(ge=0, le=MAX_REPLAY, description="Recent events first.")] = 0,
    keepalive_s: Annotated[float, Query(ge=0.05, le=300)] = KEEPALIVE_S,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
) -> Response:
    """Server-sent events of the event bus (see the module docstring for the format)."""
    wanted = _matcher(kinds)
    last_id: int | None = None
    if last_event_id is not None and last_event_id.strip():
        try:
            last_id = int(last_event_id)
        except ValueError:
            raise InvalidInput(
                f"Last-Event-ID must be an event id (an integer), got {last_event_id!r}",
                field="Last-Event-ID",
            ) from None
    server = rt.settings.server
    slots = _slots(request)
    key = client_key(request.scope, authenticate(request).token, set(rt.settings.auth.tokens))
    refused = slots.take(key)
    if refused is not None:
        return error_response(
            429,
            "too_many_streams",
            f"{refused} (close one, or raise [server] max_event_streams / "
            "max_event_streams_per_client)",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    return EventStreamResponse(
        _stream(rt, wanted, replay, last_id, keepalive_s),
        rt=rt,
        write_timeout_s=server.event_stream_write_timeout_s,
        on_close=functools.partial(slots.give, key),
    )


def _slots(request: Request) -> StreamSlots:
    """The app's stream counter (made on first use from ``[server]``)."""
    state = request.app.state
    slots: StreamSlots | None = getattr(state, "event_slots", None)
    if slots is None:
        server = state.runtime.settings.server
        slots = StreamSlots(server.max_event_streams, server.max_event_streams_per_client)
        state.event_slots = slots
    return slots
