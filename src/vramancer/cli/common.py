"""Shared pieces of the CLI: the HTTP client for a running server, output, and errors.

Commands talk to the server at ``VRM_URL`` (default ``http://127.0.0.1:8470``) with the bearer
token ``VRM_API_TOKEN``. Every command takes ``--json``; errors go to stderr with exit code 1
(2 for bad usage or configuration), naming the field that was wrong.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape

from vramancer import client
from vramancer.client import error_message
from vramancer.config import Settings
from vramancer.errors import ConfigError

console = Console()
err_console = Console(stderr=True)

#: Whether the command now running was given ``--json`` (then ``fail`` prints JSON). Set by
#: the ``--json`` option itself, which every command that has it parses before it runs.
_json_errors = False


def _note_json(value: bool) -> bool:
    global _json_errors
    _json_errors = bool(value)
    return value


JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print machine-readable JSON.", callback=_note_json)
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML configuration file (default: $VRM_CONFIG)."),
]


def run_loop(main: Coroutine[Any, Any, Any]) -> Any:
    """Run a daemon's coroutine on uvloop where it is installed (a core dependency on Linux and
    macOS; ``vramancer serve`` gets it through uvicorn), else on asyncio's own loop. uvloop's
    loop costs about a quarter less CPU per task run (docs/benchmarks.md)."""
    try:
        import uvloop
    except ImportError:
        import asyncio

        return asyncio.run(main)
    return uvloop.run(main)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on stderr and exit. The message is plain text: brackets in it
    (``[auth] tokens``, a list) are printed as they are, not read as rich markup.

    When the command line asked for ``--json``, the error is printed as
    ``{"error": {"message": ...}}`` instead, so scripts can read it."""
    if _json_errors:
        sys.stderr.write(json.dumps({"error": {"message": message}}) + "\n")
        sys.stderr.flush()
    else:
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def server_url(value: str | None = None) -> str:
    """The server's base URL: ``value``, else ``VRM_URL``, else the default
    (``vramancer.client.server_url``); a bad one is a configuration error (exit code 2)."""
    try:
        return client.server_url(value)
    except ConfigError as exc:
        fail(exc.message, code=2)


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    try:
        return Settings.load(config, **overrides)
    except ConfigError as exc:
        fail(exc.message, code=2)


def emit(data: Any, as_json: bool, render: Callable[[Any], None] | None = None) -> None:
    """Print ``data`` as JSON, or hand it to ``render`` for people."""
    if as_json or render is None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        render(data)


class Api:
    """A small synchronous client for the VRAMancer HTTP API."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 30.0):
        self.url = server_url(url)
        token = token or os.environ.get("VRM_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(
                f"cannot reach VRAMancer at {self.url} ({exc.__class__.__name__}); "
                "start it with `vramancer serve` or set VRM_URL"
            ) from exc
        if response.status_code >= 400:
            fail(_error_message(response))
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    def get_if_served(self, path: str, **kwargs: Any) -> Any | None:
        """``get``, or None when the server has no such route (an older version)."""
        try:
            response = self._client.get(path, **kwargs)
        except httpx.TransportError:
            return None
        if response.status_code == 404 and _route_missing(error_message(response)):
            return None
        if response.status_code >= 400:
            fail(_error_message(response))
        return response.json()

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs).json()

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs).json()

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs).json()

    def close(self) -> None:
        self._client.close()


class ServerUnreachable(Exception):
    """No server answered at VRM_URL (commands with an embedded fallback catch this)."""


def _error_message(response: httpx.Response) -> str:
    message = error_message(response)
    status = response.status_code
    if status == 401:
        hint = "set VRM_API_TOKEN" if "authorization" not in response.request.headers else ""
        message += f"; {hint or 'check VRM_API_TOKEN'}"
    elif status == 404 and _route_missing(message):
        # Usually VRM_URL points at something else (a path, another service).
        message += f" ({response.request.method} {response.request.url}; is VRM_URL right?)"
    return f"{message} (HTTP {status})"


def _route_missing(message: str) -> bool:
    """Starlette's own 404 for a path no route matches (not a resource the API did not find)."""
    return message.strip() == "Not Found"


def call(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` and turn an unreachable server into a one-line error."""
    try:
        return fn()
    except ServerUnreachable as exc:
        fail(str(exc))
