"""A full disk outside the block store (the task queue's database) answers a JSON 507 through a
real ``vramancer serve``, nothing is queued, and the daemon goes on once space is back."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import ServerProcess
from tests.integration.test_memory_durability import small_tmpfs

pytestmark = pytest.mark.integration


def fill(path: Path) -> None:
    """Write zeros into ``path`` until the file system is full."""
    chunk = b"\0" * 65536
    with open(path, "wb") as fh, contextlib.suppress(OSError):
        while True:
            fh.write(chunk)
            fh.flush()


def test_a_task_submitted_on_a_full_disk_is_507_and_not_queued(
    tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    with small_tmpfs(tmp_path / "small", "4M") as data:
        server = server_factory("[tasks]\nauto_maintenance = false\n", data_dir=data)
        with server.client() as c:
            filler = data / "filler"
            fill(filler)
            body = {"type": "cmd", "cmd": ["true"], "env": {f"V{i}": "x" * 20000 for i in range(3)}}
            r = c.post("/api/tasks/submit", json=body)
            assert r.status_code == 507, r.text
            assert r.headers["content-type"].startswith("application/json")
            assert r.json()["error"]["code"] == "insufficient_storage"
            filler.unlink()
            r = c.get("/api/tasks/history")
            assert r.status_code == 200 and r.json()["tasks"] == []
            r = c.post("/api/tasks/submit", json=body)
            assert r.status_code == 200, r.text
        server.kill()
