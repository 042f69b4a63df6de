"""Ollama over its documented HTTP API (httpx, async).

* load: ``POST /api/generate`` with ``model``, ``keep_alive`` and no prompt; Ollama answers one
  object ``{"model", "created_at", "response": "", "done": true, "done_reason": "load"}`` once
  the model is loaded. ``keep_alive`` is a number of seconds or a Go duration with units
  (``ModelSpec`` turns ``"-1"``, which Ollama refuses, into ``-1``).
* unload: the same with ``keep_alive: 0`` (``"done_reason": "unload"``). Ollama answers as soon
  as the runner is *scheduled* to expire, so the unload then polls ``/api/ps`` until the model
  is gone (``ensure_unloaded`` returns only when it really is unloaded).
* loaded models: ``GET /api/ps`` -> ``{"models": [{"name", "model", "size", "size_vram", ...}]}``;
  names carry their tag (``llama3`` is listed as ``llama3:latest``).
* reachability: ``GET /api/version`` -> ``{"version"}``.
* errors: ``{"error": "..."}`` with a 4xx/5xx; an unknown model is a 404.

A CPU placement sends ``options.num_gpu = 0`` (no layer on a GPU); a GPU one names it with
``options.main_gpu`` when it is not the first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import httpx

from vramancer.errors import BackendUnavailable, InvalidInput, OperationTimeout
from vramancer.models.backends.base import (
    LoadResult,
    RequestInfo,
    RunningModel,
    Target,
    full_name,
)
from vramancer.models.errors import BackendError, ModelNotInBackend
from vramancer.models.settings import ModelSpec, OllamaSettings
from vramancer.models.types import BackendKind
from vramancer.resources.estimator import estimate_memory, parse_params

#: Pause between two ``/api/ps`` polls while an unload completes.
UNLOAD_POLL_S = 0.05

__all__ = ["OllamaClient", "OllamaModel", "RunningModel", "full_name"]


class OllamaClient:
    """The HTTP calls; shared by every Ollama model. Errors are typed (see module doc)."""

    name = "ollama"

    def __init__(self, settings: OllamaSettings, transport: httpx.AsyncBaseTransport | None = None):
        self.settings = settings
        self.endpoint = settings.endpoint.rstrip("/")
        timeout = httpx.Timeout(settings.request_timeout_s, connect=settings.connect_timeout_s)
        # Plain http (the usual local Ollama) needs no TLS context; building one costs ~50 ms.
        verify = not self.endpoint.startswith("http://")
        self._client = httpx.AsyncClient(
            base_url=self.endpoint, timeout=timeout, transport=transport, verify=verify
        )

    @property
    def retry_interval_s(self) -> float:
        return self.settings.retry_interval_s

    async def probe(self) -> list[RunningModel]:
        """``/api/version`` (reachable at all), then ``/api/ps`` (what is loaded)."""
        await self.version()
        return await self.ps()

    async def version(self) -> str:
        data = await self._call("GET", "/api/version")
        return str(data.get("version", ""))

    async def ps(self) -> list[RunningModel]:
        data = await self._call("GET", "/api/ps")
        models = data.get("models") or []
        return [
            RunningModel(
                name=str(m.get("name", "")),
                model=str(m.get("model", m.get("name", ""))),
                size_bytes=int(m.get("size") or 0),
                size_vram_bytes=int(m.get("size_vram") or 0),
                expires_at=m.get("expires_at"),
            )
            for m in models
            if isinstance(m, dict)
        ]

    async def show(self, model: str) -> dict[str, Any]:
        """``POST /api/show``: ``details`` (``parameter_size``, ``quantization_level``) and
        ``model_info`` (``general.parameter_count``, ``<arch>.context_length`` ...)."""
        return await self._call("POST", "/api/show", json={"model": model})

    async def generate_load(
        self,
        model: str,
        keep_alive: str | int,
        options: dict[str, Any] | None,
        timeout_s: float,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "keep_alive": keep_alive, "stream": False}
        if options:
            body["options"] = options
        return await self._call("POST", "/api/generate", json=body, timeout_s=timeout_s)

    async def generate_unload(self, model: str, timeout_s: float) -> dict[str, Any]:
        body = {"model": model, "keep_alive": 0, "stream": False}
        return await self._call("POST", "/api/generate", json=body, timeout_s=timeout_s)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(
        self, method: str, path: str, json: Any = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        timeout = (
            httpx.Timeout(timeout_s, connect=self.settings.connect_timeout_s)
            if timeout_s is not None
            else httpx.USE_CLIENT_DEFAULT
        )
        try:
            response = await self._client.request(method, path, json=json, timeout=timeout)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise BackendUnavailable(
                f"Ollama is unreachable at {self.endpoint} ({type(exc).__name__})",
                backend="ollama",
                endpoint=self.endpoint,
            ) from None
        except httpx.TimeoutException as exc:
            raise OperationTimeout(
                f"Ollama did not answer {method} {path} in time ({type(exc).__name__})",
                backend="ollama",
            ) from None
        except httpx.TransportError as exc:
            raise BackendUnavailable(
                f"connection to Ollama at {self.endpoint} was lost during {method} {path} "
                f"({type(exc).__name__})",
                backend="ollama",
                endpoint=self.endpoint,
            ) from None
        return _decode(response, method, path)


def _decode(response: httpx.Response, method: str, path: str) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    if response.status_code == 404:
        message = str(data.get("error") or f"{path}: not found")
        raise ModelNotInBackend(f"Ollama: {message}", backend="ollama")
    if response.status_code >= 400:
        message = str(data.get("error") or response.text or response.reason_phrase)
        raise BackendError(
            f"Ollama answered {method} {path} with HTTP {response.status_code}: {message}",
            backend="ollama",
            status=response.status_code,
        )
    return data


class OllamaModel:
    """One Ollama model (its tag is the managed model's name, or the active variant)."""

    kind = BackendKind.OLLAMA
    can_move = False
    reload_on_cpu = True

    def __init__(
        self,
        spec: ModelSpec,
        client: OllamaClient,
        *,
        load_timeout_s: float,
        unload_timeout_s: float,
    ) -> None:
        self.spec = spec
        self.client = client
        self.load_timeout_s = load_timeout_s
        self.unload_timeout_s = unload_timeout_s
        self._tag: str | None = None

    @property
    def service(self) -> OllamaClient:
        """The shared client: probed, and its models outlive the manager."""
        return self.client

    @property
    def tag(self) -> str:
        """The Ollama model currently (or last) loaded for this managed model."""
        return self._tag or self.spec.name

    @property
    def keep_alive(self) -> str | int:
        """The ``keep_alive`` its loads send (the model's, else ``[ollama] keep_alive``)."""
        spec = self.spec.keep_alive
        return spec if spec is not None else self.client.settings.keep_alive

    async def load(self, target: Target, variant: str | None = None) -> LoadResult:
        self._tag = variant or self.spec.name
        keep_alive = self.keep_alive
        options: dict[str, Any] | None = None
        if not target.on_gpu:
            options = {"num_gpu": 0}
        elif not target.simulated and target.cuda_index:
            options = {"main_gpu": target.cuda_index}
        data = await self.client.generate_load(self.tag, keep_alive, options, self.load_timeout_s)
        if data.get("done") is not True:
            raise BackendError(f"Ollama did not confirm the load of {self.tag}: {data!r}")
        return await self._measure(target)

    async def _measure(self, target: Target) -> LoadResult:
        for running in await self.client.ps():
            if running.is_model(self.tag):
                vram = running.size_vram_bytes if target.on_gpu else 0
                if target.on_gpu and vram == 0 and target.simulated:
                    vram = running.size_bytes  # a fake or CPU-only Ollama behind a simulated GPU
                return LoadResult(vram_bytes=vram, size_bytes=running.size_bytes)
        raise BackendError(f"Ollama answered the load of {self.tag} but /api/ps does not list it")

    async def estimate_vram(self) -> int | None:
        """What the model should take, from ``/api/show`` and VRAMancer's estimator (weights
        at its quantization + KV cache + overhead); None when Ollama does not say enough."""
        data = await self.client.show(self.spec.name)
        details = data.get("details") or {}
        info = data.get("model_info") or {}
        params = info.get("general.parameter_count")
        try:
            count = int(params) if params else parse_params(str(details.get("parameter_size")))
            quant = str(details.get("quantization_level") or "f16")
            return estimate_memory(count, quant).total_bytes
        except (InvalidInput, ValueError):
            return None

    async def move(self, target: Target) -> LoadResult:
        raise BackendError("Ollama models cannot move in place; unload and load them")

    async def unload(self) -> None:
        """Ask Ollama to unload, then wait until ``/api/ps`` no longer lists the model (the
        caller's timeout bounds the wait)."""
        data = await self.client.generate_unload(self.tag, self.unload_timeout_s)
        if data.get("done") is not True:
            raise BackendError(f"Ollama did not confirm the unload of {self.tag}: {data!r}")
        while any(r.is_model(self.tag) for r in await self.client.ps()):
            await asyncio.sleep(UNLOAD_POLL_S)

    def handle(self) -> Any:
        return None

    def request_info(self) -> RequestInfo:
        """Ollama's endpoint, the tag loaded now (naming the full model while the smaller
        variant is active would make Ollama load it behind VRAMancer) and the ``keep_alive``
        (without one Ollama applies its own 5 minute default and may unload the model)."""
        return RequestInfo(self.client.settings.endpoint, self.tag, self.keep_alive)

    def find_running(self, running: Sequence[RunningModel]) -> RunningModel | None:
        present = {full_name(r.name): r for r in running} | {full_name(r.model): r for r in running}
        return present.get(full_name(self.tag))

    async def close(self) -> None:
        return None
