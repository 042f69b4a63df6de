"""``vramancer serve`` as people meet it: a second daemon on a data directory in use, what
the log says, sizes in the log, and configuration typos, each read from a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import ServerProcess, free_port, wait_for

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
    first.stop()  # SIGTERM: a clean stop takes its record away
    assert not record.exists()
