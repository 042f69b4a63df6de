"""The guard kills the daemon's task process groups when the daemon dies (SIGKILL included),
background children of a task too, and a guard that died is replaced at the next task with the
groups still running; a group whose main process ended is forgotten."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from vramancer.tasks.guard import Guard

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

#: A daemon in miniature: starts two tasks through the real spawn path (each a shell that
#: leaves a background ``sleep`` in its group), killing the guard between the two, then waits.
DAEMON = """
import asyncio, os, signal, sys, time
from pathlib import Path
from vramancer.tasks import runner

def request(tmp):
    return runner.RunRequest(
        argv=["sh", "-c", "sleep 60 & sleep 60"], cwd=Path(tmp), env={"PATH": "/usr/bin:/bin"},
        timeout_s=60, kill_grace_s=1, max_output_bytes=1000, tail_bytes=100,
        stdout_path=Path(tmp) / "out", stderr_path=Path(tmp) / "err",
    )

async def main():
    first = await runner.spawn(request(sys.argv[1]))
    os.kill(runner._GUARD.pid, signal.SIGKILL)  # a guard that dies is replaced
    time.sleep(0.2)
    second = await runner.spawn(request(sys.argv[1]))
    print(first.pid, second.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def members(pgid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of group ``pgid``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def wait_until(check: object, what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_the_task_groups_die_with_the_daemon_even_after_the_guard_died(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    daemon = subprocess.Popen(
        [sys.executable, "-c", DAEMON, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    groups: list[int] = []
    try:
        assert daemon.stdout is not None
        groups = [int(pid) for pid in daemon.stdout.readline().split()]
        assert len(groups) == 2
        for pgid in groups:  # the shell and its background sleep
            wait_until(lambda pgid=pgid: len(members(pgid)) >= 2, f"group {pgid} not started")
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(10)
        for pgid in groups:
            wait_until(lambda pgid=pgid: not members(pgid), f"group {pgid} outlived the daemon")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
        if daemon.stdout is not None:
            daemon.stdout.close()
        for pgid in groups:
            for proc in members(pgid):
                proc.kill()


def test_a_group_whose_task_ended_is_not_killed_when_the_guard_stops() -> None:
    guard = Guard()
    kept = subprocess.Popen(["sleep", "60"], start_new_session=True)
    killed = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        guard.register(kept.pid)
        guard.register(killed.pid)
        guard.unregister(kept.pid)
        guard.close()  # as if the daemon died: the guard reads the end of its input
        assert killed.wait(10) == -signal.SIGKILL
        assert kept.poll() is None
    finally:
        for proc in (kept, killed):
            proc.kill()
            proc.wait(10)
