"""Real processes of a pool for the integration tests: ``vramancer serve`` orchestrators and
``vramancer worker`` nodes with simulated GPUs, all on one ``nats-server`` with JetStream."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import ServerProcess, start_server, toml_value, wait_for

VRAMANCER = str(Path(sys.executable).parent / "vramancer")

#: Short timers so a test sees a stale node and a lost lease in seconds, not minutes.
FAST = {
    "heartbeat_s": 0.3,
    "stale_after_s": 2.0,
    "down_after_s": 5.0,
    "leader_lease_s": 1.5,
    "reconnect_wait_s": 0.2,
}


def pool_toml(
    nats_url: str,
    node: str,
    *,
    gpus: int = 0,
    gpu_memory: str = "24GiB",
    lease_s: float = 2.0,
    slots_per_device: int = 1,
    extra: str = "",
    nats: dict[str, Any] | None = None,
) -> str:
    """A node's config: its name, the NATS server, short timers, ``gpus`` simulated GPUs;
    ``nats``: more keys of ``[nats]``."""
    lines = [f'node_name = "{node}"', "", "[nats]", f'url = "{nats_url}"']
    lines += [f"{k} = {toml_value(v)}" for k, v in {**FAST, **(nats or {})}.items()]
    lines += ["", "[tasks]", f"lease_s = {lease_s}", f"slots_per_device = {slots_per_device}"]
    lines += ["dispatch_interval_s = 0.05", "backoff_base_s = 0.1", "auto_maintenance = false"]
    for i in range(gpus):
        lines += [
            "",
            "[[devices.simulated]]",
            f'name = "{node}-sim{i}"',
            f'memory = "{gpu_memory}"',
        ]
    return "\n".join(lines) + "\n" + extra


@dataclass
class WorkerProcess:
    """A running ``vramancer worker``."""

    name: str
    proc: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the worker and its process group (its running tasks die with it)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def start_worker(
    tmp: Path, name: str, config_text: str, *, prefix: list[str] | None = None
) -> WorkerProcess:
    """Start ``vramancer worker --name NAME`` (``prefix``: e.g. ``ip netns exec NS``)."""
    data_dir = tmp / f"worker-{name}"
    config = tmp / f"worker-{name}.toml"
    config.write_text(config_text)
    log_path = tmp / f"worker-{name}.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    env |= {"VRM_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    argv = [*(prefix or []), VRAMANCER, "worker", "--config", str(config), "--name", name]
    argv += ["--log-level", "warning"]
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return WorkerProcess(name, proc, data_dir, log_path, argv, env)


def node_states(server: ServerProcess) -> dict[str, str]:
    body = httpx.get(server.url + "/v1/cluster/nodes", timeout=10).json()
    return {node["name"]: node["state"] for node in body["nodes"]}


def wait_nodes_up(server: ServerProcess, *names: str, timeout: float = 30.0) -> None:
    wait_for(
        lambda: all(node_states(server).get(n) == "up" for n in names),
        timeout,
        what=f"nodes {names} up",
    )


@contextlib.contextmanager
def pool(
    tmp: Path, nats_url: str, workers: dict[str, int], *, hub_extra: str = "", **toml: Any
) -> Iterator[tuple[ServerProcess, dict[str, WorkerProcess]]]:
    """An orchestrator ``hub`` (no GPU of its own) and one worker per ``workers`` entry (its
    simulated GPU count), all up; everything is killed at the end."""
    hub = start_server(tmp, pool_toml(nats_url, "hub", extra=hub_extra, **toml))
    started: dict[str, WorkerProcess] = {}
    try:
        for name, gpus in workers.items():
            started[name] = start_worker(tmp, name, pool_toml(nats_url, name, gpus=gpus, **toml))
        wait_nodes_up(hub, *workers)
        yield hub, started
    finally:
        for worker in started.values():
            worker.kill()
        hub.kill()
        if hub.proc.stdout:
            hub.proc.stdout.close()
