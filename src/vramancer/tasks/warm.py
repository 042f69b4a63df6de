"""The daemon's side of the warm Python runner (``tasks/zygote.py``): start it, hand it tasks.

``WarmRunner.spawn(request)`` asks the runner to fork a ``python`` task (or a warm ``cmd`` task)
and answers a ``WarmProcess``: the same face as a cold process for ``ProcessRun`` (``pid``,
``stdout_pipe``, ``stderr_pipe``, ``wait()``, ``returncode``), so timeouts, cancel, the
process-group kill and output capture are the cold path's, and its process group is listed with
the guard (``tasks/guard.py``) as a cold task's: what it starts in the background dies with the
daemon. The runner starts with the first ``python`` task (or at the task service's start,
``prestart``), lives in ``<data_dir>/run/`` (a private directory), dies with the daemon (the
parent-death signal and the end of its standard input) and is started again after it died.
When it cannot be used, ``spawn`` raises ``WarmUnavailable`` and the task starts cold, as
``python -m vramancer.tasks.pyrun``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from vramancer.files import private_dir

if TYPE_CHECKING:
    from vramancer.tasks.runner import RunRequest

log = logging.getLogger(__name__)

#: How long the runner may take to import its modules and listen (``import torch``: seconds).
START_TIMEOUT_S = 120.0
#: After a failed start, tasks start cold for this long before the runner is tried again.
RETRY_AFTER_S = 60.0


class WarmUnavailable(Exception):
    """The warm runner cannot take this task; start it cold."""


class Control:
    """One task's connection to the runner: its answers, a JSON line each, read from the event
    loop's selector (no transport, no stream)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._buffer = b""
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            data = self._sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self._buffer += data
        else:
            self._ended = True
            self._loop.remove_reader(self._sock.fileno())
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def readline(self) -> bytes:
        """The next line (b"" once the runner closed the connection)."""
        while b"\n" not in self._buffer and not self._ended:
            self._waiter = self._loop.create_future()
            await self._waiter
        line, newline, self._buffer = self._buffer.partition(b"\n")
        return line + newline

    def close(self) -> None:
        if not self._ended:
            self._ended = True
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


class WarmProcess:
    """A task process forked by the warm runner (not a child of the daemon)."""

    def __init__(
        self, pid: int, control: Control, stdout_pipe: IO[bytes], stderr_pipe: IO[bytes]
    ) -> None:
        self.pid = pid
        #: Its output pipes, read straight from the selector, as a cold process's.
        self.stdout_pipe = stdout_pipe
        self.stderr_pipe = stderr_pipe
        self.returncode: int | None = None
        self._control = control

    async def wait(self) -> int:
        """The exit code (``-SIGNAL`` when killed), once the runner reports the end."""
        if self.returncode is None:
            line = await self._control.readline()
            self._control.close()
            try:
                self.returncode = int(json.loads(line)["exit"])
            except (ValueError, KeyError, TypeError):
                # the runner died with the task: its children die with it (parent-death signal)
                self.returncode = -9
        return self.returncode


class WarmRunner:
    """One warm runner for this daemon (no CUDA state in it, so it serves every GPU)."""

    def __init__(self, run_dir: Path, preload: Sequence[str]) -> None:
        self.run_dir = run_dir
        self.preload = list(preload)
        self.socket_path = run_dir / "warm-python.sock"
        self._proc: asyncio.subprocess.Process | None = None
        self._starting: asyncio.Lock | None = None
        #: ``time.monotonic()`` of the last failed start, and why it failed.
        self._failed: tuple[float, str] | None = None

    async def start(self) -> None:
        """Start the runner unless it runs; raises ``WarmUnavailable`` when it cannot start."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._proc is not None and self._proc.returncode is None:
                return
            if self._failed is not None and time.monotonic() - self._failed[0] < RETRY_AFTER_S:
                raise WarmUnavailable(self._failed[1])
            try:
                self._proc = await self._launch()
            except WarmUnavailable as exc:
                self._failed = (time.monotonic(), str(exc))
                log.warning("%s; python tasks start cold for %g s", exc, RETRY_AFTER_S)
                raise
            self._failed = None

    async def _launch(self) -> asyncio.subprocess.Process:
        from vramancer.tasks.runner import dying_with_parent

        private_dir(self.run_dir)
        argv = [sys.executable, "-m", "vramancer.tasks.zygote", str(self.socket_path)]
        argv, preexec = dying_with_parent([*argv, *self.preload], os.environ, None)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
            preexec_fn=preexec,
        )
        assert proc.stdout is not None
        try:
            ready = await asyncio.wait_for(proc.stdout.readline(), START_TIMEOUT_S)
        except TimeoutError:
            ready = b""
        if ready.strip() != b"ready":
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise WarmUnavailable(
                f"the warm Python runner did not start (exit {proc.returncode}; "
                f"[tasks] warm_preload = {self.preload!r})"
            )
        log.info("warm Python runner started (pid %d, preloaded: %s)", proc.pid, self.preload)
        return proc

    async def spawn(self, request: RunRequest) -> WarmProcess:
        """Fork ``request`` (a ``python`` task, or a warm ``cmd`` task) from the runner."""
        if request.python is None and request.warm_argv is None:
            raise WarmUnavailable("not a python task")
        if not request.cwd.is_dir():  # what exec would say for a missing working directory
            raise FileNotFoundError(2, "No such file or directory", str(request.cwd))
        await self.start()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            control = self._send(request, [out_w, err_w])
        except OSError as exc:
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            raise WarmUnavailable(f"warm runner unreachable: {exc}") from exc
        os.close(out_w)
        os.close(err_w)
        stdout, stderr = os.fdopen(out_r, "rb", 0), os.fdopen(err_r, "rb", 0)
        answer: dict[str, Any] = {}
        try:
            answer = _parse(await control.readline())
        finally:
            if "pid" not in answer:  # no process to follow: its ends go
                for end in (control, stdout, stderr):
                    end.close()
        if "pid" not in answer:
            raise WarmUnavailable(str(answer.get("error", "the warm runner did not answer")))
        return WarmProcess(int(answer["pid"]), control, stdout, stderr)

    def _send(self, request: RunRequest, fds: list[int]) -> Control:
        body: dict[str, Any] = {"cwd": str(request.cwd), "env": request.env}
        if request.python is not None:
            body["target"], body["payload"] = request.python
        else:
            body["argv"] = request.warm_argv
        line = json.dumps(body).encode()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(5.0)
            sock.connect(str(self.socket_path))
            socket.send_fds(sock, [line + b"\n"], fds)
        except OSError:
            sock.close()
            raise
        return Control(sock)

    async def stop(self) -> None:
        """Stop the runner (closing its standard input ends it; its tasks die with it)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 5.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _parse(line: bytes) -> dict[str, Any]:
    try:
        answer = json.loads(line)
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}
