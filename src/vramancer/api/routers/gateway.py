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

This module says, per surface and backend, what to send and how to convert the answer;
``api/gateway_front.py`` reads a request, holds its model, forwards it and counts it.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from collections.abc import Callable
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from vramancer._version import __version__
from vramancer.api import gateway_proxy as gp
from vramancer.api import gateway_schemas as gs
from vramancer.api.gateway_front import (
    Action,
    Front,
    Refused,
    encode,
    endpoint,
    forward,
    front,
    kind_of,
    ollama_error,
    openai_error,
    parse,
    read_json,
    renamed,
    serve,
    texts_of,
)
from vramancer.models.entry import ModelHandle
from vramancer.models.types import BackendKind, ModelState, ModelStatus

#: The Ollama API version the Ollama surface follows (clients such as Open WebUI check it).
OLLAMA_API_VERSION = "0.6.5"


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
