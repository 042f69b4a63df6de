"""``create_app(settings)``: the FastAPI application factory.

One router per resource under ``api/routers``. Every route but ``/healthz`` goes through the
auth dependency (viewer at least; routers ask for more where a call changes state).
Run it with ``vramancer serve``, or ``uvicorn --factory vramancer.api.app:create_app``.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from vramancer._version import __version__
from vramancer.api import errors
from vramancer.api.deps import require
from vramancer.api.ratelimit import LimitsMiddleware, TokenBuckets
from vramancer.api.routers import (
    allocations,
    devices,
    events,
    gpu,
    health,
    memory,
    models,
    profile,
    system,
    tasks,
    web,
)
from vramancer.config import Role, Settings
from vramancer.runtime import Runtime

#: Routers that need at least the viewer role (each may ask for more per route).
_PROTECTED = (system, devices, memory, models, gpu, profile, allocations, tasks, events)


def create_app(settings: Settings | None = None, *, runtime: Runtime | None = None) -> FastAPI:
    """Build the app. With ``runtime`` given, the caller owns its lifecycle; else the app does."""
    owns_runtime = runtime is None
    rt = runtime if runtime is not None else Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if owns_runtime:
            await rt.start()
            # Move everything built at start-up (torch, pydantic, FastAPI ...) out of the
            # collector's reach: full collections then scan only request garbage, which keeps
            # 100+ ms pauses out of the request latency tail.
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            if owns_runtime:
                await rt.stop()

    app = FastAPI(
        title="VRAMancer",
        version=__version__,
        description="GPU and memory orchestrator for self-hosted AI workloads.",
        lifespan=lifespan,
    )
    app.state.runtime = rt
    errors.install(app)
    app.include_router(health.router)
    viewer = [Depends(require(Role.VIEWER))]
    for module in _PROTECTED:
        app.include_router(module.router, dependencies=viewer)
    app.include_router(web.router)
    s = rt.settings
    buckets = (
        None
        if s.disable_rate_limit
        else TokenBuckets(s.server.rate_limit_per_s, s.server.rate_limit_burst)
    )
    app.add_middleware(
        LimitsMiddleware,
        buckets=buckets,
        max_body=s.server.max_body,
        tokens=frozenset(s.auth.tokens),
    )
    return app
