"""The uvicorn server of ``vramancer serve`` (imported only when the daemon starts: uvicorn is
not needed by the other commands)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from vramancer.cli import daemon_record
from vramancer.config import Settings
from vramancer.errors import VramancerError

log = logging.getLogger("vramancer.serve")


def base_url(host: str, port: int) -> str:
    """``http://host:port`` for people to open: a wildcard address becomes the loopback one."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class Server(uvicorn.Server):
    """uvicorn's server, which once it listens says where (dashboard, API docs, metrics) and
    records its pid and address in the data directory; the record goes as it stops."""

    def __init__(self, config: uvicorn.Config, settings: Settings) -> None:
        super().__init__(config)
        self.settings = settings

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started or not self.servers or not self.servers[0].sockets:
            return
        port = int(self.servers[0].sockets[0].getsockname()[1])
        url = base_url(self.settings.server.host, port)
        metrics = (
            base_url(self.settings.server.host, self.settings.metrics_port) + "/metrics"
            if self.settings.metrics_port
            else url + "/metrics"
        )
        log.info("dashboard: %s/", url)
        log.info("API docs: %s/docs", url)
        log.info("metrics: %s", metrics)
        record = daemon_record.DaemonRecord(os.getpid(), url, time.time())
        try:
            daemon_record.write(self.settings.data_dir, record)
        except OSError as exc:
            log.warning("cannot record this daemon in %s: %s", self.settings.data_dir, exc)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Before the data directory's lock goes: a daemon started next writes its own record.
        daemon_record.remove(self.settings.data_dir, os.getpid())
        await super().shutdown(sockets)


class StartupErrors:
    """The app, whose start-up failing on a :class:`VramancerError` (a data directory another
    daemon took meanwhile, a broker that does not answer ...) is kept in :attr:`error` for one
    line on stderr instead of a traceback in the log. Other failures keep their traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.error: VramancerError | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_quietly(message: Message) -> None:
            failed = sys.exc_info()[1]  # sent from the except block of the failed start-up
            if message["type"] == "lifespan.startup.failed" and isinstance(failed, VramancerError):
                self.error = failed
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, send_quietly)


class _CoalescedWrites:
    """A transport whose writes made within one step of the event loop leave in one send: the
    status line and headers of an answer go with its body, as one TCP segment when it fits,
    instead of two sends (and two reads for the client)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not data:
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending and not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class CoalescingH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, writing through :class:`_CoalescedWrites`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(_CoalescedWrites(transport))  # type: ignore[arg-type]
