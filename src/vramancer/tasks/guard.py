"""The guard: one small process per daemon that kills the daemon's task process groups when the
daemon dies.

A task process must not outlive the daemon that started it (it would keep a GPU busy that the
next daemon believes free). The parent-death signal (``prctl(PR_SET_PDEATHSIG)``) does that,
but setting it costs a second ``exec`` per task (``setpriv``) or a full ``fork`` of the daemon
(a ``preexec_fn``): a millisecond or more of CPU per task. The guard does it once for all of
them: the daemon starts it at its first task (``python -I -S guard.py``: the standard library
only, nothing of the daemon's), writes ``+PGID`` to its standard input when a task's process
group starts and ``-PGID`` when its main process ended, and holds the write end of that pipe.
When the daemon dies, however it dies (SIGKILL included), the kernel closes that end: the guard
reads the end of its input and sends SIGKILL to every group still listed, then exits. It kills
the whole group, so what a task started in the background goes too. A daemon that closes the
pipe itself (``Guard.close``) gets the same: whatever still runs is killed.

The guard starts in its own session (no terminal signal reaches it) and ignores SIGINT and
SIGTERM aimed at it; if it dies anyway, the daemon starts another at its next task and gives it
the groups still listed (``Guard.register``).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading

#: Longest line the guard accepts ("+" or "-", a process group id, a newline).
_MAX_LINE = 32


def main() -> None:
    """The guard's loop (run as a script: the standard library only)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    groups: set[int] = set()
    pending = b""
    while True:
        try:
            chunk = os.read(0, 65536)
        except InterruptedError:
            continue
        except OSError:
            chunk = b""
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        if len(pending) > _MAX_LINE:
            pending = b""
        for line in lines:
            try:
                pgid = int(line[1:])
            except ValueError:
                continue
            if pgid <= 1:
                continue
            if line[:1] == b"+":
                groups.add(pgid)
            elif line[:1] == b"-":
                groups.discard(pgid)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            continue


class Guard:
    """The daemon's side: starts the guard process, tells it which groups to kill."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._groups: set[int] = set()
        self._exit_hook = False

    def _start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            bufsize=0,
        )
        if self._proc is None and not self._exit_hook:
            atexit.register(self.close)  # a clean exit stops it too (no process left behind)
            self._exit_hook = True
        self._proc = proc
        if self._groups:
            self._send(proc, "".join(f"+{pgid}\n" for pgid in self._groups).encode())
        return proc

    @staticmethod
    def _send(proc: subprocess.Popen[bytes], data: bytes) -> None:
        assert proc.stdin is not None
        os.write(proc.stdin.fileno(), data)

    def ensure(self) -> None:
        """Start the guard unless it runs; ``OSError`` when it cannot start."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._start()

    def register(self, pgid: int) -> None:
        """A task's process group started: the guard kills it if the daemon dies.
        ``OSError`` when no guard can be started."""
        with self._lock:
            self._groups.add(pgid)
            proc = self._proc
            if proc is None or proc.poll() is not None:
                self._start()  # it gets every listed group, this one included
                return
            try:
                self._send(proc, f"+{pgid}\n".encode())
            except OSError:  # the guard died since: a new one gets the whole list
                self._start()

    def unregister(self, pgid: int) -> None:
        """The group's main process ended (and is not reaped yet: its id cannot be reused)."""
        with self._lock:
            self._groups.discard(pgid)
            proc = self._proc
            if proc is None:
                return
            # a dead guard: the next register starts another, without this group
            with contextlib.suppress(OSError):
                self._send(proc, f"-{pgid}\n".encode())

    def close(self) -> None:
        """Stop the guard; it kills the groups still listed."""
        with self._lock:
            proc, self._proc = self._proc, None
            self._groups.clear()
        if proc is not None:
            assert proc.stdin is not None
            proc.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

    @property
    def pid(self) -> int | None:
        """The guard process's id (None before the first task)."""
        return None if self._proc is None else self._proc.pid


if __name__ == "__main__":
    main()
