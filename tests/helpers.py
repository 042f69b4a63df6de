"""Test helpers: free ports, waiting for servers, and a factory for real ``vramancer serve``."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

#: A daemon with one operator token (``op``) and one simulated 24 GiB GPU, no real backend:
#: what the CLI and API edge tests start (they append what else they need).
OPERATOR_SIM_GPU_CONFIG = """
[auth]
tokens = { "op" = "operator" }

[devices]
backends = []
[[devices.simulated]]
name = "sim0"
memory = "24GiB"
"""


def operator_env(url: str) -> dict[str, str]:
    """What the CLI needs to reach ``url`` as the operator of ``OPERATOR_SIM_GPU_CONFIG``."""
    return {"VRM_URL": url, "VRM_API_TOKEN": "op"}


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers (any status), or fail with the process's output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode} before answering:\n{out}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def wait_for(
    check: Callable[[], Any],
    timeout: float = 30.0,
    what: str = "",
    interval: float = 0.05,
    on_timeout: Callable[[], None] | None = None,
) -> Any:
    """Poll ``check`` until it returns something truthy (a server not answering yet counts as
    not yet); after ``timeout``, run ``on_timeout`` (a diagnostic) and raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        with contextlib.suppress(httpx.TransportError):
            last = check()
            if last:
                return last
        if time.monotonic() > deadline:
            if on_timeout is not None:
                on_timeout()
            raise TimeoutError(f"{what or check} not true within {timeout}s (last: {last!r})")
        time.sleep(interval)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(type(value))


@dataclass
class ServerProcess:
    """A running ``vramancer serve`` subprocess."""

    proc: subprocess.Popen[bytes]
    url: str
    port: int
    data_dir: Path
    config_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def client(self, token: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30.0, **kwargs)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=20)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def start_server(
    tmp: Path,
    config_text: str = "",
    env: dict[str, str] | None = None,
    data_dir: Path | None = None,
    port: int | None = None,
    timeout: float = 30.0,
) -> ServerProcess:
    """Start ``vramancer serve`` on a free port with ``config_text`` as its TOML config."""
    port = port or free_port()
    data_dir = data_dir or tmp / "data"
    config_path = tmp / f"config-{port}.toml"
    config_path.write_text(config_text)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    full_env.update({"VRM_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"})
    full_env.update(env or {})
    cmd = [
        sys.executable,
        "-m",
        "vramancer.main",
        "--mode",
        "serve",
        "--port",
        str(port),
        "--config",
        str(config_path),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(
        cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    server = ServerProcess(proc, url, port, data_dir, config_path, full_env)
    try:
        wait_http(url + "/healthz", timeout=timeout, proc=proc)
    except BaseException:
        server.kill()
        raise
    return server


@contextlib.contextmanager
def running_server(tmp: Path, config_text: str = "", **kwargs: Any) -> Iterator[ServerProcess]:
    server = start_server(tmp, config_text, **kwargs)
    try:
        yield server
    finally:
        server.kill()
        if server.proc.stdout:
            server.proc.stdout.close()


def has_nvidia_gpu() -> bool:
    """Whether an NVIDIA GPU answers through NVML here."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import pynvml

        pynvml.nvmlInit()
        count = int(pynvml.nvmlDeviceGetCount())
        pynvml.nvmlShutdown()
        return count > 0
    except Exception:
        return False
