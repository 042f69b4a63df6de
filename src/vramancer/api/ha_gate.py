"""HA replication at the edge of the API (a plain ASGI middleware, after auth and body limits).

* On a standby, every state-changing request (any method but GET, HEAD, OPTIONS) outside
  ``/v1/ha/`` is refused with 409 ``standby``, ``primary`` naming the primary's address.
* On a primary in sync mode (``VRM_HA_SYNC=1``), a state-changing request that succeeded is
  answered only once a peer holds every change made so far (a repeated submit that changed
  nothing too: its task may be one no peer has confirmed yet); when none confirms within
  ``[ha] sync_timeout_s``, the answer is 503 ``no_replica`` instead. The change may then
  exist on this node (it was made, only not confirmed elsewhere): a client retries with the
  same idempotency key, or checks.
* ``POST /v1/models/can-load`` changes nothing and is answered on a standby too.
* Model gateway requests (``/openai/``, ``/ollama/``) are refused on a standby like writes, but
  a primary in sync mode answers them without waiting for a peer.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vramancer.api.guard import body_announced, reply

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: Requests with a body that change nothing (answered on a standby too).
READ_ONLY_POSTS = frozenset({"/v1/models/can-load"})
HA_PREFIX = "/v1/ha/"
#: Model gateway requests: served by the primary only, but an answer is not a change a peer
#: must confirm first (sync mode would hold every streamed answer for a peer's confirmation).
UNSYNCED_PREFIXES = ("/openai/", "/ollama/")


class HaMiddleware:
    def __init__(self, app: ASGIApp, runtime: Any) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ha = getattr(self.runtime, "ha", None)
        if (
            ha is None
            or scope["type"] != "http"
            or scope.get("method") in READ_METHODS
            or scope["path"].startswith(HA_PREFIX)
            or scope["path"] in READ_ONLY_POSTS
        ):
            await self.app(scope, receive, send)
            return
        if not ha.is_primary:
            primary = ha.primary
            await reply(
                send,
                409,
                "standby",
                f"this node is an HA standby: send writes to the primary ({primary or 'unknown'})",
                close=body_announced(scope),
                primary=primary,
            )
            return
        if not ha.sync or scope["path"].startswith(UNSYNCED_PREFIXES):
            await self.app(scope, receive, send)
            return
        await self._synced(ha, scope, receive, send)

    async def _synced(self, ha: Any, scope: Scope, receive: Receive, send: Send) -> None:
        refused = False

        async def hold(message: Message) -> None:
            nonlocal refused
            if refused:
                return
            start = message["type"] == "http.response.start"
            if start and message["status"] < 400 and not await ha.confirm():
                refused = True
                await reply(
                    send,
                    503,
                    "no_replica",
                    "no HA peer confirmed this change within [ha] sync_timeout_s; it may "
                    "exist on this node, unconfirmed",
                )
                return
            await send(message)

        await self.app(scope, receive, hold)
