"""The warm Python runner: ``python -m vramancer.tasks.zygote SOCKET [MODULE ...]``.

A long-lived process that imports ``MODULE ...`` once (``torch``, a user's module: whatever
``[tasks] warm_preload`` lists) without touching CUDA, then serves one request per connection on
the Unix socket ``SOCKET``: a ``python`` task to run. For each it forks; the child becomes a
task process like any other — its own session and process group (``setsid``), dies when the
runner dies (``PR_SET_PDEATHSIG``), stdin from ``/dev/null``, stdout and stderr on the two pipe
ends the daemon passed with the request (``SCM_RIGHTS``), the task's working directory and
environment (``CUDA_VISIBLE_DEVICES`` is set before anything can initialise CUDA: the runner
never does), ``sys.path`` as ``python -m`` would give it (the working directory, then the task's
``PYTHONPATH``, then the runner's own) — and runs ``vramancer.tasks.pyrun``'s ``main``. The
task starts in a millisecond or two instead of paying an interpreter start and its imports.

Protocol, per connection: the daemon sends one JSON line with the two descriptors:
``{"target", "payload", "cwd", "env"}`` (a ``python`` task) or ``{"argv", "cwd", "env"}`` (a warm
``cmd`` task: ``SCRIPT ARG ...`` or ``-m MODULE ARG ...``, run as ``python`` would); the runner
answers ``{"pid": N}`` once the child exists (or ``{"error": "..."}``), then ``{"exit": CODE}``
when it ends (``-SIGNAL`` when a signal killed it).
The runner is one thread (it forks: no other thread may hold a lock at that moment); it notices
children ending through ``SIGCHLD`` on a self-pipe. It exits when the daemon closes its end of
the control pipe (standard input) or dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import importlib
import json
import os
import selectors
import signal
import socket
import sys
from typing import Any

#: Longest request line (target, payload, cwd, environment) the runner reads.
MAX_REQUEST_BYTES = 1024 * 1024
#: ``prctl`` option: the signal a process gets when its parent exits.
_PR_SET_PDEATHSIG = 1


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once in the runner (``find_library`` may run ``ldconfig``: a
    process per call), so a forked task finds it loaded."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def _die_with_parent() -> None:
    """SIGKILL this process when its parent exits (Linux), as the daemon's tasks do."""
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(AttributeError):
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _task_sys_path(cwd: str, env: dict[str, str], base: list[str]) -> list[str]:
    """``sys.path`` of ``python -m ...`` started in ``cwd`` with ``env``'s ``PYTHONPATH``."""
    extra = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    rest = [p for p in base if p not in ("", cwd)]
    return [cwd, *extra, *rest]


def _child(request: dict[str, Any], out_fd: int, err_fd: int, base_path: list[str]) -> int:
    """In the forked child: become the task process and run it; returns the exit code."""
    os.setsid()
    _die_with_parent()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    for fd in (devnull, out_fd, err_fd):
        if fd > 2:
            os.close(fd)
    env = {str(k): str(v) for k, v in request["env"].items()}
    os.environ.clear()
    os.environ.update(env)
    os.chdir(request["cwd"])
    sys.path[:] = _task_sys_path(request["cwd"], env, base_path)
    if "argv" in request:
        code = _run_python_argv([str(a) for a in request["argv"]])
    else:
        sys.argv = ["vramancer.tasks.pyrun", request["target"], request["payload"]]
        from vramancer.tasks import pyrun

        code = pyrun.main([request["target"], request["payload"]])
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def _run_python_argv(argv: list[str]) -> int:
    """Run ``SCRIPT ARG ...`` or ``-m MODULE ARG ...`` as ``python`` would (``__main__``,
    ``sys.argv``, the script's directory first on ``sys.path``); the exit code."""
    import runpy
    import traceback

    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = argv[0]
            if not os.path.exists(script):
                print(f"python: can't open file {script!r}: No such file", file=sys.stderr)
                return 2
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(script))
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        return _exit_code(exc.code)
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _exit_code(code: object) -> int:
    """The status ``sys.exit(code)`` ends a ``python`` process with."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


class Zygote:
    """The runner's loop: accept requests, fork children, report their ends."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.children: dict[int, socket.socket] = {}
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.base_path = list(sys.path)

    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "child")
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "stdin")
        while True:
            for key, _ in self.selector.select():
                if key.data == "accept":
                    self._accept()
                elif key.data == "child":
                    os.read(self.wake_r, 4096)
                    self._reap()
                elif not os.read(sys.stdin.fileno(), 4096):  # the daemon is gone
                    return

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        try:
            request, fds = self._read_request(conn)
        except (OSError, ValueError) as exc:
            self._answer(conn, {"error": f"bad request: {exc}"})
            conn.close()
            return
        pid = os.fork()
        if pid == 0:  # the child: never returns into the loop
            code = 1
            try:
                self.listener.close()
                conn.close()
                code = _child(request, fds[0], fds[1], self.base_path)
            finally:
                os._exit(code)
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        self._answer(conn, {"pid": pid})
        self._reap()  # a child that ended before we registered it

    @staticmethod
    def _read_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
        data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST_BYTES, 2)
        while not data.endswith(b"\n"):
            more = conn.recv(MAX_REQUEST_BYTES)
            if not more or len(data) + len(more) > MAX_REQUEST_BYTES:
                raise ValueError("request line too long or cut short")
            data += more
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise ValueError("expected two descriptors (stdout, stderr)")
        request = json.loads(data)
        argv = request.get("argv")
        needed = ("cwd", "env") if argv is not None else ("target", "payload", "cwd", "env")
        for key in needed:
            if key not in request:
                raise ValueError(f"missing {key!r}")
        if argv is not None and (not isinstance(argv, list) or not argv):
            raise ValueError("argv must be a non-empty list")
        return request, list(fds)

    @staticmethod
    def _answer(conn: socket.socket, message: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(message).encode() + b"\n")

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            self._answer(conn, {"exit": code})
            conn.close()


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m vramancer.tasks.zygote SOCKET [MODULE ...]", file=sys.stderr)
        return 2
    _die_with_parent()
    path, modules = argv[0], argv[1:]
    # What every child runs (and asyncio, which it imports) is imported once here, not per task.
    importlib.import_module("vramancer.tasks.pyrun")
    for name in modules:
        importlib.import_module(name)
    _libc()
    # Objects imported so far stay out of the collector's generations: a forked task's
    # collections then do not touch (and copy) the runner's pages.
    gc.freeze()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(64)
        print("ready", flush=True)
    except (BrokenPipeError, FileNotFoundError):
        # the daemon stopped (and its run directory went) while this runner started
        return 1
    Zygote(listener).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
