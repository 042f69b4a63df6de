"""A typed in-process event bus.

Subsystems publish one of the event classes of :mod:`vramancer.event_types` (model loaded,
block demoted, task finished ...); the bus stamps it into an :class:`Event` with a sequence
number and a timestamp. Subscribers are plain callbacks (called in the publisher's thread,
errors logged and swallowed) or asyncio queues (for the SSE stream), fed thread-safely. A
bounded ring keeps recent events.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vramancer.event_types import BY_KIND, BusEvent, EventData

log = logging.getLogger(__name__)

Callback = Callable[["Event"], None]
#: A kind to filter on: its name (``model_loaded``) or its class (``ModelLoaded``).
KindFilter = str | type[EventData] | None


@dataclass(frozen=True, slots=True)
class Event:
    """One thing that happened: ``payload`` (what), stamped with ``seq`` and ``timestamp``."""

    payload: BusEvent
    timestamp: float = 0.0
    seq: int = 0

    @property
    def kind(self) -> str:
        """The payload's kind, a short snake_case name, e.g. ``model_loaded``."""
        return self.payload.kind

    @property
    def data(self) -> dict[str, Any]:
        """The payload's fields as the wire's ``data`` object."""
        return self.payload.as_data()

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "seq": self.seq, "timestamp": self.timestamp, "data": self.data}


def kind_name(kind: KindFilter) -> str | None:
    """The name of a kind filter; a name that is no event kind raises ``ValueError``."""
    if kind is None:
        return None
    name = kind if isinstance(kind, str) else kind.kind
    if name not in BY_KIND:
        raise ValueError(f"{name!r} is not an event kind (see vramancer.event_types)")
    return name


class EventBus:
    """Publish/subscribe. ``publish`` may be called from any thread."""

    def __init__(self, history: int = 1000, clock: Callable[[], float] = time.time) -> None:
        self._callbacks: list[tuple[str | None, Callback]] = []
        self._queues: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue[Event]]] = []
        self._recent: deque[Event] = deque(maxlen=history)
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._clock = clock

    def publish(self, payload: BusEvent, /) -> Event:
        """Stamp ``payload`` (one of :data:`~vramancer.event_types.BusEvent`) and hand it to
        every subscriber; returns the stamped event."""
        if not isinstance(payload, EventData):
            raise TypeError(f"publish takes an event of vramancer.event_types, not {payload!r}")
        kind = payload.kind
        with self._lock:
            event = Event(payload, timestamp=self._clock(), seq=next(self._seq))
            self._recent.append(event)
            callbacks = list(self._callbacks)
            queues = list(self._queues)
        for wanted, callback in callbacks:
            if wanted is None or wanted == kind:
                try:
                    callback(event)
                except Exception:
                    log.exception("event callback failed for %s", kind)
        for loop, queue in queues:
            try:
                loop.call_soon_threadsafe(_offer, queue, event)
            except RuntimeError:  # loop closed
                self._drop_queue(queue)
        return event

    def subscribe(self, callback: Callback, kind: KindFilter = None) -> Callable[[], None]:
        """Call ``callback`` for every event (or only ``kind``). Returns an unsubscribe function."""
        entry = (kind_name(kind), callback)
        with self._lock:
            self._callbacks.append(entry)

        def unsubscribe() -> None:
            with self._lock:
                if entry in self._callbacks:
                    self._callbacks.remove(entry)

        return unsubscribe

    def queue(self, maxsize: int = 1000) -> asyncio.Queue[Event]:
        """An asyncio queue on the running loop that receives every event from now on."""
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=maxsize)
        with self._lock:
            self._queues.append((asyncio.get_running_loop(), queue))
        return queue

    def close_queue(self, queue: asyncio.Queue[Event]) -> None:
        self._drop_queue(queue)

    def recent(self, limit: int = 100, kind: KindFilter = None) -> list[Event]:
        name = kind_name(kind)
        with self._lock:
            events = [e for e in self._recent if name is None or e.kind == name]
        return events[-limit:]

    def _drop_queue(self, queue: asyncio.Queue[Event]) -> None:
        with self._lock:
            self._queues = [(lp, q) for lp, q in self._queues if q is not queue]


def _offer(queue: asyncio.Queue[Event], event: Event) -> None:
    if queue.full():  # a slow SSE reader loses the oldest events, never blocks publishers
        queue.get_nowait()
    queue.put_nowait(event)
