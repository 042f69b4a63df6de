"""An in-process client for the real app: ``create_app(runtime=rt)`` over httpx's ASGI transport,
with the runtime started and stopped around it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import httpx

from vramancer.api.app import create_app
from vramancer.config import Settings
from vramancer.runtime import Runtime


@contextlib.asynccontextmanager
async def asgi_client(
    settings: Settings, token: str | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    """Yield ``(client, runtime)``; ``token`` is sent as a bearer token on every request."""
    async with Runtime(settings) as rt:
        app = create_app(runtime=rt)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://localhost", headers=headers
        ) as client:
            yield client, rt
