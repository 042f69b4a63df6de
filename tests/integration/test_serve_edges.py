"""``vramancer serve`` as people meet it: a second daemon on a data directory in use, what
the log says, sizes in the log, and configuration typos, each read from a real process."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess, free_port, wait_for, wait_http

pytestmark = pytest.mark.integration

SERVE = [sys.executable, "-m", "vramancer.main", "--mode", "serve"]
CONFIG = "[devices]\nbackends = []\n\n[memory]\nfsync = false\n"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def test_a_second_daemon_names_the_first_in_one_line(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    first = server_factory(CONFIG)
    record = first.data_dir / "daemon.json"
    assert wait_for(record.exists, what="daemon.json written")
    assert oct(record.stat().st_mode & 0o777) == "0o600"
    done = subprocess.run(
        [*SERVE, "--port", str(free_port()), "--config", str(first.config_path),
         "--data-dir", str(first.data_dir)],
        env=clean_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [
        f"error: another VRAMancer daemon (pid {first.proc.pid}, {first.url}) is using the "
        f"data directory {first.data_dir}; stop it first, or give this one its own data "
        "directory (--data-dir or VRM_DATA_DIR)"
    ]
    other = tmp_path / "other-data"
    done = subprocess.run(
        [*SERVE, "--port", str(first.port), "--config", str(first.config_path),
         "--data-dir", str(other)],
        env=clean_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{first.port}: another program listens there (is a "
        "VRAMancer daemon already running?); stop it, or choose another --port"
    ]
    assert not other.exists()  # refused before anything started
    first.stop()  # SIGTERM: a clean stop takes its record away
    assert not record.exists()


LOGGED_CONFIG = """
[devices]
backends = []

[[devices.simulated]]
name = "sim0"
memory = "12GiB"

[memory]
fsync = false

[[models]]
name = "clip"
backend = "torch"
factory = "tests.unit.models.tiny:tiny"
vram = "500MiB"

[profiles.clip_on_cpu]
clip = "cpu"

[profiles.nothing]
clip = "unloaded"
"""


class Daemon:
    """``vramancer serve`` at ``--log-level info``, its log in a file."""

    def __init__(self, tmp: Path, config: str, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "daemon.toml"
        self.config.write_text(config)
        self.log_path = tmp / f"serve-{self.port}.log"
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [*SERVE, "--port", str(self.port), "--config", str(self.config),
                 "--data-dir", str(tmp / "data"), "--log-level", "info", *args],
                env=clean_env(**(env or {})), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            wait_http(self.url + "/healthz", timeout=60, proc=self.proc)
        except BaseException:
            self.stop()
            raise

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        return self.log


def test_the_log_says_what_happens_and_not_every_poll(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, LOGGED_CONFIG)
    try:
        with httpx.Client(base_url=daemon.url, timeout=60) as c:
            task = c.post("/api/tasks/submit", json={"type": "shell", "shell": "true"})
            task = task.json()["task_id"]
            wait_for(
                lambda: (
                    c.get("/api/tasks/status", params={"task_id": task}).json()["state"] == "done"
                ),
                what="the task done",
            )
            granted = c.post("/v1/allocations", json={"workload_type": "llm", "memory": "1GiB"})
            assert granted.status_code == 201, granted.text
            allocation = granted.json()["id"]
            assert c.delete(f"/v1/allocations/{allocation}").status_code == 200
            assert c.put("/v1/profile", json={"name": "clip_on_cpu"}).json()["ok"]
            assert c.put("/v1/profile", json={"name": "nothing"}).json()["ok"]
            for _ in range(5):  # the dashboard's polling
                assert c.get("/v1/devices").status_code == 200
            assert c.get("/v1/no-such-thing").status_code == 404
            wait_for(lambda: "model clip unloaded" in daemon.log, what="the unload logged")
    finally:
        text = daemon.stop()
    assert f"dashboard: {daemon.url}/" in text
    assert f"API docs: {daemon.url}/docs" in text
    assert f"metrics: {daemon.url}/metrics" in text
    assert re.search(
        r"memory tier L4: \d+\.\d GiB \(25% of the \d+\.\d GiB of host memory available at "
        r"start; set \[memory.tiers.L4\] capacity to fix it\)",
        text,
    ), text
    assert not re.search(r"\d{6,} ?B\b|\d{6,} bytes", text)  # no raw byte counts
    assert f"task {task} submitted (shell)" in text
    assert f"task {task} started" in text
    assert re.search(rf"task {task} done( on \S+)? after \d+\.\d s, exit code 0", text), text
    assert f"allocation {allocation} granted: 1.0 GiB for llm (priority normal" in text
    assert f"allocation {allocation} released: 1.0 GiB" in text
    assert re.search(r"model clip loaded on cpu in \d+\.\d s \(profile\)", text), text
    assert "model clip unloaded on cpu (profile)" in text
    assert "profile switched from idle to clip_on_cpu" in text
    assert "profile switched from clip_on_cpu to nothing" in text
    assert "GET /v1/devices" not in text  # 200s are not logged without --access-log
    assert 'GET /v1/no-such-thing HTTP/1.1" 404' in text


def test_access_log_logs_every_request(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path, CONFIG, "--access-log")
    try:
        assert httpx.get(daemon.url + "/v1/devices", timeout=30).status_code == 200
        wait_for(lambda: "GET /v1/devices" in daemon.log, what="the request logged")
    finally:
        daemon.stop()


def test_misspelt_keys_and_variables_get_a_did_you_mean(tmp_path: Path) -> None:
    config = tmp_path / "typo.toml"
    config.write_text('[server]\nprot = 9000\n\n[memory.tiers.l4]\ncapcity = "4GiB"\n')
    done = subprocess.run(
        [*SERVE, "--config", str(config), "--data-dir", str(tmp_path / "data")],
        env=clean_env(VRM_TASKS__MAX_BACH="10"), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: invalid configuration:",
        "  VRM_TASKS__MAX_BACH: unknown setting (MAX_BACH is not a key of VRM_TASKS); "
        "did you mean VRM_TASKS__MAX_BATCH?",
    ]  # the environment is checked first
    done = subprocess.run(
        [*SERVE, "--config", str(config), "--data-dir", str(tmp_path / "data")],
        env=clean_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: invalid configuration:",
        f"  server.prot: unknown key; did you mean server.port? (in {config})",
        "  memory.tiers.l4.capcity: unknown key; did you mean memory.tiers.l4.capacity? "
        f"(in {config})",
    ]
    assert not (tmp_path / "data").exists()  # nothing was created


def test_a_directory_taken_while_starting_is_one_line_too(tmp_path: Path) -> None:
    """Two daemons started at once both pass the early check; the one that loses the locks
    during start-up says so in one line, not a traceback. Here the task queue's lock is held
    (by this test, which records itself as the daemon) while the memory store's is free."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    record = {"pid": os.getpid(), "url": "http://127.0.0.1:9", "started_at": 0.0}
    (data / "daemon.json").write_text(json.dumps(record))
    with (data / "tasks.lock").open("ab") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = subprocess.run(
            [*SERVE, "--port", str(free_port()), "--data-dir", str(data)],
            env=clean_env(), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"error: another VRAMancer daemon (pid {os.getpid()}, http://127.0.0.1:9) is using the "
        f"data directory {data}; stop it first, or give this one its own data directory "
        "(--data-dir or VRM_DATA_DIR)"
    )
