"""``vramancer validate``: the end-to-end self-test of the task scheduler, run against a live
server: it passes only when every step below does, and prints PASS or FAIL with the reason.

Each step submits real tasks through the HTTP API and checks what comes back: a ``cmd`` task
sees ``VRM_TASK_ID``, the right ``CUDA_VISIBLE_DEVICES`` for its device and a scratch working
directory, and its output is in its logs; an exit code fails a task without retries; a retried
task succeeds on its second attempt; a timeout kills the task's process tree (checked on this
machine when the server is local); a running task can be cancelled; an idempotency key returns
the same task; a GPU that does not exist is refused with nothing queued; a ``noop`` maintenance
task runs once the machine is idle (on a host kept busy, the daemon runs it anyway after
``[tasks] maintenance_max_wait_s``: the step waits that long, plus its timeout). The first
failing step stops the test with its reason.

While the noop waits, the reason comes from the server (``GET /api/tasks/stats``,
``maintenance.reason``: a busy CPU or GPU, user tasks), so a failure on a busy host says what
it waited for. Whatever happens, the tasks this run submitted and that have not ended are
cancelled before it returns: a failed or interrupted validation leaves nothing queued.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

import httpx

_TERMINAL = {"done", "failed", "cancelled"}


class StepFailed(Exception):
    """A step's check did not hold; the message is the reason printed after FAIL."""


class _Client:
    def __init__(self, url: str, token: str | None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url
        self.http = httpx.Client(base_url=url, headers=headers, timeout=30.0)
        #: Every task this run submitted, to cancel what has not ended at the end.
        self.submitted: list[str] = []

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise StepFailed(f"cannot reach {self.url}: {exc.__class__.__name__}") from exc

    def ok(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.call(method, path, **kwargs)
        if response.status_code >= 400:
            raise StepFailed(f"{method} {path} answered {response.status_code}: {response.text}")
        return response.json()

    def submit(self, body: dict[str, Any]) -> str:
        task_id: str = self.ok("POST", "/api/tasks/submit", json=body)["task_id"]
        if task_id not in self.submitted:
            self.submitted.append(task_id)
        return task_id

    def clean_up(self) -> list[str]:
        """Cancel the tasks this run submitted that have not ended; returns their ids."""
        cancelled = []
        for task_id in self.submitted:
            try:
                response = self.http.post(f"/api/tasks/{task_id}/cancel")
            except httpx.TransportError:
                break
            if response.status_code == 200:
                cancelled.append(task_id)
        return cancelled

    def maintenance_window(self) -> dict[str, Any]:
        """What the server says of maintenance tasks (``reason`` they wait, ``max_wait_s``);
        empty when it does not say."""
        try:
            response = self.http.get("/api/tasks/stats")
            window = response.json().get("maintenance") or {}
        except (httpx.TransportError, ValueError, AttributeError):
            return {}
        return window if isinstance(window, dict) else {}

    def status(self, task_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.ok("GET", "/api/tasks/status", params={"task_id": task_id})
        return result

    def wait(
        self, task_id: str, timeout_s: float, until: Callable[[dict[str, Any]], bool] | None = None
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status(task_id)
            if until(status) if until else status["state"] in _TERMINAL:
                return status
            if time.monotonic() > deadline:
                raise StepFailed(
                    f"task {task_id} still {status['state']} after {timeout_s:.0f} s"
                    + (f" ({status['error']})" if status.get("error") else "")
                )
            time.sleep(0.1)


def _expect(condition: bool, reason: str) -> None:
    if not condition:
        raise StepFailed(reason)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


class _Validation:
    def __init__(self, client: _Client, step_timeout_s: float) -> None:
        self.c = client
        self.timeout = step_timeout_s
        self.run_id = uuid.uuid4().hex[:8]
        self.noop_id = ""
        self.noop_queued_at = time.monotonic()
        self.devices: dict[int, dict[str, Any]] = {}

    def health(self) -> None:
        self.c.ok("GET", "/healthz")
        report = self.c.ok("GET", "/v1/devices")
        self.devices = {d["index"]: d for d in report.get("devices", [])}

    def submit_noop(self) -> None:
        body = {"type": "noop", "idempotency_key": f"validate-{self.run_id}-noop"}
        self.noop_id = self.c.submit(body)
        self.noop_queued_at = time.monotonic()

    def cmd_environment(self) -> None:
        script = 'echo "$VRM_TASK_ID|$CUDA_VISIBLE_DEVICES|$VRM_DEVICE|$PWD"'
        task_id = self.c.submit({"type": "cmd", "cmd": ["sh", "-c", script], "timeout": 60})
        status = self.c.wait(task_id, self.timeout)
        _expect(status["state"] == "done", f"cmd task ended {status['state']}: {status['error']}")
        _expect(status["exit_code"] == 0, f"exit code {status['exit_code']}, expected 0")
        parts = status["stdout_tail"].strip().split("|")
        _expect(len(parts) == 4, f"unexpected output {status['stdout_tail']!r}")
        seen_id, cuda, device, cwd = parts
        _expect(seen_id == task_id, f"VRM_TASK_ID is {seen_id!r}, expected {task_id!r}")
        _expect(device == status["device"], f"VRM_DEVICE {device!r} != {status['device']!r}")
        expected = self._expected_cuda(device)
        _expect(cuda == expected, f"CUDA_VISIBLE_DEVICES is {cuda!r}, expected {expected!r}")
        _expect(
            "/scratch/" in cwd and cwd.endswith(task_id),
            f"working directory {cwd!r} is not the task's scratch directory",
        )
        logs = self.c.ok("GET", f"/api/tasks/{task_id}/logs")
        _expect(task_id in logs["stdout"], "the task's output is not in its logs")

    def _expected_cuda(self, device: str) -> str:
        if not device.startswith("gpu:"):
            return ""
        entry = self.devices.get(int(device.split(":")[1]), {})
        if entry.get("simulated") or entry.get("cuda_index") is None:
            return ""
        return str(entry["cuda_index"])

    def exit_code_fails(self) -> None:
        task_id = self.c.submit(
            {"type": "cmd", "cmd": ["sh", "-c", "exit 3"], "max_retries": 0, "timeout": 60}
        )
        status = self.c.wait(task_id, self.timeout)
        _expect(status["state"] == "failed", f"ended {status['state']}, expected failed")
        _expect(status["exit_code"] == 3, f"exit code {status['exit_code']}, expected 3")

    def retry_succeeds(self) -> None:
        script = 'test "$VRM_TASK_ATTEMPT" -ge 2'
        task_id = self.c.submit(
            {"type": "cmd", "cmd": ["sh", "-c", script], "max_retries": 1, "timeout": 60}
        )
        status = self.c.wait(task_id, self.timeout)
        _expect(status["state"] == "done", f"ended {status['state']} ({status['error']})")
        _expect(status["attempts"] == 2, f"{status['attempts']} attempts, expected 2")

    def timeout_kills_tree(self) -> None:
        script = "sleep 300 & echo $!; sleep 300"
        task_id = self.c.submit(
            {"type": "cmd", "cmd": ["sh", "-c", script], "timeout": 1, "max_retries": 0}
        )
        status = self.c.wait(task_id, self.timeout)
        _expect(status["state"] == "failed", f"ended {status['state']}, expected failed")
        _expect("timed out" in (status["error"] or ""), f"error {status['error']!r}")
        host = urlparse(self.c.url).hostname or ""
        if host in ("127.0.0.1", "localhost", "::1") and status["stdout_tail"].strip():
            child = int(status["stdout_tail"].split()[0])
            deadline = time.monotonic() + 5
            while _pid_alive(child) and time.monotonic() < deadline:
                time.sleep(0.02)  # SIGKILL delivery is asynchronous
            _expect(not _pid_alive(child), f"the task's child {child} survived the timeout")

    def cancel_running(self) -> None:
        task_id = self.c.submit({"type": "cmd", "cmd": ["sleep", "300"], "max_retries": 0})
        self.c.wait(task_id, self.timeout, until=lambda s: s["state"] in {"running", *_TERMINAL})
        self.c.ok("POST", f"/api/tasks/{task_id}/cancel")
        status = self.c.wait(task_id, self.timeout)
        _expect(status["state"] == "cancelled", f"ended {status['state']}, expected cancelled")

    def idempotent_submit(self) -> None:
        again = self.c.submit({"type": "noop", "idempotency_key": f"validate-{self.run_id}-noop"})
        _expect(again == self.noop_id, f"same idempotency key gave {again}, not {self.noop_id}")

    def bad_submission_refused(self) -> None:
        missing = max(self.devices, default=-1) + 1000
        newest = self._newest_ids(1)
        response = self.c.call(
            "POST", "/api/tasks/submit", json={"type": "cmd", "cmd": ["true"], "gpu": missing}
        )
        _expect(400 <= response.status_code < 500, f"got {response.status_code}, expected 4xx")
        # Tasks queued since, other than the daemon's own maintenance, would be the refused one.
        since = []
        for task in self.c.ok("GET", "/api/tasks/history", params={"limit": 50})["tasks"]:
            if task["task_id"] in newest:
                break
            if not task.get("system"):
                since.append(task["task_id"])
        _expect(not since, f"a refused task was queued anyway ({', '.join(since)})")

    def _newest_ids(self, limit: int) -> set[str]:
        page = self.c.ok("GET", "/api/tasks/history", params={"limit": limit})
        return {task["task_id"] for task in page["tasks"]}

    def noop_done(self) -> None:
        try:
            status = self.c.wait(self.noop_id, self._noop_budget_s())
        except StepFailed as exc:
            reason = str(self.c.maintenance_window().get("reason") or "")
            waiting = f"waiting for an idle window: {reason}" if reason else "not run yet"
            raise StepFailed(
                f"{exc}; {waiting} (maintenance tasks run in idle windows: no user task "
                "queued or running, GPUs and host CPU not busy; see [tasks] "
                "maintenance_idle_s, maintenance_max_cpu_ratio and maintenance_max_wait_s)"
            ) from None
        _expect(status["state"] == "done", f"noop ended {status['state']}: {status['error']}")

    def _noop_budget_s(self) -> float:
        """How long the noop may still take: the step timeout, or, on a busy host, until the
        daemon runs it anyway (``maintenance_max_wait_s`` after it was queued) and a step
        timeout more."""
        max_wait = self.c.maintenance_window().get("max_wait_s")
        if not isinstance(max_wait, int | float) or max_wait <= 0:
            return self.timeout
        left = float(max_wait) - (time.monotonic() - self.noop_queued_at)
        return max(self.timeout, left + self.timeout)


STEPS = (
    ("server and devices answer", "health"),
    ("noop queued", "submit_noop"),
    ("cmd task: env, CUDA_VISIBLE_DEVICES, scratch, logs", "cmd_environment"),
    ("exit code fails the task", "exit_code_fails"),
    ("failed attempt is retried", "retry_succeeds"),
    ("timeout kills the process tree", "timeout_kills_tree"),
    ("running task cancelled", "cancel_running"),
    ("idempotency key deduplicates", "idempotent_submit"),
    ("GPU that does not exist refused, nothing queued", "bad_submission_refused"),
    ("noop ran in an idle window", "noop_done"),
)


def run_validation(
    url: str, token: str | None = None, *, step_timeout_s: float = 60.0
) -> dict[str, Any]:
    """Run every step in order; stop at the first failure. ``result`` is PASS or FAIL."""
    validation = _Validation(_Client(url, token), step_timeout_s)
    steps: list[dict[str, Any]] = []
    started = time.monotonic()
    try:
        for name, method in STEPS:
            t0 = time.monotonic()
            try:
                getattr(validation, method)()
            except StepFailed as exc:
                steps.append(
                    {
                        "name": name,
                        "ok": False,
                        "seconds": time.monotonic() - t0,
                        "reason": str(exc),
                    }
                )
                return {"result": "FAIL", "message": f"{name}: {exc}", "steps": steps}
            steps.append({"name": name, "ok": True, "seconds": time.monotonic() - t0})
    finally:
        validation.c.clean_up()
        validation.c.http.close()
    total = time.monotonic() - started
    return {
        "result": "PASS",
        "message": f"{len(steps)} checks passed in {total:.1f} s",
        "steps": steps,
    }
