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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from vramancer.api.deps import RuntimeDep
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

    def register(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Event]:
        entry = (asyncio.get_running_loop(), asyncio.Event())
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
    """One SSE message: ``id``, ``event`` and a one-line JSON ``data`` field."""
    data = json.dumps(event.as_dict(), default=str, separators=(",", ":"))
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {data}\n\n"


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
    queue = bus.queue()  # subscribe before reading the backlog so nothing falls in between
    entry = _WATCH.register()
    stop = entry[1]
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
            wait = min(RUNNING_CHECK_S, max(0.0, last_write + keepalive_s - loop.time()))
            event = await _next(queue, stop, wait)
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


async def _next(queue: asyncio.Queue[Event], stop: asyncio.Event, timeout: float) -> Event | None:
    """The next event, or None after ``timeout`` or when ``stop`` is set."""
    if not queue.empty():
        return queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait(
            {getter, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for task in (getter, stopper):
            if not task.done():
                task.cancel()
    if getter in done:
        return getter.result()
    return None


@router.get(
    "/v1/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def events(
    rt: RuntimeDep,
    kinds: Annotated[
        str | None, Query(max_length=1000, description="Comma-separated kinds; 'task_*' prefixes.")
    ] = None,
    replay: Annotated[int, Query(ge=0, le=MAX_REPLAY, description="Recent events first.")] = 0,
    keepalive_s: Annotated[float, Query(ge=0.05, le=300)] = KEEPALIVE_S,
    last_event_id: Annotated[str | None, Header(max_length=32)] = None,
) -> StreamingResponse:
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
    return StreamingResponse(
        _stream(rt, wanted, replay, last_id, keepalive_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
