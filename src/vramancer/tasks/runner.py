"""Runs one task process: its own process group, bounded output capture, timeout and cancel.

A task owns the process group it starts in (``start_new_session``): on timeout or cancel the
whole group gets SIGTERM, then SIGKILL after ``kill_grace_s``; when the task's main process ends,
whatever is left of its group is killed too, so no child keeps a GPU busy after its task ended
and released its VRAM reservation. stdout and stderr are read through pipes: the first
``max_output_bytes`` of each go to a log file (created only when there is output), the last
``tail_bytes`` are kept for the database; anything beyond is counted and dropped. Log files
are private to the daemon's user (0600, in 0700 directories).

A task process dies with the daemon: its process group is listed with the guard
(``tasks/guard.py``), one small process per daemon that holds the other end of a pipe from the
daemon and SIGKILLs every listed group when that pipe closes, however the daemon died. The
whole group goes, so what the task started in the background goes too. That costs two short
pipe writes per task, where a parent-death signal (``prctl(PR_SET_PDEATHSIG)``) costs either one
more ``exec`` per task (util-linux's ``setpriv --pdeathsig KILL``) or a ``preexec_fn``, which
makes Python fork the whole daemon instead of using ``vfork``. Where the guard cannot start,
tasks fall back to the parent-death signal (``dying_with_parent``): through ``setpriv`` where it
is installed (the program is looked up first, as ``exec`` would, so a missing one is still an
``OSError`` at start), else a ``preexec_fn`` that calls ``prctl``; a daemon that died between
the fork and the ``prctl`` is noticed there (the parent pid changed) and the child kills itself.
That signal follows the *thread* that started the process: the spawner thread below lives as
long as the daemon.

Processes are started from one thread of their own (``in_spawner``), not from the event loop:
forking (even ``vfork``, which waits for the child's ``exec``) and the scratch directory's
creation block their caller for up to a millisecond or more per task, which the event loop then
spends on nothing else. That thread lives as long as the daemon (an idle worker of a one-thread
pool waits for work, it never exits). A process's end is noticed through a ``pidfd`` on the
event loop (Linux 5.3 and later), else by a thread that waits for it. Its start time (what tells
it from a later process with the same pid) is read when its ``running`` mark is written, not
right after the start, when reading ``/proc`` would wait for the ``exec``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, TypeVar

import psutil

from vramancer.files import open_private, private_dir
from vramancer.tasks.guard import Guard
from vramancer.tasks.warm import WarmProcess, WarmRunner, WarmUnavailable

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: The one thread that starts task processes and makes and removes their scratch directories.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vrm-spawn")


def to_spawner(func: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
    """``func(*args)`` handed to the spawner thread now (in order with every other call
    there); the future of its result."""
    return asyncio.get_running_loop().run_in_executor(_SPAWNER, func, *args)


async def in_spawner(func: Callable[..., _T], *args: Any) -> _T:
    """``func(*args)`` on the spawner thread (in order with every other call there)."""
    return await to_spawner(func, *args)


#: How long to wait for the pipes to close once the process group is gone.
DRAIN_TIMEOUT_S = 1.0
_READ_CHUNK = 65536


@dataclass(frozen=True, slots=True)
class RunRequest:
    argv: list[str]
    cwd: Path
    env: dict[str, str]
    timeout_s: float
    kill_grace_s: float
    max_output_bytes: int
    tail_bytes: int
    stdout_path: Path
    stderr_path: Path
    #: ``(module:function, payload JSON)`` of a ``python`` task: what a warm runner needs.
    python: tuple[str, str] | None = None
    #: A warm ``cmd`` task's interpreter arguments (``SCRIPT ...`` or ``-m MODULE ...``): the
    #: warm runner runs them; ``argv`` is the same command started cold.
    warm_argv: list[str] | None = None
    #: The attempt's scratch directory, created (private) on the spawner thread right before
    #: the start, in the same hop.
    scratch: Path | None = None


@dataclass(frozen=True, slots=True)
class RunResult:
    """How the process ended. ``exit_code`` is None when it never started or was killed."""

    exit_code: int | None
    timed_out: bool
    cancelled: bool
    stdout_tail: str
    stderr_tail: str
    output_bytes: int
    truncated: bool
    run_s: float
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.cancelled


class _Capture:
    """Reads one pipe: a bounded prefix to a file, a bounded tail in memory."""

    def __init__(self, path: Path, limit: int, tail_bytes: int) -> None:
        self.path = path
        self.limit = limit
        self.tail_bytes = tail_bytes
        self.written = 0
        self.total = 0
        self.tail = bytearray()
        self._file: BinaryIO | None = None

    def pump_pipe(self, pipe: IO[bytes]) -> asyncio.Future[None]:
        """Read ``pipe`` from the event loop's selector until its end (no transport, no
        stream: a reader callback per readable event); the future is done at the end of the
        pipe, which is then closed. Cancelling the future stops reading and closes it."""
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        fd = pipe.fileno()
        os.set_blocking(fd, False)

        def readable() -> None:
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            try:
                if chunk:
                    self.feed(chunk)
                    return
            except Exception as exc:
                if not ended.done():
                    ended.set_exception(exc)
                return
            if not ended.done():
                ended.set_result(None)

        def stop(_: asyncio.Future[None]) -> None:
            loop.remove_reader(fd)
            pipe.close()
            self.close()

        ended.add_done_callback(stop)
        loop.add_reader(fd, readable)
        return ended

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit - self.written
        if room > 0:
            part = chunk[:room]
            if self._file is None:
                private_dir(self.path.parent)
                self._file = os.fdopen(open_private(self.path), "wb")
            self._file.write(part)
            self._file.flush()  # followers (``vramancer watch``) read the file as it grows
            self.written += len(part)
        self.tail += chunk
        if len(self.tail) > self.tail_bytes:
            del self.tail[: len(self.tail) - self.tail_bytes]

    def close(self) -> None:
        if self._file is not None:
            dropped = self.total - self.written
            if dropped > 0:
                self._file.write(f"\n[vramancer: {dropped} more bytes dropped]\n".encode())
            self._file.close()
            self._file = None

    @property
    def truncated(self) -> bool:
        return self.total > self.written

    def text(self) -> str:
        return bytes(self.tail).decode("utf-8", errors="replace")


#: ``prctl`` option: the signal a process gets when the thread that created it exits.
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl: Callable[..., int] = libc.prctl
    except (OSError, AttributeError):
        return None
    return prctl


#: Resolved once, in the parent: the child after ``fork`` only calls it.
_PRCTL = _load_prctl()


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child die (SIGKILL) when this process dies; None where
    the platform has no such thing."""
    prctl = _PRCTL
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the daemon died before the prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def _find_setpriv() -> str | None:
    """util-linux's ``setpriv`` when it knows ``--pdeathsig`` (util-linux 2.33 and later)."""
    if _PRCTL is None:
        return None
    path = shutil.which("setpriv")
    if path is None:
        return None
    try:
        probe = subprocess.run(
            [path, "--pdeathsig", "KILL", "--", "true"], capture_output=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return path if probe.returncode == 0 else None


@functools.cache
def setpriv() -> str | None:
    """The ``setpriv`` that starts tasks (looked up once, from the daemon's own ``PATH``)."""
    return _find_setpriv()


def find_program(program: str, env: Mapping[str, str], cwd: str | os.PathLike[str] | None) -> str:
    """``program`` as ``exec`` would find it: a path (relative to ``cwd``) as it is, a bare name
    on the task's ``PATH``; ``FileNotFoundError`` when there is no such executable."""
    if os.sep in program:
        found = os.path.join(cwd, program) if cwd is not None else program
        if os.path.isfile(found) and os.access(found, os.X_OK):
            return program
    else:
        base = os.fspath(cwd) if cwd is not None else os.getcwd()
        # relative PATH entries (and an empty one: the working directory) are the task's cwd's
        dirs = [os.path.join(base, d) for d in env.get("PATH", os.defpath).split(os.pathsep)]
        hit = shutil.which(program, path=os.pathsep.join(dirs))
        if hit is not None:
            return hit
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


def dying_with_parent(
    argv: Sequence[str], env: Mapping[str, str], cwd: str | os.PathLike[str] | None
) -> tuple[list[str], Callable[[], None] | None]:
    """The argv and ``preexec_fn`` that start ``argv`` so that it dies with this process:
    through ``setpriv`` where it is installed, else with a ``preexec_fn`` (see the module
    docstring); as they are where the platform has no parent-death signal."""
    wrapper = setpriv()
    if wrapper is None:
        return list(argv), die_with_parent()
    program = find_program(argv[0], env, cwd)
    return [wrapper, "--pdeathsig", "KILL", "--", program, *argv[1:]], None


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Send ``sig`` to process group ``pgid``; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


#: Seconds the boot time read from ``/proc/stat`` is kept (it is a whole second, and only
#: changes when the wall clock is set).
_BOOT_TIME_TTL_S = 60.0
_boot_time: tuple[float, float] | None = None  # (read at, monotonic), boot time


def _linux_boot_time() -> float:
    """``btime`` of ``/proc/stat`` (as psutil reads it), cached ``_BOOT_TIME_TTL_S``."""
    global _boot_time
    now = time.monotonic()
    if _boot_time is None or now - _boot_time[0] > _BOOT_TIME_TTL_S:
        _boot_time = (now, float(psutil.boot_time()))
    return _boot_time[1]


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_start_time(pid: int) -> float | None:
    """The start time of ``pid`` (to recognise it later, not a reused pid), or None.

    On Linux read straight from ``/proc/PID/stat`` (the same figure as psutil's
    ``create_time``, without building a ``psutil.Process``), elsewhere through psutil."""
    if sys.platform.startswith("linux"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            # the fields after the command name (in parentheses, which may hold spaces)
            ticks = int(stat[stat.rfind(b")") + 2 :].split()[19])
        except (OSError, ValueError, IndexError):
            return None
        return ticks / _CLOCK_TICKS + _linux_boot_time()
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError):
        return None


def kill_orphan(pid: int, started: float | None, task_id: str | None = None) -> bool:
    """Kill the process group a dead daemon left running, if ``pid`` is still that process.

    When the group's leader is gone (it died with the daemon) but processes it started live on
    in its group, those are killed when they carry the task's ``VRM_TASK_ID`` (``task_id``):
    a process group id is not reused while a member lives, and the variable tells the task's
    processes from anyone else's."""
    if started is None:
        return False
    now_started = process_start_time(pid)
    if now_started is not None and abs(now_started - started) <= 0.01:
        return kill_group(pid)
    if now_started is not None or task_id is None:
        return False  # the pid is someone else's now, or nothing says which processes are ours
    return _kill_leftovers(pid, task_id) > 0


def _kill_leftovers(pgid: int, task_id: str) -> int:
    """SIGKILL the members of group ``pgid`` whose environment has ``VRM_TASK_ID=task_id``."""
    killed = 0
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) != pgid or proc.environ().get("VRM_TASK_ID") != task_id:
                continue
            proc.kill()
        except (psutil.Error, OSError):
            continue
        killed += 1
    return killed


class SpawnedProcess:
    """A task process started on the spawner thread, seen from the event loop: the face of an
    ``asyncio.subprocess.Process`` that ``ProcessRun`` uses."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        assert popen.stdout is not None and popen.stderr is not None
        self.pid = popen.pid
        #: Its output pipes, read straight from the selector (``_Capture.pump_pipe``).
        self.stdout_pipe: IO[bytes] = popen.stdout
        self.stderr_pipe: IO[bytes] = popen.stderr
        self.returncode: int | None = None
        self._popen = popen
        self._exited = _watch_exit(popen)

    async def wait(self) -> int:
        if self.returncode is None:
            await asyncio.shield(self._exited)
            _unguard(self.pid)
            self.returncode = self._popen.wait()  # already ended: reaps it at once
        return self.returncode


def _watch_exit(popen: subprocess.Popen[bytes]) -> asyncio.Future[None]:
    """A future done when ``popen`` has ended (not yet reaped, with a ``pidfd``)."""
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def done() -> None:
        if not exited.done():
            exited.set_result(None)

    try:
        pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):  # no pidfd here: a thread waits for it instead
        threading.Thread(
            target=lambda: (popen.wait(), loop.call_soon_threadsafe(done)),
            name=f"vrm-wait-{popen.pid}",
            daemon=True,
        ).start()
        return exited

    def readable() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        done()

    loop.add_reader(pidfd, readable)
    return exited


#: Kills the task process groups when the daemon dies (``tasks/guard.py``); None: that guard
#: could not be started here, each task dies with the daemon by ``dying_with_parent``.
_GUARD: Guard | None = Guard() if os.name == "posix" else None


def _guarded() -> Guard | None:
    """The guard, started if need be (on the spawner thread); None when it cannot run."""
    global _GUARD
    guard = _GUARD
    if guard is None:
        return None
    try:
        guard.ensure()
    except OSError:
        log.warning("the task guard cannot start; tasks die with the daemon by prctl instead")
        _GUARD = None
        return None
    return guard


class ScratchUnavailable(RuntimeError):
    """The scratch directory could not be created (not the program's fault: no ``OSError``,
    which would say the program cannot start)."""


def make_scratch(req: RunRequest) -> None:
    """On the spawner thread: the attempt's scratch directory, private."""
    if req.scratch is not None:
        try:
            private_dir(req.scratch)
        except OSError as exc:
            raise ScratchUnavailable(f"cannot create the scratch directory: {exc}") from exc


def _popen(req: RunRequest) -> subprocess.Popen[bytes]:
    """On the spawner thread: make the scratch directory, start the process."""
    make_scratch(req)
    guard = _guarded()
    if guard is not None:
        argv, preexec = list(req.argv), None
    else:
        argv, preexec = dying_with_parent(req.argv, req.env, req.cwd)
    popen = subprocess.Popen(
        argv,
        cwd=req.cwd,
        env=req.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=preexec,
    )
    if guard is not None:
        try:
            guard.register(popen.pid)
        except OSError:  # no guard any more: the task must not run unguarded
            kill_group(popen.pid)
            popen.wait()
            raise
    return popen


def _guard_group(pgid: int) -> None:
    """List a warm task's process group with the guard, as a cold task's is: it is the warm
    runner's child, not ours, and dies with the runner (parent-death signal), but what it
    started in the background dies with the daemon only through the guard."""
    guard = _guarded()
    if guard is None:
        return
    try:
        guard.register(pgid)
    except OSError as exc:
        log.warning("task group %d not listed with the guard: %s", pgid, exc)


def _unguard(pid: int) -> None:
    """The task's main process ended (not reaped yet): the guard forgets its group."""
    if _GUARD is not None:
        _GUARD.unregister(pid)


def _kill_started(starting: asyncio.Future[subprocess.Popen[bytes]]) -> None:
    if not starting.cancelled() and starting.exception() is None:
        popen = starting.result()
        kill_group(popen.pid)
        _unguard(popen.pid)
        threading.Thread(target=popen.wait, daemon=True).start()  # reap it


async def spawn(req: RunRequest) -> SpawnedProcess:
    """Start ``req``'s process from the spawner thread; ``OSError`` when it cannot start."""
    starting = to_spawner(_popen, req)
    try:
        popen = await asyncio.shield(starting)
    except asyncio.CancelledError:  # it starts anyway, on the thread: it must not live on
        starting.add_done_callback(_kill_started)
        raise
    return SpawnedProcess(popen)


class ProcessRun:
    """One task process. ``await start()``, then ``await wait()``; ``cancel()`` from anywhere.

    With a ``warm`` runner a ``python`` task is forked from it (``tasks/warm.py``) instead of
    starting an interpreter; everything after the start is the same."""

    def __init__(self, request: RunRequest, warm: WarmRunner | None = None) -> None:
        self.request = request
        self.warm = warm
        self.pid: int | None = None
        self._started_at: float | None = None
        #: The main process ended (it may be reaped: its pid says nothing any more).
        self.exited = False
        self._proc: SpawnedProcess | WarmProcess | None = None
        self._cancelled = False
        #: Wakes :meth:`wait` when the task is cancelled (set while it waits).
        self._on_cancel: Callable[[], None] | None = None
        self._t0 = 0.0
        self._out = _Capture(request.stdout_path, request.max_output_bytes, request.tail_bytes)
        self._err = _Capture(request.stderr_path, request.max_output_bytes, request.tail_bytes)

    async def start(self) -> None:
        """Start the process; raises ``OSError`` when it cannot (missing program, bad cwd)."""
        req = self.request
        self._t0 = time.monotonic()
        if self.warm is not None and (req.python is not None or req.warm_argv is not None):
            await in_spawner(make_scratch, req)
            try:
                self._proc = await self.warm.spawn(req)
            except WarmUnavailable as exc:
                log.debug("python task started cold: %s", exc)
            else:
                self.pid = self._proc.pid
                _guard_group(self.pid)
                return
        self._proc = await spawn(req)
        self.pid = self._proc.pid

    @property
    def started_at(self) -> float | None:
        """When the process started, as the system records it (``process_start_time``): what
        tells it from a later process with the same pid. Read when first asked (its ``running``
        mark), not at the start: right after the start the process is still in ``exec``, and
        reading ``/proc`` then waits for it. None once it ended."""
        if self._started_at is None and self.pid is not None and not self.exited:
            self._started_at = process_start_time(self.pid)
        return self._started_at

    def cancel(self) -> None:
        self._cancelled = True
        if self._on_cancel is not None:
            self._on_cancel()

    async def wait(self) -> RunResult:
        proc = self._proc
        if proc is None:
            raise RuntimeError("wait() before start()")
        pumps = [self._out.pump_pipe(proc.stdout_pipe), self._err.pump_pipe(proc.stderr_pipe)]
        timed_out = cancelled = False
        exited = asyncio.ensure_future(proc.wait())
        await self._exit_cancel_or_timeout(exited)
        if not exited.done():
            cancelled = self._cancelled
            timed_out = not cancelled
            await self._terminate(exited)
        # The main process is gone: whatever is left of its group goes too.
        self.exited = True
        kill_group(proc.pid)
        if isinstance(proc, WarmProcess):
            _unguard(proc.pid)
        await self._drain(pumps)
        exit_code = proc.returncode
        return RunResult(
            exit_code=None if (timed_out or cancelled) else exit_code,
            timed_out=timed_out,
            cancelled=cancelled,
            stdout_tail=self._out.text(),
            stderr_tail=self._err.text(),
            output_bytes=self._out.total + self._err.total,
            truncated=self._out.truncated or self._err.truncated,
            run_s=time.monotonic() - self._t0,
            error=(
                f"timed out after {self.request.timeout_s:g} s; process group killed"
                if timed_out
                else ("cancelled" if cancelled else None)
            ),
        )

    async def _exit_cancel_or_timeout(self, exited: asyncio.Future[int]) -> None:
        """Until the process exits, the task is cancelled or its timeout passes (one future
        and a timer: no task per wait)."""
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[None] = loop.create_future()

        def wake(*_: object) -> None:
            if not woken.done():
                woken.set_result(None)

        exited.add_done_callback(wake)
        timer = loop.call_later(self.request.timeout_s, wake)
        self._on_cancel = wake
        try:
            if self._cancelled:
                wake()
            await woken
        finally:
            self._on_cancel = None
            timer.cancel()
            exited.remove_done_callback(wake)

    async def _terminate(self, exited: asyncio.Future[int]) -> None:
        assert self._proc is not None
        pgid = self._proc.pid
        kill_group(pgid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(exited), self.request.kill_grace_s)
        kill_group(pgid, signal.SIGKILL)
        await exited

    async def _drain(self, pumps: Sequence[asyncio.Future[None]]) -> None:
        if all(pump.done() for pump in pumps):  # the pipes closed with the process: no wait
            pending: set[asyncio.Future[None]] = set()
        else:
            _, pending = await asyncio.wait(pumps, timeout=DRAIN_TIMEOUT_S)
        for pump in pending:  # a process that left the group still holds the pipe
            pump.cancel()
        for pump in pumps:
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        self._out.close()
        self._err.close()
