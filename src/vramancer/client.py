"""A client of a running VRAMancer daemon, over its HTTP API.

For programs that work beside ``vramancer serve`` (a daemon holds the data directory, so a
second ``Runtime`` on it is refused)::

    from vramancer import Client

    with Client() as vrm:                    # VRM_URL, VRM_API_TOKEN
        print(vrm.resources()["gpus"])
        task = vrm.run("python", "train.py", vram="4GiB")
        print(task["state"], task["exit_code"])

Answers are the API's JSON objects (``/docs`` describes each). An error answer raises the
library's typed error of its HTTP status (``NotFound``, ``InvalidInput``, ``Conflict``,
``Forbidden`` ...) with the server's message and ``code``; a daemon that does not answer raises
``ServerUnreachable``. Only the kernel is imported, so ``import vramancer.client`` stays cheap.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from vramancer.errors import (
    BackendUnavailable,
    ConfigError,
    Conflict,
    Forbidden,
    InsufficientStorage,
    InvalidInput,
    NotFound,
    OperationTimeout,
    VramancerError,
)

#: Where the daemon listens by default (``[server]`` host and port).
DEFAULT_URL = "http://127.0.0.1:8470"
#: Task states after which a task never changes again.
TERMINAL_STATES = frozenset({"done", "failed", "cancelled"})

_ERRORS: dict[int, type[VramancerError]] = {
    401: Forbidden,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    422: InvalidInput,
    503: BackendUnavailable,
    504: OperationTimeout,
    507: InsufficientStorage,
}


class ServerUnreachable(BackendUnavailable):
    """No daemon answered at the client's URL."""

    code = "server_unreachable"


def server_url(value: str | None = None) -> str:
    """The daemon's base URL: ``value``, else ``VRM_URL``, else :data:`DEFAULT_URL`.

    ``HOST:PORT`` without a scheme means ``http://HOST:PORT``. Another scheme than http or
    https, or a value that is not a URL, raises ``ConfigError`` naming VRM_URL."""
    raw = (value or os.environ.get("VRM_URL") or DEFAULT_URL).strip()
    url = raw if "://" in raw else f"http://{raw}"
    try:
        parts = urlsplit(url)
        valid = bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:  # a port that is not a number in range, a broken [IPv6] host
        valid = False
    if valid and parts.scheme not in ("http", "https"):
        why = f"scheme {parts.scheme!r} is not http or https"
    elif not valid:
        why = "not a URL"
    else:
        return url.rstrip("/")
    raise ConfigError(f"VRM_URL: {why} (got {raw!r}; expected e.g. http://127.0.0.1:8470)")


def error_message(response: httpx.Response) -> str:
    """The ``error.message`` of an error answer, or the answer's text."""
    try:
        err = response.json().get("error", {})
        return str(err.get("message") or response.text)
    except (ValueError, AttributeError):
        return response.text or response.reason_phrase


def error_of(response: httpx.Response) -> VramancerError:
    """The typed error of an error answer: its message, ``code`` and details."""
    message = error_message(response)
    if response.status_code == 401:
        message += "; set VRM_API_TOKEN to a token of [auth] tokens"
    error = _ERRORS.get(response.status_code, VramancerError)(message)
    try:
        body = response.json().get("error", {})
    except (ValueError, AttributeError):
        body = {}
    if isinstance(body, dict):
        error.details = {k: v for k, v in body.items() if k not in ("code", "message")}
        error.code = str(body.get("code") or error.code)
    error.http_status = response.status_code
    return error


def task_workdir(cwd: str | None = None, scratch: bool = False) -> str | None:
    """The ``cwd`` to send with a task: ``cwd`` made absolute, else the current directory
    (``python train.py`` typed here means this directory's train.py); None with ``scratch``
    (the daemon then runs it in an empty scratch directory). It must exist where the task runs."""
    if scratch:
        if cwd is not None:
            raise InvalidInput("give cwd or scratch, not both", field="cwd")
        return None
    return os.path.abspath(cwd or os.getcwd())


class Client:
    """A synchronous client of one daemon: ``url`` (default ``VRM_URL``), bearer ``token``
    (default ``VRM_API_TOKEN``). Use it in a ``with`` block, or call :meth:`close`."""

    def __init__(
        self, url: str | None = None, token: str | None = None, *, timeout_s: float = 30.0
    ) -> None:
        self.url = server_url(url)
        token = token or os.environ.get("VRM_API_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """``method`` ``path`` on the daemon; the answer's JSON, or the typed error."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnreachable(
                f"cannot reach VRAMancer at {self.url} ({exc.__class__.__name__}); "
                "start it with `vramancer serve` or set VRM_URL",
                url=self.url,
            ) from exc
        if response.status_code >= 400:
            raise error_of(response)
        return response.json()

    # -- the machine -------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: the daemon's liveness (``{"status": "ok", ...}``)."""
        result: dict[str, Any] = self.request("GET", "/healthz")
        return result

    def resources(self) -> dict[str, Any]:
        """GPUs, host memory and pressure (``GET /v1/system/resources``)."""
        result: dict[str, Any] = self.request("GET", "/v1/system/resources")
        return result

    def devices(self) -> dict[str, Any]:
        """Every device with its latest telemetry, and the host (``GET /v1/devices``)."""
        result: dict[str, Any] = self.request("GET", "/v1/devices")
        return result

    def nodes(self) -> list[dict[str, Any]]:
        """The pool's nodes (this one alone outside a pool; ``GET /v1/cluster/nodes``)."""
        result: list[dict[str, Any]] = self.request("GET", "/v1/cluster/nodes")["nodes"]
        return result

    # -- models and profiles -----------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """The managed models and their states (``GET /v1/models``)."""
        result: list[dict[str, Any]] = self.request("GET", "/v1/models")["models"]
        return result

    def profile(self) -> dict[str, Any]:
        """The profile in force, every profile's placements, the last switch."""
        result: dict[str, Any] = self.request("GET", "/v1/profile")
        return result

    def set_profile(self, name: str, *, dry_run: bool = False) -> dict[str, Any]:
        """Switch to profile ``name`` (operator); with ``dry_run``, answer the plan only."""
        body = {"name": name, "dry_run": dry_run}
        result: dict[str, Any] = self.request("PUT", "/v1/profile", json=body)
        return result

    # -- tasks -------------------------------------------------------------------------------

    def submit(
        self, *command: str, cwd: str | None = None, scratch: bool = False, **fields: Any
    ) -> str:
        """Queue ``command`` (program and arguments) as a task; its id. It runs in ``cwd``
        (default: the current directory; ``scratch=True``: an empty one the daemon makes).
        ``fields`` are the task body's (``vram="4GiB"``, ``gpu=0``, ``model="clip"``,
        ``timeout=600``, ``env={...}``, ``priority``, ``max_retries``, ``idempotency_key``,
        ``release="current"`` (run in that release's checkout) ...)."""
        if not command:
            raise InvalidInput("submit: give the command to run, e.g. submit('python', 'x.py')")
        # a task that names a release runs in its checkout (``release="current"``)
        where = None if fields.get("release") and cwd is None else task_workdir(cwd, scratch)
        body = {"type": "cmd", "cmd": list(command), "cwd": where}
        body.update(fields)
        body = {k: v for k, v in body.items() if v is not None}
        result: dict[str, Any] = self.request("POST", "/api/tasks/submit", json=body)
        return str(result["task_id"])

    def task(self, task_id: str) -> dict[str, Any]:
        """One task's status: ``state``, ``attempts``, ``device``, ``exit_code`` ..."""
        result: dict[str, Any] = self.request(
            "GET", "/api/tasks/status", params={"task_id": task_id}
        )
        return result

    def wait(
        self, task_id: str, *, timeout_s: float | None = None, poll_s: float = 0.25
    ) -> dict[str, Any]:
        """Poll the task until it ends (``done``, ``failed`` or ``cancelled``); its status.
        Past ``timeout_s`` raises ``OperationTimeout`` (the task goes on)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.task(task_id)
            if status["state"] in TERMINAL_STATES:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise OperationTimeout(
                    f"task {task_id} is still {status['state']} after {timeout_s} s",
                    task_id=task_id,
                )
            time.sleep(poll_s)

    def run(self, *command: str, timeout_s: float | None = None, **fields: Any) -> dict[str, Any]:
        """``submit`` then ``wait``: the ended task's status (``timeout_s`` bounds the wait)."""
        return self.wait(self.submit(*command, **fields), timeout_s=timeout_s)

    def tasks(self, state: str | None = None, *, limit: int = 50) -> list[dict[str, Any]]:
        """The newest tasks first (``state``: only those in it)."""
        params: Mapping[str, Any] = {"limit": limit, **({"state": state} if state else {})}
        result: list[dict[str, Any]] = self.request("GET", "/api/tasks/history", params=params)[
            "tasks"
        ]
        return result

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel a task (operator): at once when waiting, a running one is killed."""
        result: dict[str, Any] = self.request(
            "POST", f"/api/tasks/{quote(task_id, safe='')}/cancel"
        )
        return result

    def logs(self, task_id: str) -> dict[str, Any]:
        """The latest attempt's ``stdout`` and ``stderr`` (its owner and admins only)."""
        result: dict[str, Any] = self.request("GET", f"/api/tasks/{quote(task_id, safe='')}/logs")
        return result
