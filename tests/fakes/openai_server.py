"""A fake OpenAI-compatible model server (what vLLM, llama.cpp's server or TGI answer), for the
gateway's ``process`` backend: ``python -m tests.fakes.openai_server --port N --model NAME``.

It follows the documented shapes of the OpenAI API:

* ``GET /health`` -> 200 (the health URL of the process backend); ``GET /v1/models``.
* ``POST /v1/chat/completions`` -> ``chat.completion``; with ``"stream": true`` server-sent
  events of ``chat.completion.chunk`` (``delta``), the last with ``finish_reason``, then
  ``data: [DONE]``.
* ``POST /v1/completions`` -> ``text_completion`` (streamed the same way).
* ``POST /v1/embeddings`` -> ``{"object": "list", "data": [{"object": "embedding", "index",
  "embedding"}], "model", "usage"}``; ``encoding_format: "base64"`` gives little-endian
  float32 bytes in base64, as the official client asks by default.
* Errors: ``{"error": {"message", "type", "param", "code"}}``.

The answer is deterministic: ``max_tokens`` tokens ``t0 t1 ...`` when given, else an echo of
the last message (or prompt) word by word. A prompt containing ``__die__`` makes the server
send two chunks of a stream and then exit the process (a backend dying mid-stream);
``--chunk-delay-s`` slows every chunk. The same functions answer the OpenAI-compatible
``/v1/...`` routes of the fake Ollama server (``tests/fakes/ollama.py``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DIE = "__die__"
DIMENSIONS = 8


def tokens_for(text: str, max_tokens: int | None) -> list[str]:
    """The tokens of the answer to ``text``."""
    if max_tokens is not None:
        return [f"t{i} " for i in range(max(0, max_tokens))]
    words = text.split() or ["(empty)"]
    return [f"{w} " for w in ["echo:", *words]]


def embedding(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """A deterministic unit vector for ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    raw = [b / 255.0 - 0.5 for b in digest[:dimensions]]
    norm = sum(x * x for x in raw) ** 0.5 or 1.0
    return [round(x / norm, 6) for x in raw]


def last_text(body: dict[str, Any]) -> str:
    """The prompt, or the content of the last message."""
    if "messages" in body:
        messages = body.get("messages") or [{}]
        content = messages[-1].get("content", "") if isinstance(messages[-1], dict) else ""
        return content if isinstance(content, str) else json.dumps(content)
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else " ".join(map(str, prompt))


def error(status: int, message: str, kind: str = "invalid_request_error") -> tuple[int, Any]:
    return status, {"error": {"message": message, "type": kind, "param": None, "code": None}}


class OpenAIFake:
    """The answers, shared by the standalone server and the fake Ollama's ``/v1`` routes."""

    def __init__(self, models: list[str], chunk_delay_s: float = 0.0) -> None:
        self.models = models
        self.chunk_delay_s = chunk_delay_s
        #: Called when a prompt asks the backend to die mid-stream.
        self.die: Callable[[], None] = lambda: os._exit(3)

    def models_list(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"}
                for m in self.models
            ],
        }

    def check(self, body: dict[str, Any]) -> tuple[int, Any] | None:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return error(400, "you must provide a model parameter")
        if model not in self.models:
            return error(404, f"The model `{model}` does not exist.", "not_found_error")
        return None

    def embeddings(self, body: dict[str, Any]) -> tuple[int, Any]:
        problem = self.check(body)
        if problem is not None:
            return problem
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return error(400, "'input' must be a string or a list of strings")
        as_b64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = embedding(text)
            value: Any = vector
            if as_b64:
                value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": value})
        used = sum(len(t.split()) for t in texts)
        usage = {"prompt_tokens": used, "total_tokens": used}
        return 200, {"object": "list", "data": data, "model": body["model"], "usage": usage}

    def complete(self, body: dict[str, Any], chat: bool) -> tuple[int, Any]:
        """A whole answer (not streamed)."""
        problem = self.check(body)
        if problem is not None:
            return problem
        text = "".join(tokens_for(last_text(body), body.get("max_tokens")))
        created = int(time.time())
        usage = {"prompt_tokens": 3, "completion_tokens": len(text.split()), "total_tokens": 0}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "stop"}
            kind = "text_completion"
        return 200, {
            "id": f"fake-{created}",
            "object": kind,
            "created": created,
            "model": body["model"],
            "choices": [choice],
            "usage": usage,
        }

    def stream(self, body: dict[str, Any], chat: bool) -> Iterator[bytes]:
        """Server-sent events of a streamed answer (call ``check`` first)."""
        text = last_text(body)
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        tokens = tokens_for(text, body.get("max_tokens"))
        for i, token in enumerate([*tokens, ""]):
            if DIE in text and i == 2:
                self.die()
                return
            last = i == len(tokens)
            if chat:
                delta: dict[str, Any] = {} if last else {"content": token}
                if i == 0:
                    delta["role"] = "assistant"
                choice: dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": token, "logprobs": None}
            choice["finish_reason"] = "stop" if last else None
            chunk = {
                "id": f"fake-{created}",
                "object": kind,
                "created": created,
                "model": body["model"],
                "choices": [choice],
            }
            if i:
                time.sleep(self.chunk_delay_s)
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    def route(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        """``(status, JSON)``, or ``(200, iterator of bytes)`` for a stream."""
        if method == "GET" and path == "/v1/models":
            return 200, self.models_list()
        if method != "POST":
            return error(404, f"no route {path}")
        if path == "/v1/embeddings":
            return self.embeddings(body)
        if path in ("/v1/chat/completions", "/v1/completions"):
            chat = path == "/v1/chat/completions"
            if body.get("stream"):
                return self.check(body) or (200, self.stream(body, chat))
            return self.complete(body, chat)
        return error(404, f"no route {path}")


def send(handler: BaseHTTPRequestHandler, status: int, payload: Any, content_type: str) -> None:
    """Write a JSON answer, or stream an iterator of chunks until it ends (then close)."""
    if isinstance(payload, dict):
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
        return
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Cache-Control", "no-cache")
    handler.send_header("Connection", "close")
    handler.end_headers()
    for chunk in payload:
        handler.wfile.write(chunk)
        handler.wfile.flush()
    handler.close_connection = True


def read_json(handler: BaseHTTPRequestHandler) -> dict[str, Any] | None:
    length = int(handler.headers.get("Content-Length") or 0)
    raw = handler.rfile.read(length) if length else b""
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def do_GET(self) -> None:
        if self.path == "/health":
            send(self, 200, {"status": "ok"}, "")
            return
        send(self, *self.server.fake.route("GET", self.path, {}), "text/event-stream")

    def do_POST(self) -> None:
        body = read_json(self)
        if body is None:
            send(self, *error(400, "We could not parse the JSON body of your request."), "")
            return
        send(self, *self.server.fake.route("POST", self.path, body), "text/event-stream")


class _Server(ThreadingHTTPServer):
    fake: OpenAIFake
    daemon_threads = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI-compatible model server.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--load-delay-s", type=float, default=0.0)
    parser.add_argument("--chunk-delay-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    time.sleep(args.load_delay_s)  # "loading the weights": /health does not answer yet
    server = _Server(("127.0.0.1", args.port), _Handler)
    server.fake = OpenAIFake(args.model or ["fake"], args.chunk_delay_s)
    print(f"fake OpenAI server on {args.port}", flush=True)
    server.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    main()
