"""``[gateway] port``: both gateway surfaces at their native paths (``/v1/...`` for OpenAI,
``/api/...`` for Ollama) on a port of their own, so an unmodified client is pointed at
VRAMancer (``OLLAMA_HOST=http://host:11434``, ``OPENAI_BASE_URL=http://host:11434/v1``).

A second uvicorn server in the same process and event loop, started and stopped with the
main app; it shares the main app's runtime, gateway, callers and limits (same tokens, same
Host rules, its own rate-limit buckets). ``GET /`` answers as Ollama does ("... is running").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from fastapi import Depends, FastAPI
from fastapi.responses import PlainTextResponse

from vramancer.api.deps import require
from vramancer.api.guard import AuthMiddleware
from vramancer.api.ratelimit import BodyLimitMiddleware, LimitsMiddleware, TokenBuckets
from vramancer.api.routers import gateway
from vramancer.config import Role
from vramancer.errors import ConfigError

log = logging.getLogger(__name__)

#: How long a start may take before it counts as failed.
START_TIMEOUT_S = 10.0


def create_native_app(main: FastAPI) -> FastAPI:
    """The app of ``[gateway] port`` (see the module docstring)."""
    rt = main.state.runtime
    s = rt.settings
    app = FastAPI(title="VRAMancer model gateway", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runtime = rt
    app.state.front_of = main
    app.state.gate = main.state.gate
    viewer = [Depends(require(Role.VIEWER))]
    app.include_router(gateway.build("/v1", "/api"), dependencies=viewer)

    @app.get("/", include_in_schema=False)
    async def running() -> PlainTextResponse:
        return PlainTextResponse("Ollama is running (VRAMancer model gateway)")

    buckets = (
        None
        if s.disable_rate_limit
        else TokenBuckets(s.server.rate_limit_per_s, s.server.rate_limit_burst)
    )
    body = int(s.gateway.max_body_bytes)
    app.add_middleware(
        BodyLimitMiddleware, max_body=body, max_json_body=body, prefix_limits=(("/", body),)
    )
    app.add_middleware(AuthMiddleware, gate=app.state.gate)
    app.add_middleware(LimitsMiddleware, buckets=buckets, tokens=frozenset(s.auth.tokens))
    return app


class _Server:
    """A uvicorn server that leaves the process's signal handlers to the main one."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        import uvicorn

        class Quiet(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        config = uvicorn.Config(app, host=host, port=port, lifespan="off", log_config=None)
        self.server = Quiet(config)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(), name="vramancer-gateway-port")
        async with asyncio.timeout(START_TIMEOUT_S):
            while not self.server.started:
                if self.task.done():
                    break
                await asyncio.sleep(0.02)
        if not self.server.started:
            host, port = self.server.config.host, self.server.config.port
            raise ConfigError(f"[gateway] port: cannot listen on {host}:{port}")

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self.task


async def start(main: FastAPI) -> None:
    """Serve the native paths on ``[gateway] port`` when it is set."""
    settings = main.state.runtime.settings
    if settings.gateway.port is None:
        return
    server = _Server(create_native_app(main), settings.server.host, settings.gateway.port)
    await server.start()
    main.state.gateway_port = server
    log.info("model gateway: native Ollama/OpenAI paths on port %d", settings.gateway.port)


async def stop(main: FastAPI) -> None:
    server: _Server | None = getattr(main.state, "gateway_port", None)
    if server is not None:
        main.state.gateway_port = None
        await server.stop()
