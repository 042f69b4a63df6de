"""``create_app(settings)``: the FastAPI application factory.

One router per resource under ``api/routers``. Every route but ``/healthz`` and the dashboard
page needs a caller that ``api/guard.py``'s middleware lets in from the headers alone, before
any body is read (viewer at least; routers ask for more where a call changes state).
Run it with ``vramancer serve``, or ``uvicorn --factory vramancer.api.app:create_app``.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from vramancer._version import __version__
from vramancer.api import errors, gateway_front, gateway_port
from vramancer.api.deps import require
from vramancer.api.guard import AuthMiddleware, Gate
from vramancer.api.ha_gate import HaMiddleware
from vramancer.api.ratelimit import BodyLimitMiddleware, LimitsMiddleware, TokenBuckets
from vramancer.api.routers import (
    allocations,
    apidocs,
    cluster,
    devices,
    events,
    fastpath,
    gateway,
    gateway_queues,
    gpu,
    ha,
    health,
    memory,
    models,
    profile,
    release,
    system,
    tasks,
    web,
)
from vramancer.api.schemas import ERROR_RESPONSES
from vramancer.config import Role, Settings
from vramancer.runtime import Runtime

#: Routers that need at least the viewer role (each may ask for more per route).
_PROTECTED = (
    gateway,  # first: model requests are the hot path, matched before the other routes
    system,
    devices,
    cluster,
    fastpath,
    memory,
    models,
    gpu,
    profile,
    allocations,
    tasks,
    events,
    ha,
    apidocs,
    release,
    gateway_queues,
)


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
            await gateway_port.start(app)
            yield
        finally:
            await release.stop_background(app)
            await gateway_port.stop(app)
            await gateway_front.shutdown(app)
            if owns_runtime:
                await rt.stop()

    app = FastAPI(
        title="VRAMancer",
        version=__version__,
        description="GPU and memory orchestrator for self-hosted AI workloads.",
        lifespan=lifespan,
        # ``/docs`` is served by ``routers/apidocs.py`` from files in the package (no CDN).
        docs_url=None,
        redoc_url=None,
    )
    app.state.runtime = rt
    errors.install(app)
    app.include_router(health.router, responses=ERROR_RESPONSES)
    viewer = [Depends(require(Role.VIEWER))]
    for module in _PROTECTED:
        app.include_router(module.router, dependencies=viewer, responses=ERROR_RESPONSES)
    app.include_router(web.router)
    app.include_router(ha.peer_router)
    s = rt.settings
    app.state.gate = Gate(s.auth.tokens, s.server.allowed_hosts)
    app.state.event_slots = events.StreamSlots(
        s.server.max_event_streams, s.server.max_event_streams_per_client
    )
    buckets = (
        None
        if s.disable_rate_limit
        else TokenBuckets(s.server.rate_limit_per_s, s.server.rate_limit_burst)
    )
    # The last added runs first: the rate limit, then who is calling (from the headers
    # alone), then the body size of the route; only then may a route read the body.
    app.add_middleware(HaMiddleware, runtime=rt)
    gateway_body = int(s.gateway.max_body_bytes)
    app.add_middleware(
        BodyLimitMiddleware,
        max_body=s.server.max_body,
        max_json_body=s.server.max_json_body,
        prefix_limits=(("/openai/", gateway_body), ("/ollama/", gateway_body)),
    )
    app.add_middleware(AuthMiddleware, gate=app.state.gate)
    app.add_middleware(LimitsMiddleware, buckets=buckets, tokens=frozenset(s.auth.tokens))
    return app
