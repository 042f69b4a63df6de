"""Start ``vramancer serve`` and a bare FastAPI app the same way (uvicorn, one process each).

Both are real subprocesses on free ports, in their own session so they are killed as a group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

#: Two simulated GPUs so /v1/system/resources carries a realistic body.
BENCH_CONFIG = """
[devices]
poll_interval_s = {poll}
[[devices.simulated]]
name = "sim0"
memory = "24GiB"
used = "6GiB"
[[devices.simulated]]
name = "sim1"
memory = "12GiB"
"""


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str

    @property
    def pid(self) -> int:
        return self.proc.pid


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise TimeoutError(url)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    env.update(extra)
    return env


@contextlib.contextmanager
def vramancer_server(poll_interval_s: float = 1.0, rate_limit: bool = False) -> Iterator[Server]:
    """``vramancer serve`` with two simulated GPUs, no tokens, rate limit off by default."""
    with tempfile.TemporaryDirectory(prefix="vrm-bench-") as tmp:
        config = Path(tmp) / "config.toml"
        config.write_text(BENCH_CONFIG.format(poll=poll_interval_s))
        port = free_port()
        extra = {"VRM_DATA_DIR": str(Path(tmp) / "data")}
        if not rate_limit:
            extra["VRM_DISABLE_RATE_LIMIT"] = "1"
        cmd = [sys.executable, "-m", "vramancer.main", "--mode", "serve", "--port", str(port),
               "--config", str(config), "--log-level", "warning"]  # fmt: skip
        proc = subprocess.Popen(
            cmd, env=_env(extra), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            _wait(url + "/healthz", proc)
            yield Server(proc, url)
        finally:
            _stop(proc)


@contextlib.contextmanager
def bare_server() -> Iterator[Server]:
    """The baseline: a FastAPI app with one trivial JSON route, run by uvicorn the same way."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.api.bare_app", "--port", str(port)]
    root = Path(__file__).resolve().parents[2]
    env = _env({"PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    proc = subprocess.Popen(
        cmd, env=env, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        _wait(url + "/bare", proc)
        yield Server(proc, url)
    finally:
        _stop(proc)
