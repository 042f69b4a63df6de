"""Streaming plumbing of the model gateway: relaying a model server's stream chunk by chunk,
and translating between the Ollama and OpenAI shapes.

* :class:`HeldStream` sends a stream while it listens for the client going away; whichever
  way the stream ends (done, the client left, the backend died) its ``on_close`` runs: the
  upstream response is closed (which cancels the request upstream) and the model's hold is
  released.
* The relays pass a server's answer on as it comes (one NDJSON line or one server-sent event
  at a time). A stream that breaks off, or ends without its last part (Ollama's ``"done":
  true``, OpenAI's ``data: [DONE]``), ends with an error in the surface's own shape: a last
  line ``{"error": "..."}`` (what Ollama sends when it fails mid-stream) or an event ``data:
  {"error": {...}}`` (what the OpenAI clients raise as an ``APIError``).
* Nothing here logs a prompt or an answer.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


@dataclass
class Outcome:
    """How a gateway answer went: the status it counts under, when its first byte left."""

    started: float
    code: int = 200
    first_byte: float | None = None
    #: Set by :class:`HeldStream` when the client went away first.
    client_left: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def mark_first_byte(self) -> None:
        if self.first_byte is None:
            self.first_byte = time.monotonic()


class HeldStream(Response):
    """A streamed answer that runs ``on_close`` however it ends (see the module docstring)."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        *,
        media_type: str,
        outcome: Outcome,
        on_close: Callable[[], Awaitable[None]],
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.chunks = chunks
        self.outcome = outcome
        self.on_close = on_close
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    await send(
                        {
                            "type": "http.response.start",
                            "status": self.status_code,
                            "headers": self.raw_headers,
                        }
                    )
                    async for chunk in self.chunks:
                        self.outcome.mark_first_byte()
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    group.cancel_scope.cancel()

                async def listen() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    self.outcome.client_left = True
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                group.start_soon(listen)
        except OSError:  # the client's connection broke while we wrote to it
            self.outcome.client_left = True
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.chunks, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
                await self.on_close()


# -- errors in each surface's shape ----------------------------------------------------------------


def ollama_error_line(message: str) -> bytes:
    return json.dumps({"error": message}).encode() + b"\n"


def openai_error_event(message: str, code: str = "backend_failed") -> bytes:
    error = {"message": message, "type": "server_error", "param": None, "code": code}
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"


def _broken(model: str, exc: Exception | None) -> str:
    why = f": {type(exc).__name__}" if exc is not None else ""
    return f"the server of {model} stopped in the middle of the answer{why}"


# -- relays ---------------------------------------------------------------------------------------


async def relay_ndjson(
    upstream: httpx.Response, model: str, outcome: Outcome, rename: str | None = None
) -> AsyncIterator[bytes]:
    """Ollama's NDJSON lines as they come (``model`` renamed to what the client asked for)."""
    done = False
    failure: Exception | None = None
    try:
        async for line in upstream.aiter_lines():
            if not line.strip():
                continue
            try:
                part = json.loads(line)
            except ValueError:
                part = None
            if isinstance(part, dict):
                done = done or bool(part.get("done")) or "error" in part
                if rename is not None and "model" in part:
                    part["model"] = rename
                    line = json.dumps(part)
            yield line.encode() + b"\n"
    except httpx.HTTPError as exc:
        failure = exc
    if not done:
        outcome.code = 502
        yield ollama_error_line(_broken(model, failure))


async def relay_sse(
    upstream: httpx.Response, model: str, outcome: Outcome, rename: str | None = None
) -> AsyncIterator[bytes]:
    """Server-sent events as they come, one event at a time."""
    done = False
    failure: Exception | None = None
    event: list[str] = []
    try:
        async for line in upstream.aiter_lines():
            if line:
                if line.startswith("data: [DONE]"):
                    done = True
                elif rename is not None and line.startswith("data: "):
                    line = _renamed(line, rename)
                event.append(line)
                continue
            if event:
                yield ("\n".join(event) + "\n\n").encode()
                event = []
    except httpx.HTTPError as exc:
        failure = exc
    if event and done:
        yield ("\n".join(event) + "\n\n").encode()
    if not done:
        outcome.code = 502
        yield openai_error_event(_broken(model, failure))


def _renamed(line: str, model: str) -> str:
    try:
        data = json.loads(line[6:])
    except ValueError:
        return line
    if isinstance(data, dict) and "model" in data:
        data["model"] = model
        return "data: " + json.dumps(data)
    return line


# -- Ollama requests answered by an OpenAI-compatible server ---------------------------------------

#: Ollama ``options`` that have an OpenAI field of their own.
_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "num_predict": "max_tokens",
    "stop": "stop",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def openai_request(body: Mapping[str, Any], model: str, chat: bool) -> dict[str, Any]:
    """An Ollama ``/api/chat`` or ``/api/generate`` body as an OpenAI request for ``model``."""
    out: dict[str, Any] = {"model": model, "stream": bool(body.get("stream", True))}
    if chat:
        out["messages"] = [
            {"role": m.get("role", "user"), "content": m.get("content", "")}
            for m in body.get("messages") or []
        ]
    else:
        prompt = str(body.get("prompt") or "")
        system = body.get("system")
        out["prompt"] = f"{system}\n\n{prompt}" if system else prompt
    options = body.get("options")
    if isinstance(options, Mapping):
        for key, name in _OPTIONS.items():
            if key in options:
                out[name] = options[key]
    return out


def _created_at() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def ollama_part(model: str, text: str, chat: bool, done: bool, reason: str | None) -> bytes:
    part: dict[str, Any] = {"model": model, "created_at": _created_at(), "done": done}
    if chat:
        part["message"] = {"role": "assistant", "content": text}
    else:
        part["response"] = text
    if done:
        part["done_reason"] = reason or "stop"
    return json.dumps(part).encode() + b"\n"


def ollama_answer(data: Mapping[str, Any], model: str, chat: bool) -> dict[str, Any]:
    """A whole OpenAI answer as Ollama's (``"stream": false``)."""
    choice = (data.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    text = (message.get("content") if chat else choice.get("text")) or ""
    parsed: dict[str, Any] = json.loads(
        ollama_part(model, text, chat, True, choice.get("finish_reason"))
    )
    usage = data.get("usage") or {}
    parsed["prompt_eval_count"] = usage.get("prompt_tokens", 0)
    parsed["eval_count"] = usage.get("completion_tokens", 0)
    return parsed


async def sse_as_ndjson(
    upstream: httpx.Response, model: str, chat: bool, outcome: Outcome
) -> AsyncIterator[bytes]:
    """An OpenAI stream as Ollama's NDJSON lines, chunk by chunk."""
    reason: str | None = None
    failure: Exception | None = None
    try:
        async for line in upstream.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line.startswith("data: [DONE]"):
                yield ollama_part(model, "", chat, True, reason)
                return
            try:
                data = json.loads(line[6:])
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("error"):
                break
            choice = ((data or {}).get("choices") or [{}])[0]
            reason = choice.get("finish_reason") or reason
            text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            if text:
                yield ollama_part(model, text, chat, False, None)
    except httpx.HTTPError as exc:
        failure = exc
    outcome.code = 502
    yield ollama_error_line(_broken(model, failure))
