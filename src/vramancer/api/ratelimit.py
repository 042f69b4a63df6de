"""Per-client token-bucket rate limiting as a plain ASGI middleware (cheap on the hot path).

The client is its bearer token when it sends one, else its address. Over the limit: 429 with
``Retry-After``. ``VRM_DISABLE_RATE_LIMIT=1`` turns it off. ``/healthz`` is never limited.
It also refuses bodies whose ``Content-Length`` is over ``server.max_body`` with a 413.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]
ASGIApp = Callable[[Scope, Receive, Send], Any]

_EXEMPT = frozenset({"/healthz"})
_MAX_CLIENTS = 100_000


class TokenBuckets:
    """``allow(key)`` returns 0.0 when allowed, else the seconds until a token is free."""

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> float:
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            if len(self._buckets) > _MAX_CLIENTS:
                self._buckets.clear()
            return (1.0 - tokens) / self.rate


class LimitsMiddleware:
    def __init__(self, app: ASGIApp, buckets: TokenBuckets | None, max_body: int) -> None:
        self.app = app
        self.buckets = buckets
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _EXEMPT:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            msg = f"request body of {int(length)} bytes is over the limit of {self.max_body}"
            await _reply(send, 413, "payload_too_large", msg, {})
            return
        if self.buckets is not None:
            wait = self.buckets.allow(_client_key(scope, headers))
            if wait > 0:
                retry = str(max(1, math.ceil(wait)))
                await _reply(send, 429, "rate_limited", "too many requests", {"retry-after": retry})
                return
        await self.app(scope, receive, send)


def _client_key(scope: Scope, headers: dict[bytes, bytes]) -> str:
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        return "t:" + auth[7:].strip().decode("latin-1")
    client = scope.get("client")
    return "a:" + (client[0] if client else "unknown")


async def _reply(send: Send, status: int, code: str, message: str, extra: dict[str, str]) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
