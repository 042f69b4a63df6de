"""Shared pieces of the pool's tests: settings with short waits, a connection factory that
stops what it started, and ``eventually`` for what happens in the background."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.natsserver import NatsServer
from vramancer.pool.connection import PoolConnection
from vramancer.pool.settings import NatsSettings


def pool_settings(url: str, **overrides: Any) -> NatsSettings:
    """``[nats]`` for ``url`` with waits short enough for tests."""
    values: dict[str, Any] = {"url": url, "reconnect_wait_s": 0.1, "connect_timeout_s": 1.0}
    return NatsSettings(**(values | overrides))


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0, what: str = ""
) -> None:
    """Wait until ``check()`` (plain or awaited) holds; fail naming ``what`` after ``timeout``
    seconds."""
    deadline = time.monotonic() + timeout
    while True:
        held = check()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what or check}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def connect(nats_server: NatsServer) -> AsyncIterator[Callable[..., Any]]:
    """``await connect(name="a", **settings)``: a started connection to the test server (not
    waited for); every one is stopped at the end of the test."""
    started: list[PoolConnection] = []

    async def make(name: str = "test", **overrides: Any) -> PoolConnection:
        conn = PoolConnection(pool_settings(nats_server.url, **overrides), name=name)
        started.append(conn)
        await conn.start()
        return conn

    yield make
    for conn in started:
        await conn.stop()
