"""Running a build or test step: a shell command in the checkout, its output in a log file.

A step runs in its own process group (a timeout kills the whole group) with the agent's
environment less its ``VRM_*`` variables (the daemon's token never reaches a build). A test
step with ``[release] vram`` set runs instead as a VRAMancer task on a GPU
(``TaskTester``): through the daemon's HTTP API (``ClientTester``, what the CLI uses) or its
task service directly (``ServiceTester``, inside the daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

from vramancer.release.records import StepResult

#: Environment variables of the agent with this prefix are not passed to steps.
PRIVATE_ENV_PREFIX = "VRM_"
#: Most seconds a killed step's group gets between SIGTERM and SIGKILL.
KILL_GRACE_S = 5.0


def step_env(environ: Mapping[str, str], release: str, checkout: Path) -> dict[str, str]:
    env = {k: v for k, v in environ.items() if not k.startswith(PRIVATE_ENV_PREFIX)}
    env["RELEASE_NAME"] = release
    env["RELEASE_DIR"] = str(checkout)
    return env


#: How often a running step looks at its stop event.
POLL_S = 0.2


class Stopped(Exception):
    """The agent was asked to stop (its daemon is shutting down): the step was killed."""


def run_shell(
    command: str,
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: Path,
    timeout_s: float,
    stop: threading.Event | None = None,
) -> StepResult:
    """Run ``command`` with ``sh -c`` in ``cwd``; stdout and stderr go to ``log``. ``stop``
    set: the step's process group is killed and ``Stopped`` raised."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"$ {command}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                ["/bin/sh", "-c", command],
                cwd=cwd,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as exc:
            return StepResult(error=f"could not start: {exc}")
        try:
            code = _wait(proc, started + timeout_s, stop)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out.write(f"\n[killed after {timeout_s:g} s]\n".encode())
            return StepResult(
                exit_code=proc.returncode,
                duration_s=round(time.monotonic() - started, 3),
                error=f"timed out after {timeout_s:g} s",
            )
        except BaseException:
            _kill_group(proc)
            raise
    return StepResult(exit_code=code, duration_s=round(time.monotonic() - started, 3))


def _wait(proc: subprocess.Popen[bytes], deadline: float, stop: threading.Event | None) -> int:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise subprocess.TimeoutExpired(proc.args, 0)
        try:
            return proc.wait(timeout=min(left, POLL_S))
        except subprocess.TimeoutExpired:
            if stop is not None and stop.is_set():
                raise Stopped("the agent is stopping") from None


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class TaskTester(Protocol):
    """Runs the test step as a VRAMancer task needing ``vram`` bytes on a GPU."""

    def run(
        self,
        command: str,
        *,
        cwd: Path,
        vram: int,
        timeout_s: float,
        log: Path,
        stop: threading.Event | None = None,
    ) -> StepResult: ...


def _write_task_log(log: Path, command: str, task_id: str, logs: Mapping[str, Any]) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as out:
        out.write(f"$ {command}   (VRAMancer task {task_id})\n")
        out.write(str(logs.get("stdout") or ""))
        err = str(logs.get("stderr") or "")
        if err:
            out.write(f"\n--- stderr ---\n{err}")


def step_task(command: str, cwd: Path, vram: int, timeout_s: float) -> dict[str, Any]:
    """The task body of a release's test step: ``command`` in the release, on a GPU with
    ``vram`` free, killed after ``timeout_s``, never retried (a flaky test is a failure)."""
    return {
        "type": "shell",
        "shell": command,
        "cwd": str(cwd),
        "vram": vram,
        "timeout": timeout_s,
        "max_retries": 0,
    }


class ClientTester:
    """The test step as a task of the daemon at ``VRM_URL`` (``vramancer.Client``)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def run(
        self,
        command: str,
        *,
        cwd: Path,
        vram: int,
        timeout_s: float,
        log: Path,
        stop: threading.Event | None = None,
    ) -> StepResult:
        started = time.monotonic()
        task_id = self.client.request(
            "POST",
            "/api/tasks/submit",
            json=step_task(command, cwd, vram, timeout_s),
        )["task_id"]
        status = self.client.wait(task_id, timeout_s=timeout_s + 60)
        _write_task_log(log, command, task_id, self.client.logs(task_id))
        return StepResult(
            exit_code=status.get("exit_code"),
            duration_s=round(time.monotonic() - started, 3),
            gpu=status.get("device"),
            task_id=task_id,
            error=status.get("error"),
        )


class ServiceTester:
    """The test step as a task of this daemon's task service, from the agent's thread
    (``loop`` is the daemon's event loop)."""

    def __init__(self, tasks: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.tasks = tasks
        self.loop = loop

    def run(
        self,
        command: str,
        *,
        cwd: Path,
        vram: int,
        timeout_s: float,
        log: Path,
        stop: threading.Event | None = None,
    ) -> StepResult:
        started = time.monotonic()
        future: Future[tuple[str, Any, dict[str, Any]]] = asyncio.run_coroutine_threadsafe(
            self._run(command, cwd, vram, timeout_s), self.loop
        )
        while True:
            try:
                task_id, record, logs = future.result(timeout=POLL_S)
                break
            except TimeoutError:
                if stop is not None and stop.is_set():
                    future.cancel()
                    raise Stopped("the agent is stopping") from None
        _write_task_log(log, command, task_id, logs)
        return StepResult(
            exit_code=record.exit_code,
            duration_s=round(time.monotonic() - started, 3),
            gpu=record.device,
            task_id=task_id,
            error=record.error,
        )

    async def _run(
        self, command: str, cwd: Path, vram: int, timeout_s: float
    ) -> tuple[str, Any, dict[str, Any]]:
        submitted = await self.tasks.submit(step_task(command, cwd, vram, timeout_s))
        await self.tasks.wait([submitted.task_id], timeout_s=timeout_s + 60)
        record = await self.tasks.status(submitted.task_id)
        logs: dict[str, Any] = await self.tasks.logs(submitted.task_id)
        return submitted.task_id, record, logs
