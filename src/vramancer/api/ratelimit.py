"""Per-client token-bucket rate limiting as a plain ASGI middleware (cheap on the hot path).

The client is its bearer token when that token is one of the configured ones, else its address:
a made-up token must not buy a fresh bucket (nor flood the table). Over the limit: 429 with
``Retry-After``. ``VRM_DISABLE_RATE_LIMIT=1`` turns it off. ``/healthz`` is never limited.

It also refuses bodies over their route's limit with a 413: at once when ``Content-Length``
says so, and for chunked bodies (no length) as soon as the bytes received pass the limit, so a
refused body costs at most the limit, never its own size. Raw block bodies (``PUT
/v1/memory/blocks/*``, :data:`RAW_BODY_ROUTES`) may be up to ``server.max_body``; every other
route (JSON bodies) up to ``server.max_json_body``. Refusals of a request whose body was not
read ask the server to close the connection, so the rest of the body is never received.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vramancer.api.guard import bearer, body_announced, match_token, reply
from vramancer.units import format_size

_EXEMPT = frozenset({"/healthz"})
#: (method, path prefix) of the routes whose body is raw bytes, limited by ``max_body``.
RAW_BODY_ROUTES = (("PUT", "/v1/memory/blocks/"), ("POST", "/v1/ha/deltas"))
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
    """Rate limit per client, in front of the whole app (refused callers count too)."""

    def __init__(
        self, app: ASGIApp, buckets: TokenBuckets | None, tokens: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.buckets = buckets
        #: The configured bearer tokens: only these are rate-limit keys of their own.
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.buckets is not None and scope["type"] == "http" and scope["path"] not in _EXEMPT:
            headers = dict(scope.get("headers") or ())
            wait = self.buckets.allow(_client_key(scope, headers, self.tokens))
            if wait > 0:
                retry = str(max(1, math.ceil(wait)))
                await reply(
                    send,
                    429,
                    "rate_limited",
                    "too many requests",
                    {"retry-after": retry},
                    close=body_announced(scope),
                )
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Body-size limits per route (behind the auth middleware: a caller without a token gets
    its 401 whatever the size it announces)."""

    def __init__(
        self,
        app: ASGIApp,
        max_body: int,
        max_json_body: int | None = None,
        prefix_limits: tuple[tuple[str, int], ...] = (),
    ) -> None:
        self.app = app
        self.max_body = max_body
        #: The limit of every route but :data:`RAW_BODY_ROUTES` (default: ``max_body``).
        self.max_json_body = max_body if max_json_body is None else max_json_body
        #: (path prefix, limit) of routes with a limit of their own (the model gateway's).
        self.prefix_limits = prefix_limits

    def limit(self, scope: Scope) -> int:
        """The largest body this route accepts."""
        method, path = scope.get("method"), scope["path"]
        for prefix, limit in self.prefix_limits:
            if path.startswith(prefix):
                return limit
        for raw_method, prefix in RAW_BODY_ROUTES:
            if method == raw_method and path.startswith(prefix):
                return self.max_body
        return self.max_json_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        limit = self.limit(scope)
        if length is not None and length.isdigit() and int(length) > limit:
            msg = (
                f"request body of {format_size(int(length))} is over the limit of "
                f"{format_size(limit)}"
            )
            await reply(send, 413, "payload_too_large", msg, close=True, max_bytes=limit)
            return
        if length is None and b"transfer-encoding" in headers:
            await self._counting(scope, receive, send, limit)
            return
        await self.app(scope, receive, send)

    async def _counting(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        """Run the app on a body without a length, answering 413 once it passes ``limit``."""
        received = 0
        over = False
        started = False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
            if message.get("type") == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLarge
            return message

        async def guarded(message: Message) -> None:
            nonlocal started
            if over:  # whatever the app answers to the interrupted read, the client gets a 413
                if message.get("type") == "http.response.start" and not started:
                    started = True
                    await _too_large(send, limit)
                return
            started = started or message.get("type") == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except BodyTooLarge:
            if not started:
                await _too_large(send, limit)


async def _too_large(send: Send, limit: int) -> None:
    msg = f"request body is over the limit of {format_size(limit)}"
    await reply(send, 413, "payload_too_large", msg, close=True, max_bytes=limit)


def _client_key(scope: Scope, headers: dict[bytes, bytes], tokens: frozenset[str]) -> str:
    raw = bearer(headers.get(b"authorization"))
    if raw is not None and tokens:
        token = match_token(raw, tokens)
        if token is not None:
            return "t:" + token
    client = scope.get("client")
    return "a:" + (client[0] if client else "unknown")


def client_key(scope: Scope, token: str | None, tokens: frozenset[str] | set[str]) -> str:
    """The rate-limit key of a caller already resolved: its token if configured, else address."""
    if token is not None and token in tokens:
        return "t:" + token
    client = scope.get("client")
    return "a:" + (client[0] if client else "unknown")
