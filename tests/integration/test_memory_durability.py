"""Durability of the block store through a real ``vramancer serve``: durable puts across a
SIGKILL, copied data directories, a damaged catalog and its recovery, a really full disk."""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from tests.helpers import ServerProcess, free_port
from vramancer.cli.main import app

pytestmark = pytest.mark.integration

CONFIG = """
[memory]
max_block_size = "1MiB"
fsync = false
[memory.tiers.L4]
capacity = "1MiB"
[memory.tiers.L5]
capacity = "4MiB"
[memory.tiers.L6]
capacity = "16MiB"
"""


def rand(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def put_durably(c: httpx.Client, blocks: dict[str, bytes]) -> None:
    for key, value in blocks.items():
        r = c.put(f"/v1/memory/blocks/{key}", content=value, params={"durable": "true"})
        assert r.status_code == 200, r.text


def assert_blocks(c: httpx.Client, blocks: dict[str, bytes]) -> None:
    """Every block reads back byte-identical."""
    for key, value in blocks.items():
        assert c.get(f"/v1/memory/blocks/{key}").content == value, key


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_a_durable_put_survives_sigkill(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(CONFIG)
    with server.client() as c:
        r = c.put("/v1/memory/blocks/plain", content=rand(1000, 1))
        assert r.status_code == 200, r.text
        assert r.json()["tier"] == "L4" and r.json()["durable"] is False
        r = c.put("/v1/memory/blocks/safe/1", content=rand(5000, 2), params={"durable": "true"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tier"] in {"L5", "L6"} and body["durable"] is True
        assert body["id"] == "safe/1" and body["size"] == 5000
    server.kill(signal.SIGKILL)
    again = server_factory(CONFIG, data_dir=server.data_dir)
    with again.client() as c:
        r = c.get("/v1/memory/blocks/safe/1")
        assert r.status_code == 200 and r.content == rand(5000, 2)
        assert c.get("/v1/memory/blocks/plain").status_code == 404


def test_a_copied_data_directory_serves_every_block_and_spares_the_original(
    tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    server = server_factory(CONFIG)
    blocks = {f"m/{i}": rand(2000 + 97 * i, i) for i in range(40)}
    with server.client() as c:
        for key, value in blocks.items():
            r = c.put(f"/v1/memory/blocks/{key}", content=value, params={"durable": "true"})
            assert r.status_code == 200, r.text
    server.stop()
    original = server.data_dir
    before = snapshot(original)
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    on_copy = server_factory(CONFIG, data_dir=copy)
    with on_copy.client() as c:
        for key, value in blocks.items():
            r = c.get(f"/v1/memory/blocks/{key}")
            assert r.status_code == 200 and r.content == value, key
        for key in list(blocks)[:20]:
            assert c.delete(f"/v1/memory/blocks/{key}").status_code == 200
    on_copy.stop()
    assert snapshot(original) == before
    moved = tmp_path / "moved"
    original.rename(moved)
    on_moved = server_factory(CONFIG, data_dir=moved)
    with on_moved.client() as c:
        assert_blocks(c, blocks)


def test_a_bad_row_or_a_lost_catalog_loses_nothing(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(CONFIG)
    blocks = {f"r/{i}": rand(3000, i) for i in range(10)}
    with server.client() as c:
        put_durably(c, blocks)
    server.stop()
    with sqlite3.connect(server.data_dir / "memory.sqlite") as db:
        db.execute("UPDATE blocks SET shape = 'not json' WHERE id = 'r/3'")
    again = server_factory(CONFIG, data_dir=server.data_dir)
    with again.client() as c:
        assert_blocks(c, blocks)
        metrics = c.get("/metrics").text
        assert 'vramancer_memory_quarantined_blocks_total{node="' in metrics
    again.kill()
    for name in ("memory.sqlite", "memory.sqlite-wal", "memory.sqlite-shm"):
        (server.data_dir / name).unlink(missing_ok=True)
    third = server_factory(CONFIG, data_dir=server.data_dir)
    with third.client() as c:
        assert_blocks(c, blocks)


def test_a_corrupt_catalog_stops_serve_with_the_recovery_and_recover_works(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(CONFIG)
    blocks = {f"c/{i}": rand(4000, i) for i in range(25)}
    with server.client() as c:
        put_durably(c, blocks)
    server.stop()
    db = server.data_dir / "memory.sqlite"
    raw = db.read_bytes()
    db.write_bytes(raw[:100] + b"\xff" * 2000 + raw[2100:])
    serve = [sys.executable, "-m", "vramancer.main", "--mode", "serve"]
    done = subprocess.run(
        [*serve, "--port", str(free_port()), "--config", str(server.config_path)],
        env=server.env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode != 0
    assert "vramancer memory recover" in output
    assert "Traceback" not in output
    result = CliRunner().invoke(
        app, ["memory", "recover", "--data-dir", str(server.data_dir), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert '"blocks": 25' in result.output
    assert [p.name for p in server.data_dir.glob("memory.sqlite.aside-*")]
    again = server_factory(CONFIG, data_dir=server.data_dir)
    with again.client() as c:
        assert_blocks(c, blocks)


def test_a_second_serve_on_the_same_data_directory_is_refused(
    server_factory: Callable[..., ServerProcess],
) -> None:
    server = server_factory(CONFIG)
    with server.client() as c:
        assert c.put("/v1/memory/blocks/keep", content=b"x" * 3000).status_code == 200
    serve = [sys.executable, "-m", "vramancer.main", "--mode", "serve"]
    done = subprocess.run(
        [*serve, "--port", str(free_port()), "--config", str(server.config_path)],
        env=server.env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    output = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 2, output
    assert f"another VRAMancer daemon (pid {server.proc.pid}, {server.url})" in output
    assert "is using the data directory" in output
    assert "Traceback" not in output
    with server.client() as c:  # the first goes on, its blocks untouched
        assert c.get("/v1/memory/blocks/keep").content == b"x" * 3000


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


FULL_CONFIG = """
[memory]
max_block_size = "1MiB"
fsync = false
[memory.tiers.L4]
enabled = false
[memory.tiers.L5]
capacity = "64MiB"
[memory.tiers.L6]
enabled = false
"""


def test_a_full_disk_is_507_keeps_the_connection_and_deletes_still_work(
    tmp_path: Path, server_factory: Callable[..., ServerProcess]
) -> None:
    with small_tmpfs(tmp_path / "small", "2M") as data:
        server = server_factory(FULL_CONFIG, data_dir=data)
        stored: dict[str, bytes] = {}
        with server.client() as c:
            for i in range(64):
                value = rand(100_000, i)
                r = c.put(f"/v1/memory/blocks/f/{i}", content=value)
                if r.status_code != 200:
                    break
                stored[f"f/{i}"] = value
            assert r.status_code == 507, r.text
            assert r.headers["content-type"].startswith("application/json")
            assert r.json()["error"]["code"] == "insufficient_storage"
            assert stored, "nothing fitted at all"
            assert f"f/{len(stored)}" not in {b["id"] for b in _blocks(c)}
            # the same connection goes on; nothing half-written was left behind
            assert c.get("/v1/memory/blocks/f/0").content == stored["f/0"]
            assert len(list((data / "l5").glob("*.blk"))) == len(stored)
            assert not list((data / "l5").glob(".*.tmp"))
            for key in list(stored)[:3]:
                r = c.delete(f"/v1/memory/blocks/{key}")
                assert r.status_code == 200, r.text
                assert c.get(f"/v1/memory/blocks/{key}").status_code == 404
                del stored[key]
            r = c.put("/v1/memory/blocks/after", content=rand(100_000, 999))
            assert r.status_code == 200, r.text
            stored["after"] = rand(100_000, 999)
        server.kill(signal.SIGKILL)
        again = server_factory(FULL_CONFIG, data_dir=data)
        with again.client() as c:
            assert {b["id"] for b in _blocks(c)} == set(stored)
            for key, value in stored.items():
                assert c.get(f"/v1/memory/blocks/{key}").content == value, key
        again.kill()


def _blocks(c: object) -> list[dict[str, object]]:
    r = c.get("/v1/memory/blocks", params={"limit": 1000})  # type: ignore[attr-defined]
    assert r.status_code == 200, r.text
    return list(r.json()["items"])
