"""A model server started as a command: its own process group, ready when its health URL
answers 2xx, stopped by signalling the whole group (SIGTERM, then SIGKILL after a grace).

``{port}`` in the command, the health URL or the environment is replaced by a free TCP port
picked at each start (an OpenAI-compatible server the model gateway starts on demand:
``command = ["vllm", "serve", "m", "--port", "{port}"]``, ``health_url =
"http://127.0.0.1:{port}/health"``); the server's base URL (the health URL's scheme and
host) is what ``request_info`` gives requests.

The command sees ``CUDA_VISIBLE_DEVICES`` set to the GPU it was placed on (empty on the CPU
and on a simulated GPU, so nothing touches a real GPU), plus the model's ``env``. Its output
goes to a bounded in-memory tail, quoted when it exits before it is healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from vramancer.models.backends.base import (
    BackendService,
    LoadResult,
    RequestInfo,
    RunningModel,
    Target,
)
from vramancer.models.errors import BackendError
from vramancer.models.settings import ModelSpec
from vramancer.models.types import BackendKind

#: Pause between two health probes.
HEALTH_POLL_S = 0.05
#: Lines of the server's output kept for error messages.
TAIL_LINES = 20
#: Replaced by a free port in the command, the health URL and the environment.
PORT = "{port}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ProcessModel:
    """One model-server process."""

    kind = BackendKind.PROCESS
    can_move = False
    reload_on_cpu = False
    service: BackendService | None = None

    def __init__(self, spec: ModelSpec, *, stop_grace_s: float = 5.0) -> None:
        self.spec = spec
        self.stop_grace_s = stop_grace_s
        self._proc: asyncio.subprocess.Process | None = None
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._reader: asyncio.Task[None] | None = None
        #: The port of the running server when the command names ``{port}``.
        self.port: int | None = None
        self._health_url = spec.health_url or ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def load(self, target: Target, variant: str | None = None) -> LoadResult:
        if self.alive():
            await self.unload()
        command = list(self.spec.command or [])
        templates = [*command, self.spec.health_url or "", *self.spec.env.values()]
        self.port = _free_port() if any(PORT in t for t in templates) else None
        env = dict(os.environ)
        env.update({k: self._fill(v) for k, v in self.spec.env.items()})
        visible = "" if not target.on_gpu or target.simulated else str(target.cuda_index or 0)
        env["CUDA_VISIBLE_DEVICES"] = visible
        command = [self._fill(arg) for arg in command]
        self._health_url = self._fill(self.spec.health_url or "")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *command,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            raise BackendError(f"cannot start {command[0]!r}: {exc}") from None
        self._tail.clear()
        self._reader = asyncio.create_task(self._read_output(self._proc))
        try:
            await self._wait_healthy(self._proc)
        except BaseException:
            await self._kill_group()
            raise
        return LoadResult(vram_bytes=None)

    async def _read_output(self, proc: asyncio.subprocess.Process) -> None:
        if proc.stdout is None:
            return
        async for line in proc.stdout:
            self._tail.append(line.decode(errors="replace").rstrip())

    async def _wait_healthy(self, proc: asyncio.subprocess.Process) -> None:
        url = self._health_url
        async with httpx.AsyncClient(timeout=1.0) as client:
            while True:
                if proc.returncode is not None:
                    await asyncio.sleep(0)  # let the reader catch the last lines
                    tail = " | ".join(self._tail)
                    raise BackendError(
                        f"{self.spec.name}: the server exited with {proc.returncode} before "
                        f"{url} answered" + (f"; output: {tail}" if tail else "")
                    )
                with contextlib.suppress(httpx.TransportError):
                    response = await client.get(url)
                    if response.is_success:
                        return
                await asyncio.sleep(HEALTH_POLL_S)

    async def move(self, target: Target) -> LoadResult:
        raise BackendError("a model server process cannot move; stop it and start it again")

    async def unload(self) -> None:
        await self._kill_group()

    async def _kill_group(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), self.stop_grace_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        else:  # the leader is gone; children of the group may be left
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    def handle(self) -> Any:
        return self._proc

    def _fill(self, text: str) -> str:
        return text.replace(PORT, str(self.port)) if self.port is not None else text

    def request_info(self) -> RequestInfo:
        """The server's base URL (``http://host:port`` of its health URL) while it runs."""
        if not self.alive():
            return RequestInfo()
        parts = urlsplit(self._health_url)
        return RequestInfo(endpoint=f"{parts.scheme}://{parts.netloc}", model=self.spec.name)

    def find_running(self, running: Sequence[RunningModel]) -> RunningModel | None:
        return None

    async def estimate_vram(self) -> int | None:
        return None

    async def close(self) -> None:
        await self._kill_group()
