"""The model gateway's HTTP surfaces: OpenAI under ``/openai/v1`` and Ollama under
``/ollama/api`` (and at their native paths ``/v1/...``, ``/api/...`` on ``[gateway] port``).

A request names a managed model (``[[models]]``); the gateway (``vramancer.gateway``) makes
it resident, holding it while the request runs, and the request goes to the model's backend:

* ``backend = "ollama"``: proxied to Ollama (its native API for the Ollama surface, with the
  model's ``keep_alive``; its OpenAI-compatible ``/v1`` routes for the OpenAI surface);
* ``backend = "process"``: an OpenAI-compatible server VRAMancer starts on demand; the
  Ollama surface is translated to and from its OpenAI API;
* ``backend = "torch"``: embeddings computed in this process (``model.encode``, a
  sentence-transformers model such as all-MiniLM-L6-v2).

Streams pass through chunk by chunk (NDJSON for Ollama, server-sent events for OpenAI); a
client that goes away cancels the upstream request and releases the model. Errors come in
each surface's own shape: OpenAI's ``{"error": {"message", "type", "param", "code"}}``,
Ollama's ``{"error": "message"}`` (with extra fields where there is more to say: a model
that cannot fit, 507, names ``needed_bytes``, ``free_bytes`` and ``unloadable``). Unknown
model 404; malformed JSON 400; a body of the wrong shape 422; queue full 429 and queue
timeout 503, both with ``Retry-After``. Nothing here logs a prompt or an answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError

from vramancer._version import __version__
from vramancer.api import gateway_proxy as gp
from vramancer.api import gateway_schemas as gs
from vramancer.api import upstream_http
from vramancer.errors import InsufficientMemory, VramancerError
from vramancer.gateway.service import Gateway
from vramancer.models.entry import ModelHandle
from vramancer.models.types import BackendKind, ModelState, ModelStatus
from vramancer.runtime import Runtime

#: The Ollama API version the Ollama surface follows (clients such as Open WebUI check it).
OLLAMA_API_VERSION = "0.6.5"
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


# -- OpenAI ---------------------------------------------------------------------------------------


def _openai_text(path: str) -> Action:
    async def action(
        built: Front, name: str, body: Any, data: dict[str, Any], outcome: gp.Outcome
    ) -> Response:
        if kind_of(built, name) is BackendKind.TORCH:
            raise Refused(400, "unsupported", f"{name} is an in-process model: embeddings only")
        asked = body.model

        def target(handle: ModelHandle) -> tuple[str, dict[str, Any]]:
            return endpoint(handle) + path, {**data, "model": handle.backend_model or name}

        def relay(up: httpx.Response, out: gp.Outcome) -> Any:
            return gp.relay_sse(up, name, out, rename=asked)

        return await forward(
            built,
            name,
            target,
            outcome,
            stream=relay if body.stream else None,
            media_type=gp.SSE,
            convert=renamed(asked),
        )

    return action


async def _openai_embeddings(
    built: Front, name: str, body: Any, data: dict[str, Any], outcome: gp.Outcome
) -> Response:
    texts = texts_of(body.input)
    if kind_of(built, name) is not BackendKind.TORCH:

        def target(handle: ModelHandle) -> tuple[str, dict[str, Any]]:
            body_out = {**data, "model": handle.backend_model or name}
            return endpoint(handle) + "/v1/embeddings", body_out

        return await forward(
            built,
            name,
            target,
            outcome,
            stream=None,
            media_type="application/json",
            convert=renamed(body.model),
        )
    vectors = await encode(built, name, texts)
    items = []
    for index, vector in enumerate(vectors):
        value: list[float] | str = vector
        if body.encoding_format == "base64":
            value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        items.append(gs.OpenAIEmbedding(index=index, embedding=value))
    used = sum(len(t.split()) for t in texts)
    answer = gs.OpenAIEmbeddingList(
        data=items, model=body.model, usage={"prompt_tokens": used, "total_tokens": used}
    )
    return JSONResponse(answer.model_dump())


# -- Ollama ---------------------------------------------------------------------------------------


def _loaded_reply(model: str, chat: bool) -> JSONResponse:
    part = json.loads(gp.ollama_part(model, "", chat, True, "load"))
    return JSONResponse(part)


def _ollama_text(chat: bool) -> Action:
    async def action(
        built: Front, name: str, body: Any, data: dict[str, Any], outcome: gp.Outcome
    ) -> Response:
        kind = kind_of(built, name)
        if kind is BackendKind.TORCH:
            raise Refused(400, "unsupported", f"{name} is an in-process model: embeddings only")
        asked = body.model
        if (chat and not body.messages) or (not chat and not body.prompt):
            async with built.gateway.lease(name):
                return _loaded_reply(asked, chat)  # Ollama's "load the model" request
        if kind is BackendKind.OLLAMA:
            path = "/api/chat" if chat else "/api/generate"

            def native(handle: ModelHandle) -> tuple[str, dict[str, Any]]:
                model = handle.backend_model or name
                return endpoint(handle) + path, {
                    **data,
                    "model": model,
                    "keep_alive": handle.keep_alive,
                }

            def relay(up: httpx.Response, out: gp.Outcome) -> Any:
                return gp.relay_ndjson(up, name, out, rename=asked)

            return await forward(
                built,
                name,
                native,
                outcome,
                stream=relay if body.stream else None,
                media_type=gp.NDJSON,
                convert=renamed(asked),
            )
        path = "/v1/chat/completions" if chat else "/v1/completions"

        def translated(handle: ModelHandle) -> tuple[str, dict[str, Any]]:
            return endpoint(handle) + path, gp.openai_request(
                data, handle.backend_model or name, chat
            )

        def translate(up: httpx.Response, out: gp.Outcome) -> Any:
            return gp.sse_as_ndjson(up, asked, chat, out)

        return await forward(
            built,
            name,
            translated,
            outcome,
            stream=translate if body.stream else None,
            media_type=gp.NDJSON,
            convert=lambda answer: gp.ollama_answer(answer, asked, chat),
        )

    return action


async def _ollama_embed(
    built: Front, name: str, body: Any, data: dict[str, Any], outcome: gp.Outcome
) -> Response:
    texts = texts_of(body.input)
    kind = kind_of(built, name)
    started = time.perf_counter_ns()
    if kind is BackendKind.TORCH:
        vectors = await encode(built, name, texts)
        answer = gs.OllamaEmbedResponse(
            model=body.model,
            embeddings=vectors,
            total_duration=time.perf_counter_ns() - started,
            load_duration=0,
            prompt_eval_count=sum(len(t.split()) for t in texts),
        )
        return JSONResponse(answer.model_dump())
    if kind is BackendKind.OLLAMA:

        def native(handle: ModelHandle) -> tuple[str, dict[str, Any]]:
            model = handle.backend_model or name
            return endpoint(handle) + "/api/embed", {
                **data,
                "model": model,
                "keep_alive": handle.keep_alive,
            }

        return await forward(
            built,
            name,
            native,
            outcome,
            stream=None,
            media_type="application/json",
            convert=renamed(body.model),
        )

    def convert(answer: Any) -> Any:
        rows = [d.get("embedding") for d in answer.get("data", [])]
        return {
            "model": body.model,
            "embeddings": rows,
            "total_duration": time.perf_counter_ns() - started,
            "load_duration": 0,
            "prompt_eval_count": (answer.get("usage") or {}).get("prompt_tokens", 0),
        }

    def target(handle: ModelHandle) -> tuple[str, dict[str, Any]]:
        model = handle.backend_model or name
        return endpoint(handle) + "/v1/embeddings", {
            "model": model,
            "input": texts,
            "encoding_format": "float",
        }

    return await forward(
        built,
        name,
        target,
        outcome,
        stream=None,
        media_type="application/json",
        convert=convert,
    )


def _details(status: ModelStatus) -> gs.OllamaDetails:
    family = status.backend.value
    return gs.OllamaDetails(format=family, family=family, families=[family])


def _digest(name: str) -> str:
    import hashlib

    return hashlib.sha256(name.encode()).hexdigest()


# -- routes ---------------------------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    """OpenAI chat completion (``"stream": true``: server-sent events)."""
    action = _openai_text("/v1/chat/completions")
    return await serve(request, gs.ChatCompletionRequest, openai_error, action)


async def completions(request: Request) -> Response:
    """OpenAI (legacy) text completion."""
    action = _openai_text("/v1/completions")
    return await serve(request, gs.CompletionRequest, openai_error, action)


async def embeddings(request: Request) -> Response:
    """OpenAI embeddings (``encoding_format``: ``float`` or ``base64``)."""
    return await serve(request, gs.EmbeddingRequest, openai_error, _openai_embeddings)


async def openai_models(request: Request) -> gs.OpenAIModelList:
    """Every managed model, as OpenAI lists models."""
    built = await front(request.app)
    return gs.OpenAIModelList(data=[gs.OpenAIModel(id=n) for n in built.runtime.models.specs])


async def generate(request: Request) -> Response:
    """Ollama generate (streamed NDJSON unless ``"stream": false``; no prompt: load)."""
    return await serve(request, gs.GenerateRequest, ollama_error, _ollama_text(False))


async def chat(request: Request) -> Response:
    """Ollama chat (streamed NDJSON unless ``"stream": false``; no messages: load)."""
    return await serve(request, gs.ChatRequest, ollama_error, _ollama_text(True))


async def embed(request: Request) -> Response:
    """Ollama embeddings (``input``: a string or a list of strings)."""
    return await serve(request, gs.EmbedRequest, ollama_error, _ollama_embed)


async def tags(request: Request) -> gs.OllamaTags:
    """Every managed model, as Ollama lists pulled models."""
    built = await front(request.app)
    return gs.OllamaTags(
        models=[
            gs.OllamaTag(
                name=s.name,
                model=s.name,
                modified_at="1970-01-01T00:00:00Z",
                size=s.vram_bytes,
                digest=_digest(s.name),
                details=_details(s),
            )
            for s in built.runtime.models.list_models()
        ]
    )


async def ps(request: Request) -> gs.OllamaPs:
    """The resident models, as Ollama lists running ones."""
    built = await front(request.app)
    return gs.OllamaPs(
        models=[
            gs.OllamaRunning(
                name=s.name,
                model=s.name,
                size=s.vram_bytes,
                digest=_digest(s.name),
                details=_details(s),
                expires_at="2318-01-01T00:00:00Z",
                size_vram=s.used_vram_bytes,
            )
            for s in built.runtime.models.list_models()
            if s.state is ModelState.LOADED
        ]
    )


async def version() -> gs.OllamaVersion:
    """The Ollama API version this surface follows, and VRAMancer's."""
    return gs.OllamaVersion(version=OLLAMA_API_VERSION, vramancer=__version__)


async def show(request: Request) -> Response:
    """A model's details (Ollama's own for an Ollama model)."""
    built = await front(request.app)
    try:
        body = parse(gs.ShowRequest, await read_json(request, built.max_body))
        name = built.resolve(body.model or body.name or "")
    except Refused as refused:
        return ollama_error(refused)
    status = built.status(name)
    if status.backend is BackendKind.OLLAMA:
        url = built.runtime.settings.ollama.endpoint.rstrip("/") + "/api/show"
        try:
            upstream = await built.client.post(url, json={"model": name})
        except httpx.HTTPError as exc:
            return ollama_error(Refused(502, "backend_failed", f"Ollama: {type(exc).__name__}"))
        return Response(upstream.content, upstream.status_code, media_type="application/json")
    capabilities = ["embedding"] if status.backend is BackendKind.TORCH else ["completion"]
    answer = gs.OllamaShow(
        modelfile="",
        parameters="",
        template="",
        details=_details(status),
        model_info={"vramancer.backend": status.backend.value},
        capabilities=capabilities,
    )
    return JSONResponse(answer.model_dump())


def build(openai_prefix: str, ollama_prefix: str) -> APIRouter:
    """Both surfaces, under the given prefixes (``/openai/v1`` and ``/ollama/api`` on the API
    port; ``/v1`` and ``/api`` on ``[gateway] port``)."""
    router = APIRouter(tags=["gateway"])
    oa, ol = openai_prefix, ollama_prefix

    def errors(path: str) -> dict[int | str, dict[str, Any]]:
        if not path.startswith(ol):
            return {}  # VRAMancer's error object, declared for every protected router
        shape = {"model": gs.OllamaErrorResponse, "description": "Ollama's error shape."}
        return {"4XX": shape, "5XX": shape}

    def post(path: str, endpoint: Callable[..., Any], model: type[BaseModel], media: str) -> None:
        content: dict[str, Any] = {media: {}} if media else {}
        router.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            response_model=None,
            responses={200: {"model": model, "content": content}, **errors(path)},
        )

    def get(path: str, endpoint: Callable[..., Any]) -> None:
        router.add_api_route(path, endpoint, methods=["GET"], responses=errors(path))

    post(f"{oa}/chat/completions", chat_completions, gs.ChatCompletion, gp.SSE)
    post(f"{oa}/completions", completions, gs.Completion, gp.SSE)
    post(f"{oa}/embeddings", embeddings, gs.OpenAIEmbeddingList, "")
    get(f"{oa}/models", openai_models)
    post(f"{ol}/generate", generate, gs.OllamaAnswer, gp.NDJSON)
    post(f"{ol}/chat", chat, gs.OllamaAnswer, gp.NDJSON)
    post(f"{ol}/embed", embed, gs.OllamaEmbedResponse, "")
    get(f"{ol}/tags", tags)
    get(f"{ol}/ps", ps)
    get(f"{ol}/version", version)
    post(f"{ol}/show", show, gs.OllamaShow, "")
    return router


#: The surfaces on the API port.
router = build("/openai/v1", "/ollama/api")
