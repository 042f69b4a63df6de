"""A ``JetStreamQueue`` on a real ``nats-server`` for the queue tests: its own connection, and
the JetStream context given the way the pool's connection gives it (``NatsLink.js``: the
current context, or ``NatsDown``, a ``BackendUnavailable``, while the link is down)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

from vramancer.errors import BackendUnavailable
from vramancer.pool.jsqueue import JetStreamQueue


class NatsDown(BackendUnavailable):
    """What the pool's connection raises while NATS cannot be reached."""

    code = "nats_unavailable"


class NatsLink:
    """One client connection that keeps reconnecting (as the pool's own does)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.nc: Client | None = None

    async def connect(self) -> None:
        self.nc = await nats.connect(
            self.url,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.1,
            connect_timeout=2,
            allow_reconnect=True,
        )

    def js(self) -> JetStreamContext:
        if self.nc is None or not self.nc.is_connected:
            raise NatsDown("NATS is not connected")
        return self.nc.jetstream(timeout=2.0)

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


@dataclass
class Orchestrator:
    """One orchestrator's queue and the connection under it."""

    queue: JetStreamQueue
    link: NatsLink


@asynccontextmanager
async def orchestrator(url: str, **kwargs: Any) -> AsyncIterator[Orchestrator]:
    """An open queue on its own connection to ``url``; closed (and disconnected) after."""
    link = NatsLink(url)
    await link.connect()
    queue = JetStreamQueue(link.js, **kwargs)
    try:
        await queue.open()
        yield Orchestrator(queue, link)
    finally:
        await queue.close()
        await link.close()


@asynccontextmanager
async def jetstream_queue(url: str, **kwargs: Any) -> AsyncIterator[JetStreamQueue]:
    """``orchestrator``'s queue alone."""
    async with orchestrator(url, **kwargs) as o:
        yield o.queue
