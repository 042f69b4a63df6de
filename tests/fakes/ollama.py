"""A fake Ollama server: a real HTTP server on a free port that follows Ollama's documented API.

Ollama cannot be installed where the tests run, so this stands in for it. It implements the
shapes of Ollama's ``docs/api.md`` that VRAMancer uses:

* ``GET /api/version`` -> ``{"version": "0.6.5"}``
* ``POST /api/generate`` without a prompt loads the model and answers one object
  ``{"model", "created_at", "response": "", "done": true, "done_reason": "load"}``; with
  ``keep_alive: 0`` it unloads it (``"done_reason": "unload"``). ``options.num_gpu: 0`` keeps
  it on the CPU (``size_vram`` 0). With a prompt it "generates" (loads as a side effect).
* ``GET /api/ps`` -> ``{"models": [{"name", "model", "size", "digest", "details", "expires_at",
  "size_vram", "context_length"}]}``
* ``GET /api/tags`` -> the pulled models; ``POST /api/show`` -> ``details`` and ``model_info``.
* A model that was not "pulled" -> 404 ``{"error": "model 'x' not found, try pulling it
  first"}``.
* ``POST /api/generate`` with a prompt and ``POST /api/chat`` answer; streamed by default
  (Ollama's ``"stream": true``) as NDJSON: one object per line, ``{"model", "created_at",
  "response": "tok", "done": false}`` (chat: ``"message": {"role": "assistant", "content":
  "tok"}``), the last with ``"done": true``, ``done_reason`` and the counters; with
  ``"stream": false`` one object. ``options.num_predict`` tokens ``t0 t1 ...``, else an echo.
* ``POST /api/embed`` (``input``: a string or a list) -> ``{"model", "embeddings": [[...]],
  "total_duration", "load_duration", "prompt_eval_count"}``.
* Ollama's OpenAI-compatible routes ``/v1/chat/completions``, ``/v1/completions``,
  ``/v1/embeddings``, ``/v1/models`` (``tests/fakes/openai_server.py``'s answers).

Ollama's own rules that clients trip over are kept:

* ``keep_alive`` is a JSON number of seconds or a Go duration string (``"5m"``, ``"1h30m"``,
  ``"-1m"``); a string without a unit other than ``"0"`` (``"-1"``) is a 400
  ``time: missing unit in duration "-1"``, as Go's ``time.ParseDuration`` says. Negative: forever.
* A name without a tag is the ``:latest`` tag: ``llama3`` loads ``llama3:latest``, and
  ``/api/ps`` lists it as ``llama3:latest``.
* An unload only *schedules* the runner's expiry (Ollama's ``expireRunner``): the answer comes
  back at once and the model may stay in ``/api/ps`` a while (``unload_lag_s``).

Failure modes, set from the test: ``go_down()`` / ``come_back()`` (nothing listens on the port),
``load_delay_s`` (slow loads), ``unload_lag_s`` (the model leaves ``/api/ps`` that long after the
unload answer), ``fail_status = 500`` (every API call errors) or ``fail_next_loads = n``, and
``die_on_next_load()`` (the connection drops in the middle of a load and the server is gone),
``chunk_delay_s`` (slow streams); a prompt containing ``__die__`` drops the connection after
two chunks of its stream (the runner crashed mid-answer).
``requests`` records every call; ``max_concurrent_loads`` says whether two loads ever overlapped.

Run it alone for demos: ``python -m tests.fakes.ollama --port 11434 --model qwen3-vl:8b=10.5GiB``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.fakes.openai_server import DIE, OpenAIFake, embedding, last_text, send
from tests.fakes.openai_server import tokens_for as answer_tokens
from vramancer.units import parse_size

VERSION = "0.6.5"
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_UNIT = r"(?:ns|us|µs|μs|ms|s|m|h)"
_PART_RE = re.compile(f"({_NUMBER})({_UNIT})")
_DURATION_RE = re.compile(f"(?:{_NUMBER}{_UNIT})+")
_UNITS_S = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
#: A negative keep_alive is Go's largest duration (about 292 years) from the request on, so
#: ``expires_at`` still moves with every request (year ~2318).
_FOREVER = dt.timedelta(microseconds=(2**63 - 1) // 1000)


def go_duration_seconds(text: str) -> float:
    """Go's ``time.ParseDuration`` (what Ollama applies to a string ``keep_alive``), in
    seconds; ``ValueError`` carries Go's message."""
    body = text[1:] if text[:1] in ("+", "-") else text
    sign = -1.0 if text[:1] == "-" else 1.0
    if body == "0":
        return 0.0
    if re.fullmatch(_NUMBER, body):
        raise ValueError(f'time: missing unit in duration "{text}"')
    if not _DURATION_RE.fullmatch(body):
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * sum(float(n) * _UNITS_S[u] for n, u in _PART_RE.findall(body))


def keep_alive_seconds(value: Any) -> float | None:
    """Ollama's ``keep_alive`` (``api.Duration``): a JSON number of seconds (truncated to a
    whole second) or a Go duration string; negative means forever (None), missing the default
    5 minutes. Anything else is a ``ValueError`` with the message Ollama answers 400 with."""
    if value is None:
        return 300.0
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"Unsupported type: '{type(value).__name__}'")
    if isinstance(value, int | float):
        return None if value < 0 else float(int(value))
    seconds = go_duration_seconds(value)
    return None if seconds < 0 else seconds


def full_name(name: str) -> str:
    """Ollama's name for a model: the ``:latest`` tag when none is given."""
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


@dataclass
class FakeModel:
    """A pulled model."""

    name: str
    size: int
    family: str = "qwen3"
    parameter_size: str = "8.2B"
    quantization_level: str = "Q4_K_M"
    context_length: int = 4096

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.name.encode()).hexdigest()


@dataclass
class Loaded:
    model: FakeModel
    size_vram: int
    expires_at: dt.datetime


@dataclass
class Request:
    method: str
    path: str
    body: dict[str, Any] = field(default_factory=dict)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _created_at() -> str:
    return _now().isoformat().replace("+00:00", "Z")


class FakeOllama:
    """The fake server. ``start()`` binds a free port (or ``port``); ``url`` is its base URL."""

    def __init__(
        self, models: dict[str, int | str] | None = None, port: int = 0, keep_alive: bool = False
    ) -> None:
        self.models: dict[str, FakeModel] = {}
        #: HTTP/1.1 with connections kept between whole answers, as Ollama's own server does
        #: (streams still end by closing); off by default, so "down" means down at once.
        self.keep_alive = keep_alive
        for name, size in (models or {}).items():
            self.add_model(name, size)
        self.port = port
        self.loaded: dict[str, Loaded] = {}
        self.requests: list[Request] = []
        self.load_delay_s = 0.0
        self.unload_delay_s = 0.0
        self.unload_lag_s = 0.0
        self.fail_status: int | None = None
        self.fail_next_loads = 0
        self.chunk_delay_s = 0.0
        #: Streams being answered now, and the most ever at once.
        self.active_streams = 0
        self.active_loads = 0
        self.max_concurrent_loads = 0
        self._die_on_load = False
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- control -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def up(self) -> bool:
        return self._server is not None

    def add_model(self, name: str, size: int | str, **details: Any) -> FakeModel:
        """ "Pull" ``name`` (stored under its full name, ``:latest`` when it has no tag)."""
        model = FakeModel(name=full_name(name), size=parse_size(size), **details)
        self.models[model.name] = model
        return model

    def preload(self, name: str, on_gpu: bool = True) -> None:
        """Mark ``name`` loaded as if someone else had loaded it."""
        model = self.models[full_name(name)]
        self.loaded[model.name] = Loaded(model, model.size if on_gpu else 0, _now() + _FOREVER)

    def running(self) -> dict[str, Loaded]:
        """What ``/api/ps`` lists now (expired runners are gone)."""
        now = _now()
        with self._lock:
            for name in [n for n, m in self.loaded.items() if m.expires_at <= now]:
                del self.loaded[name]
            return dict(self.loaded)

    def start(self) -> FakeOllama:
        if self._server is not None:
            return self
        server = _Server(
            ("127.0.0.1", self.port), _KeepAliveHandler if self.keep_alive else _Handler
        )
        server.fake = self
        server.daemon_threads = True
        self.port = int(server.server_address[1])
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def go_down(self) -> None:
        """Ollama is down: nothing listens on the port (connections are refused)."""
        self.stop()

    def come_back(self) -> None:
        """Ollama restarted (on the same port, with nothing loaded)."""
        self.loaded.clear()
        self.start()

    def reset(self) -> None:
        """Forget loads, requests and failure modes (between hypothesis examples)."""
        with self._lock:
            self.loaded.clear()
            self.requests.clear()
            self.active_loads = 0
            self.max_concurrent_loads = 0
        self.load_delay_s = 0.0
        self.unload_delay_s = 0.0
        self.unload_lag_s = 0.0
        self.fail_status = None
        self.fail_next_loads = 0
        self._die_on_load = False

    def die_on_next_load(self) -> None:
        """The next load drops its connection half-way and the server goes away."""
        self._die_on_load = True

    def loads_of(self, name: str) -> int:
        return sum(
            1
            for r in self.requests
            if r.path == "/api/generate"
            and full_name(str(r.body.get("model"))) == full_name(name)
            and _is_load(r.body)
            and keep_alive_seconds_or_none(r.body) != 0
        )

    def unloads_of(self, name: str) -> int:
        return sum(
            1
            for r in self.requests
            if r.path == "/api/generate"
            and full_name(str(r.body.get("model"))) == full_name(name)
            and keep_alive_seconds_or_none(r.body) == 0
        )

    def __enter__(self) -> FakeOllama:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- API -----------------------------------------------------------------------------

    def ps(self) -> dict[str, Any]:
        loaded = list(self.running().values())
        return {
            "models": [
                {
                    "name": m.model.name,
                    "model": m.model.name,
                    "size": m.model.size,
                    "digest": m.model.digest,
                    "details": {
                        "parent_model": "",
                        "format": "gguf",
                        "family": m.model.family,
                        "families": [m.model.family],
                        "parameter_size": m.model.parameter_size,
                        "quantization_level": m.model.quantization_level,
                    },
                    "expires_at": m.expires_at.isoformat(),
                    "size_vram": m.size_vram,
                    "context_length": m.model.context_length,
                }
                for m in loaded
            ]
        }

    def generate(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            return 400, {"error": "model is required"}
        try:
            keep = keep_alive_seconds(body.get("keep_alive"))
        except ValueError as exc:
            return 400, {"error": str(exc)}
        model = self.models.get(full_name(name))
        if model is None:
            return 404, {"error": f"model '{name}' not found, try pulling it first"}
        if keep == 0 and _is_load(body):
            time.sleep(self.unload_delay_s)
            with self._lock:
                if self.unload_lag_s <= 0:
                    self.loaded.pop(model.name, None)
                elif model.name in self.loaded:  # Ollama expires the runner in the background
                    gone = _now() + dt.timedelta(seconds=self.unload_lag_s)
                    self.loaded[model.name].expires_at = gone
            return 200, _reply(name, "unload")
        options = body.get("options") or {}
        on_gpu = options.get("num_gpu", -1) != 0
        expires = _now() + (_FOREVER if keep is None else dt.timedelta(seconds=keep))
        with self._lock:
            self.loaded[model.name] = Loaded(model, model.size if on_gpu else 0, expires)
        if _is_load(body):
            return 200, _reply(name, "load")
        return 200, {**_reply(name, "stop"), "response": "fake response"}

    def show(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        name = body.get("model") or body.get("name")
        model = self.models.get(full_name(str(name)))
        if model is None:
            return 404, {"error": f"model '{name}' not found"}
        params = int(float(model.parameter_size.rstrip("B")) * 1e9)
        return 200, {
            "modelfile": f"FROM {model.name}",
            "parameters": f"num_ctx {model.context_length}",
            "template": "{{ .Prompt }}",
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": model.family,
                "families": [model.family],
                "parameter_size": model.parameter_size,
                "quantization_level": model.quantization_level,
            },
            "model_info": {
                "general.architecture": model.family,
                "general.parameter_count": params,
                f"{model.family}.context_length": model.context_length,
            },
            "capabilities": ["completion"],
            "modified_at": "2025-08-14T15:49:43.634137516-07:00",
        }

    def tags(self) -> dict[str, Any]:
        return {
            "models": [
                {"name": m.name, "model": m.name, "size": m.size, "digest": m.digest}
                for m in self.models.values()
            ]
        }

    def answer(self, body: dict[str, Any], chat: bool) -> Iterator[dict[str, Any]]:
        """The objects of an answer (a stream's lines; the last has ``done: true``)."""
        text = last_text(body)
        options = body.get("options") or {}
        tokens = answer_tokens(text, options.get("num_predict"))
        name = body["model"]
        for token in tokens:
            part: dict[str, Any] = {"model": name, "created_at": _created_at(), "done": False}
            if chat:
                part["message"] = {"role": "assistant", "content": token}
            else:
                part["response"] = token
            yield part
        last: dict[str, Any] = {**_reply(name, "stop"), "total_duration": 1000}
        last.update(load_duration=10, prompt_eval_count=3, eval_count=len(tokens))
        if chat:
            del last["response"]
            last["message"] = {"role": "assistant", "content": ""}
        yield last

    def whole(self, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        """A whole answer (``"stream": false``)."""
        parts = list(self.answer(body, chat))
        text = "".join(p["message"]["content"] if chat else p["response"] for p in parts)
        last = parts[-1]
        if chat:
            last["message"] = {"role": "assistant", "content": text}
        else:
            last["response"] = text
        return last

    def embed(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        raw = body.get("input")
        texts = [raw] if isinstance(raw, str) else raw
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return 400, {"error": "invalid input type"}
        return 200, {
            "model": body["model"],
            "embeddings": [embedding(t) for t in texts],
            "total_duration": 1000,
            "load_duration": 10,
            "prompt_eval_count": sum(len(t.split()) for t in texts),
        }

    def take_die_on_load(self) -> bool:
        with self._lock:
            die, self._die_on_load = self._die_on_load, False
        return die

    def take_failed_load(self) -> bool:
        with self._lock:
            if self.fail_next_loads <= 0:
                return False
            self.fail_next_loads -= 1
            return True

    def begin_load(self) -> None:
        with self._lock:
            self.active_loads += 1
            self.max_concurrent_loads = max(self.max_concurrent_loads, self.active_loads)

    def end_load(self) -> None:
        with self._lock:
            self.active_loads -= 1


def _is_load(body: dict[str, Any]) -> bool:
    return not body.get("prompt")


def _reply(name: str, reason: str) -> dict[str, Any]:
    return {
        "model": name,
        "created_at": _created_at(),
        "response": "",
        "done": True,
        "done_reason": reason,
    }


class _Server(ThreadingHTTPServer):
    fake: FakeOllama

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up (timeout) leaves a broken pipe: that is expected here."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """One request. HTTP/1.0: every response closes its connection, so "down" means down."""

    server: _Server
    server_version = "FakeOllama/" + VERSION

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any] | None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def do_GET(self) -> None:
        fake = self.server.fake
        fake.requests.append(Request("GET", self.path))
        if fake.fail_status is not None:
            self._send(fake.fail_status, {"error": "fake ollama: internal error"})
            return
        if self.path == "/v1/models":
            self._send(200, OpenAIFake(list(fake.models)).models_list())
            return
        routes = {
            "/api/version": lambda: {"version": VERSION},
            "/api/ps": fake.ps,
            "/api/tags": fake.tags,
        }
        route = routes.get(self.path)
        if route is None:
            self._send(404, {"error": "404 page not found"})
        else:
            self._send(200, route())

    def do_POST(self) -> None:
        fake = self.server.fake
        body = self._body()
        fake.requests.append(Request("POST", self.path, body or {}))
        if body is None:
            self._send(400, {"error": "invalid JSON body"})
        elif self.path.startswith("/v1/") and fake.fail_status is None:
            openai = OpenAIFake(list(fake.models), fake.chunk_delay_s)
            openai.die = self._drop_connection
            send(self, *openai.route("POST", self.path, body), "text/event-stream")
        elif self.path in ("/api/chat", "/api/embed") or (
            self.path == "/api/generate" and not _is_load(body)
        ):
            self._answer(fake, body)
        elif self.path == "/api/show" and fake.fail_status is None:
            self._send(*fake.show(body))
        elif self.path != "/api/generate":
            self._send(404, {"error": "404 page not found"})
        elif fake.fail_status is not None:
            self._send(fake.fail_status, {"error": "fake ollama: internal error"})
        elif _is_load(body) and keep_alive_seconds_or_none(body) != 0:
            self._load(fake, body)
        else:
            self._send(*fake.generate(body))

    def _answer(self, fake: FakeOllama, body: dict[str, Any]) -> None:
        """``/api/chat``, ``/api/embed``, ``/api/generate`` with a prompt: load as a side
        effect, then answer (streamed unless ``"stream": false``)."""
        if fake.fail_status is not None:
            self._send(fake.fail_status, {"error": "fake ollama: internal error"})
            return
        status, loaded = fake.generate({**body, "prompt": "load"})
        if status != 200:
            self._send(status, loaded)
            return
        if self.path == "/api/embed":
            self._send(*fake.embed(body))
            return
        chat = self.path == "/api/chat"
        if body.get("stream") is False:
            self._send(200, fake.whole(body, chat))
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Connection", "close")
        self.end_headers()
        dying = DIE in last_text(body)
        with fake._lock:
            fake.active_streams += 1
        try:
            for i, part in enumerate(fake.answer(body, chat)):
                if dying and i == 2:
                    self._drop_connection()
                    return
                if i:
                    time.sleep(fake.chunk_delay_s)
                self.wfile.write(json.dumps(part).encode() + b"\n")
                self.wfile.flush()
        except OSError:  # the client went away: stop generating, as Ollama does
            return
        finally:
            with fake._lock:
                fake.active_streams -= 1
        self.close_connection = True

    def _load(self, fake: FakeOllama, body: dict[str, Any]) -> None:
        fake.begin_load()
        try:
            if fake.take_die_on_load():
                time.sleep(min(0.05, fake.load_delay_s))
                fake.stop()  # stop listening first: the client then finds nobody
                self._drop_connection()
                return
            time.sleep(fake.load_delay_s)
            if fake.take_failed_load():
                self._send(500, {"error": "fake ollama: failed to load model"})
                return
            self._send(*fake.generate(body))
        finally:
            fake.end_load()

    def _drop_connection(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True


def keep_alive_seconds_or_none(body: dict[str, Any]) -> float | None:
    try:
        return keep_alive_seconds(body.get("keep_alive"))
    except ValueError:
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake Ollama server for demos and tests.")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--model", action="append", default=[], help="NAME=SIZE, e.g. x=4GiB")
    parser.add_argument("--load-delay-s", type=float, default=0.0)
    args = parser.parse_args(argv)
    models = dict(item.split("=", 1) for item in args.model)
    fake = FakeOllama(models, port=args.port)
    fake.load_delay_s = args.load_delay_s
    fake.start()
    print(f"fake Ollama listening on {fake.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()


class _KeepAliveHandler(_Handler):
    """``FakeOllama(keep_alive=True)``: whole answers keep the connection open (and go out
    without Nagle's delay, as a Go server's do)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
