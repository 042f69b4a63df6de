"""One model request through the gateway: read and checked, its model held resident by the
gateway (``vramancer.gateway``) while it runs, sent to the model's server and relayed back
(streamed or whole), errors in each surface's own shape and every request counted.
The surfaces (``routers/gateway.py``) say what to send and how to convert the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from vramancer.api import gateway_proxy as gp
from vramancer.api import upstream_http
from vramancer.errors import InsufficientMemory, VramancerError
from vramancer.gateway.service import Gateway
from vramancer.models.entry import ModelHandle
from vramancer.models.types import BackendKind, ModelStatus
from vramancer.runtime import Runtime

#: Upstream timeouts: connecting, and the longest pause between two chunks of an answer.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0
#: After a failed answer, how often and how long to look whether a model server died.
DEATH_CHECKS = 40
DEATH_CHECK_S = 0.05
#: The ``model`` label of requests that named no managed model.
UNKNOWN = "unknown"

S = TypeVar("S", bound=BaseModel)


class Refused(Exception):
    """A gateway request refused: status, code, message, headers and extra fields."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}
        self.details = details


def refusal(exc: VramancerError) -> Refused:
    """A library error as the gateway answers it."""
    details = {k: v for k, v in exc.details.items() if _plain(v)}
    headers = {}
    retry = details.pop("retry_after_s", None)
    if retry is not None:
        headers["Retry-After"] = str(retry)
    status = exc.http_status
    if isinstance(exc, InsufficientMemory):
        status = 507  # the gateway says "no room for this model" one way: 507
    return Refused(status, exc.code, exc.message, headers, **details)


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list)


# -- surfaces ------------------------------------------------------------------------------------


def openai_error(r: Refused) -> JSONResponse:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
    }.get(r.status, "server_error")
    error = {"message": r.message, "type": kind, "param": None, "code": r.code, **r.details}
    return JSONResponse({"error": error}, status_code=r.status, headers=r.headers)


def ollama_error(r: Refused) -> JSONResponse:
    return JSONResponse(
        {"error": r.message, "code": r.code, **r.details}, status_code=r.status, headers=r.headers
    )


ErrorShape = Callable[[Refused], JSONResponse]


# -- the front: the gateway, one HTTP client, metrics --------------------------------------------


@dataclass
class Front:
    runtime: Runtime
    gateway: Gateway
    client: httpx.AsyncClient
    #: Whole (non-streamed) answers from ``http://`` servers (lighter than ``client``).
    whole: upstream_http.WholeClient = field(default_factory=upstream_http.WholeClient)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def max_body(self) -> int:
        return int(self.runtime.settings.gateway.max_body_bytes)

    def resolve(self, asked: str) -> str:
        """The managed model ``asked`` names (``llama3`` is ``llama3:latest``); 404 if none."""
        specs = self.runtime.models.specs
        if asked in specs:
            return asked
        full = _full(asked)
        for name in specs:
            if _full(name) == full:
                return name
        raise Refused(404, "model_not_found", f"model '{asked}' not found", model=asked)

    def status(self, name: str) -> ModelStatus:
        return self.runtime.models.status(name)

    def check_server(self, name: str) -> None:
        """After a failed answer: a model-server process that died is unloaded (in the
        background, once its holds are gone), so the next request starts it again."""
        if self.runtime.models.status(name).backend is not BackendKind.PROCESS:
            return
        task = asyncio.create_task(self._unload_if_dead(name))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _unload_if_dead(self, name: str) -> None:
        models = self.runtime.models
        for _ in range(DEATH_CHECKS):
            proc = models.handle(name)
            if proc is None:
                return
            if getattr(proc, "returncode", None) is not None:
                with contextlib.suppress(VramancerError):
                    await models.ensure_unloaded(name)
                return
            await asyncio.sleep(DEATH_CHECK_S)

    def count(self, model: str, outcome: gp.Outcome) -> None:
        metrics = self.gateway.metrics
        code = 499 if outcome.client_left and outcome.code == 200 else outcome.code
        metrics.requests.labels(model=model, code=str(code)).inc()
        first = outcome.first_byte if outcome.first_byte is not None else time.monotonic()
        metrics.ttfb.observe(max(0.0, first - outcome.started))


def _full(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


async def front(app: FastAPI) -> Front:
    """The app's gateway front, built (and its executor started) at the first request. The
    app of ``[gateway] port`` uses its main app's (``state.front_of``)."""
    app = getattr(app.state, "front_of", None) or app
    existing: Front | None = getattr(app.state, "gateway_front", None)
    if existing is not None:
        return existing
    rt: Runtime = app.state.runtime
    gateway = Gateway(rt.settings.gateway, rt.models, metrics=rt.metrics, clock=rt.clock)
    await gateway.start()
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    whole = upstream_http.WholeClient(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
    built = Front(rt, gateway, httpx.AsyncClient(timeout=timeout, limits=limits), whole)
    app.state.gateway_front = built
    return built


async def shutdown(app: FastAPI) -> None:
    """Stop the gateway's executor and close its HTTP client (the app's lifespan end)."""
    built: Front | None = getattr(app.state, "gateway_front", None)
    if built is None:
        return
    app.state.gateway_front = None
    await built.gateway.stop()
    await built.client.aclose()
    await built.whole.aclose()


# -- reading a request ---------------------------------------------------------------------------


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise Refused(413, "payload_too_large", f"the body is over {limit} bytes", max_bytes=limit)
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise Refused(413, "payload_too_large", f"the body is over {limit} bytes")
    try:
        data = json.loads(raw or b"null")
    except ValueError:
        raise Refused(400, "invalid_json", "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise Refused(400, "invalid_json", "the body must be a JSON object")
    return data


def parse(schema: type[S], data: dict[str, Any]) -> S:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise Refused(422, "invalid_request", problems) from None


Action = Callable[[Front, str, Any, dict[str, Any], gp.Outcome], Awaitable[Response]]


async def serve(
    request: Request, schema: type[BaseModel], errors: ErrorShape, action: Action
) -> Response:
    """Read, check and answer one model request; count it under its model and status."""
    outcome = gp.Outcome(time.monotonic())
    model = UNKNOWN
    built = await front(request.app)
    try:
        data = await read_json(request, built.max_body)
        body = parse(schema, data)
        model = built.resolve(body.model)  # type: ignore[attr-defined]
        response = await action(built, model, body, data, outcome)
    except Refused as refused:
        response = errors(refused)
    except VramancerError as exc:
        response = errors(refusal(exc))
    if isinstance(response, gp.HeldStream):
        previous = response.on_close

        async def counted() -> None:
            await previous()
            built.count(model, outcome)

        response.on_close = counted
        return response
    outcome.code = response.status_code
    built.count(model, outcome)
    return response


# -- talking to a model's server -----------------------------------------------------------------


def endpoint(handle: ModelHandle) -> str:
    if handle.endpoint is None:
        raise Refused(502, "backend_failed", f"{handle.name} has no server address")
    return handle.endpoint.rstrip("/")


Relay = Callable[[httpx.Response, gp.Outcome], Any]


Target = Callable[[ModelHandle], tuple[str, dict[str, Any]]]


async def forward(
    built: Front,
    name: str,
    target: Target,
    outcome: gp.Outcome,
    *,
    stream: Relay | None,
    media_type: str,
    convert: Callable[[Any], Any] | None = None,
) -> Response:
    """Hold ``name``, send the request ``target`` makes for its server (URL, JSON body), and
    relay the answer (``stream``) or return it whole (``convert`` turns a 2xx JSON answer
    into the surface's)."""
    stack = contextlib.AsyncExitStack()
    handle = await stack.enter_async_context(built.gateway.lease(name))
    handed_over = False
    try:
        url, payload = target(handle)
        if stream is None and upstream_http.handles(url):
            return await _whole_answer(built, name, url, payload, convert)
        request = built.client.build_request("POST", url, json=payload)
        try:
            upstream = await built.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            await stack.aclose()
            handed_over = True  # closed
            built.check_server(name)
            raise Refused(
                502, "backend_failed", f"the server of {name} did not answer: {type(exc).__name__}"
            ) from None
        if upstream.status_code >= 400 or stream is None:
            try:
                content = await upstream.aread()
            except httpx.HTTPError as exc:
                raise Refused(
                    502, "backend_failed", f"the server of {name} broke off: {type(exc).__name__}"
                ) from None
            finally:
                await upstream.aclose()
            return _whole(upstream.status_code, content, convert)

        async def close() -> None:
            await upstream.aclose()
            await stack.aclose()
            if outcome.code >= 500:
                built.check_server(name)

        handed_over = True
        return gp.HeldStream(
            stream(upstream, outcome), media_type=media_type, outcome=outcome, on_close=close
        )
    finally:
        if not handed_over:
            await stack.aclose()


async def _whole_answer(
    built: Front, name: str, url: str, payload: Any, convert: Callable[[Any], Any] | None
) -> Response:
    """Send one request and return its whole answer (the model is held by the caller)."""
    try:
        answer = await built.whole.post_json(url, json.dumps(payload).encode())
    except upstream_http.UpstreamError as exc:
        if exc.answered:
            raise Refused(502, "backend_failed", f"the server of {name} broke off: {exc}") from None
        built.check_server(name)
        raise Refused(
            502, "backend_failed", f"the server of {name} did not answer: {exc}"
        ) from None
    return _whole(answer.status, answer.content, convert)


def _whole(status: int, content: bytes, convert: Callable[[Any], Any] | None) -> Response:
    if status >= 400 or convert is None:
        return Response(content, status_code=status, media_type="application/json")
    try:
        data = json.loads(content)
    except ValueError:
        raise Refused(502, "backend_failed", "the model's server answered something else") from None
    return JSONResponse(convert(data), status_code=status)


def renamed(model: str) -> Callable[[Any], Any]:
    def convert(data: Any) -> Any:
        if isinstance(data, dict) and "model" in data:
            data["model"] = model
        return data

    return convert


async def encode(built: Front, name: str, texts: list[str]) -> list[list[float]]:
    """Embeddings of ``texts`` by an in-process model (``model.encode``), holding it."""
    async with built.gateway.lease(name) as handle:
        obj = handle.obj
        if obj is None or not callable(getattr(obj, "encode", None)):
            raise Refused(400, "not_an_embedding_model", f"{name} has no encode(): not embeddings")
        vectors = await asyncio.to_thread(obj.encode, texts, convert_to_numpy=True)
        return [[float(x) for x in row] for row in vectors.tolist()]


def texts_of(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def kind_of(built: Front, name: str) -> BackendKind:
    return built.status(name).backend
