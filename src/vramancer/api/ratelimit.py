"""Per-client token-bucket rate limiting as a plain ASGI middleware (cheap on the hot path).

The client is its bearer token when that token is one of the configured ones, else its address:
a made-up token must not buy a fresh bucket (nor flood the table). Over the limit: 429 with
``Retry-After``. ``VRM_DISABLE_RATE_LIMIT=1`` turns it off. ``/healthz`` is never limited.
It also refuses bodies over ``server.max_body`` with a 413: at once when ``Content-Length`` says
so, and for chunked bodies (no length) as soon as the bytes received pass the limit.
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
#: Buckets kept at most; past this, idle (refilled) buckets are dropped, then the oldest.
MAX_CLIENTS = 100_000


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
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            if len(self._buckets) > MAX_CLIENTS:
                self._prune(now)
            return 0.0 if allowed else (1.0 - tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)

    def _prune(self, now: float) -> None:
        """Drop buckets that have refilled (forgetting them changes nothing), then, if still
        too many, the least recently used half. Never all of them: a client being limited
        keeps its (empty) bucket unless the table is full of clients more recent than it."""
        full = self.burst
        self._buckets = {
            key: (tokens, last)
            for key, (tokens, last) in self._buckets.items()
            if tokens + (now - last) * self.rate < full
        }
        if len(self._buckets) > MAX_CLIENTS // 2:
            recent = sorted(self._buckets.items(), key=lambda item: item[1][1], reverse=True)
            self._buckets = dict(recent[: MAX_CLIENTS // 2])


class BodyTooLarge(Exception):
    """Raised into the app when a chunked body passes ``max_body`` (the middleware answers)."""


class LimitsMiddleware:
    """Rate limit per client and body-size limit, in front of the whole app."""

    def __init__(
        self,
        app: ASGIApp,
        buckets: TokenBuckets | None,
        max_body: int,
        tokens: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.buckets = buckets
        self.max_body = max_body
        #: The configured bearer tokens: only these are rate-limit keys of their own.
        self.tokens = tokens

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
            wait = self.buckets.allow(_client_key(scope, headers, self.tokens))
            if wait > 0:
                retry = str(max(1, math.ceil(wait)))
                await _reply(send, 429, "rate_limited", "too many requests", {"retry-after": retry})
                return
        if length is None and scope.get("method") not in _NO_BODY:
            await self._counting(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _counting(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app on a body without a length, answering 413 once it passes the limit."""
        received = 0
        over = False
        started = False

        async def counted() -> Any:
            nonlocal received, over
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    over = True
                    raise BodyTooLarge
            return message

        async def guarded(message: dict[str, Any]) -> None:
            nonlocal started
            if over:  # whatever the app answers to the interrupted read, the client gets a 413
                if message.get("type") == "http.response.start" and not started:
                    started = True
                    await self._too_large(send)
                return
            started = started or message.get("type") == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except BodyTooLarge:
            if not started:
                await self._too_large(send)

    async def _too_large(self, send: Send) -> None:
        msg = f"request body is over the limit of {self.max_body} bytes"
        await _reply(send, 413, "payload_too_large", msg, {})


_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


def _client_key(scope: Scope, headers: dict[bytes, bytes], tokens: frozenset[str]) -> str:
    auth = headers.get(b"authorization", b"")
    if auth[:7].lower() == b"bearer ":
        token = auth[7:].strip().decode("latin-1")
        if token in tokens:
            return "t:" + token
    client = scope.get("client")
    return "a:" + (client[0] if client else "unknown")


async def _reply(send: Send, status: int, code: str, message: str, extra: dict[str, str]) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
