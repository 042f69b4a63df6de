"""The memory API and CLI through a real ``vramancer serve`` process."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.helpers import ServerProcess
from tests.promtext import metric_value
from vramancer.cli.main import app

pytestmark = pytest.mark.integration

CONFIG = """
[auth]
tokens = { "adm" = "admin", "op" = "operator", "view" = "viewer" }
[server]
max_body = "2MiB"
[memory]
max_block_size = "1MiB"
fsync = false
[memory.tiers.L4]
capacity = "256KiB"
[memory.tiers.L5]
capacity = "1MiB"
[memory.tiers.L6]
capacity = "8MiB"
"""


def rand(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def error_code(response: Any) -> str:
    return str(response.json()["error"]["code"])


def test_put_get_delete_list_and_evict(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(CONFIG)
    with server.client("op") as op, server.client("adm") as adm, server.client("view") as view:
        blocks = {f"model/w:{i}": rand(60_000, i) for i in range(12)}
        for key, value in blocks.items():
            r = op.put(f"/v1/memory/blocks/{key}", content=value, params={"priority": 3})
            assert r.status_code == 200, r.text
            assert r.json()["size"] == 60_000
        for key, value in blocks.items():
            r = view.get(f"/v1/memory/blocks/{key}")
            assert r.status_code == 200
            assert r.headers["content-type"] == "application/octet-stream"
            assert r.content == value
            assert r.headers["x-vrm-tier"] in {"L4", "L5", "L6"}
        tiers = view.get("/v1/memory/tiers").json()["tiers"]
        assert [t["name"] for t in tiers] == ["L4", "L5", "L6"]
        assert all(t["used_bytes"] <= t["capacity_bytes"] for t in tiers)
        assert sum(t["blocks"] for t in tiers) == 12
        assert {t["name"]: t["latency"] for t in tiers} == {"L4": 5, "L5": 16, "L6": 50}
        page = view.get("/v1/memory/blocks", params={"limit": 5, "offset": 10}).json()
        assert page["total"] == 12 and len(page["items"]) == 2 and page["next_offset"] is None
        first = view.get("/v1/memory/blocks", params={"limit": 5}).json()
        assert first["next_offset"] == 5
        item = first["items"][0]
        assert item["id"] == "model/w:0" and item["priority"] == 3 and item["pinned"] is False
        assert set(item) >= {"id", "size", "tier", "pinned", "priority"}
        l4 = view.get("/v1/memory/blocks", params={"tier": "L4", "limit": 1000}).json()
        assert all(b["tier"] == "L4" for b in l4["items"])

        r = adm.post("/v1/memory/evict", json={"tier": "L4", "bytes": 100_000})
        assert r.status_code == 200, r.text
        assert r.json()["moved"] >= 1 and r.json()["bytes"] >= 100_000
        assert adm.post("/v1/memory/evict").status_code == 200

        assert op.delete("/v1/memory/blocks/model/w:0").json() == {
            "id": "model/w:0",
            "deleted": True,
        }
        assert view.get("/v1/memory/blocks/model/w:0").status_code == 404
        metrics = view.get("/metrics").text
        assert metric_value(metrics, "vramancer_memory_tier_used_bytes", tier="L4") is not None


def test_bad_input_and_roles(server_factory: Callable[..., ServerProcess]) -> None:
    server = server_factory(CONFIG)
    with (
        server.client("op") as op,
        server.client("adm") as adm,
        server.client("view") as view,
        server.client() as anonymous,
    ):
        checks = [
            (view.get("/v1/memory/blocks/nope"), 404, "not_found"),
            (op.delete("/v1/memory/blocks/nope"), 404, "not_found"),
            (op.put("/v1/memory/blocks/e", content=b""), 422, "invalid_input"),
            (op.put("/v1/memory/blocks/big", content=bytes(1024 * 1024 + 1)), 413, None),
            (op.put("/v1/memory/blocks/huge", content=bytes(3 * 1024 * 1024)), 413, None),
            (op.put("/v1/memory/blocks/p", content=b"x", params={"priority": -1}), 422, None),
            (op.put("/v1/memory/blocks/p", content=b"x", params={"priority": "hi"}), 422, None),
            (op.put("/v1/memory/blocks/p", content=b"x", params={"priority": 5000}), 422, None),
            (op.put("/v1/memory/blocks/a%20b", content=b"x"), 422, "invalid_input"),
            (op.put("/v1/memory/blocks/" + "x" * 300, content=b"x"), 422, "invalid_input"),
            (view.get("/v1/memory/blocks/a%3Fb"), 422, "invalid_input"),
            (view.get("/v1/memory/blocks", params={"limit": 0}), 422, None),
            (view.get("/v1/memory/blocks", params={"offset": 10**30}), 422, None),
            (view.get("/v1/memory/blocks", params={"offset": -1}), 422, None),
            (view.get("/v1/memory/blocks", params={"tier": "L1"}), 404, "not_found"),
            (view.get("/v1/memory/blocks", params={"tier": "L9"}), 422, None),
            (adm.post("/v1/memory/evict", json={"tier": "L4", "bytes": "lots"}), 422, None),
            (adm.post("/v1/memory/evict", json={"tier": "Lx"}), 422, None),
            (
                adm.post(
                    "/v1/memory/evict",
                    content=b'{"tier": "L4", "bytes": 1e400}',
                    headers={"content-type": "application/json"},
                ),
                422,
                None,
            ),
            (
                adm.post("/v1/memory/evict", json={"tier": "L4", "bytes": "9" * 400 + "GiB"}),
                422,
                None,
            ),
            (adm.post("/v1/memory/evict", json={"tier": "L4", "bytes": -1}), 422, None),
            (adm.post("/v1/memory/evict", json={"bytes": 10}), 422, "invalid_input"),
            (view.put("/v1/memory/blocks/v", content=b"x"), 403, "forbidden"),
            (view.delete("/v1/memory/blocks/v"), 403, "forbidden"),
            (op.post("/v1/memory/evict"), 403, "forbidden"),
            (view.post("/v1/memory/evict"), 403, "forbidden"),
            (anonymous.get("/v1/memory/tiers"), 401, "unauthorized"),
        ]
        for response, status, code in checks:
            assert response.status_code == status, (response.request.url, response.text)
            body = response.json()
            assert "message" in body["error"]
            if code is not None:
                assert body["error"]["code"] == code, body
        big = op.put("/v1/memory/blocks/big", content=bytes(1024 * 1024 + 1))
        assert error_code(big) == "payload_too_large"
        assert view.get("/v1/memory/blocks").json()["total"] == 0  # nothing changed
        assert (
            op.put("/v1/memory/blocks/ok", content=b"x", params={"hint": "kv"}).status_code == 200
        )


def test_restart_keeps_blocks_on_disk_and_spills_on_sigterm(
    server_factory: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = server_factory(CONFIG)
    values = {f"kv/conv/page/{i}": rand(100_000, i) for i in range(8)}
    with server.client("op") as op:
        for key, value in values.items():
            assert op.put(f"/v1/memory/blocks/{key}", content=value).status_code == 200
    server.stop()  # SIGTERM: graceful stop spills L4 to disk
    again = server_factory(CONFIG, data_dir=server.data_dir)
    with again.client("view") as view:
        tiers = {t["name"]: t for t in view.get("/v1/memory/tiers").json()["tiers"]}
        assert tiers["L4"]["blocks"] == 0
        assert tiers["L5"]["blocks"] + tiers["L6"]["blocks"] == 8
        for key, value in values.items():
            assert view.get(f"/v1/memory/blocks/{key}").content == value


def test_a_corrupted_archive_file_fails_that_block_only(
    server_factory: Callable[..., ServerProcess],
) -> None:
    """A byte flipped by hand in an L6 file: 409 ``corrupt_block`` naming that block, the
    others still read back, the block stays listed, and deleting it works."""
    server = server_factory(CONFIG)
    values = {f"arch/{i}": rand(50_000, i) for i in range(3)}
    with server.client("op") as op, server.client("view") as view:
        for key, value in values.items():
            assert op.put(f"/v1/memory/blocks/{key}", content=value).status_code == 200
        files = sorted((server.data_dir / "l6").glob("*.blk"))
        assert files == []  # all in L4 so far: demote one to the archive
    with server.client("adm") as adm:
        for _ in range(3):
            adm.post("/v1/memory/evict", json={"tier": "L4", "bytes": 1 << 30})
            adm.post("/v1/memory/evict", json={"tier": "L5", "bytes": 1 << 30})
    with server.client("op") as op, server.client("view") as view:
        listed = view.get("/v1/memory/blocks", params={"tier": "L6"}).json()["items"]
        assert {b["id"] for b in listed} == set(values)
        (victim,) = sorted((server.data_dir / "l6").glob("*.blk"))[:1]
        damaged = bytearray(victim.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        victim.write_bytes(bytes(damaged))
        answers = {key: view.get(f"/v1/memory/blocks/{key}") for key in values}
        bad = [key for key, r in answers.items() if r.status_code != 200]
        assert len(bad) == 1
        r = answers[bad[0]]
        assert r.status_code == 409
        assert r.json()["error"]["code"] == "corrupt_block"
        assert bad[0] in r.json()["error"]["message"]
        for key, value in values.items():
            if key != bad[0]:
                assert answers[key].content == value
        assert view.get(f"/v1/memory/blocks/{bad[0]}").status_code == 409  # no retry helps
        assert view.get("/v1/memory/blocks").json()["total"] == 3
        assert op.delete(f"/v1/memory/blocks/{bad[0]}").status_code == 200
        assert not victim.exists()


@dataclass
class CliResult:
    returncode: int
    stdout: bytes
    stderr: bytes


def run_cli(server: ServerProcess, *args: str, token: str = "adm", stdin: bytes = b"") -> CliResult:
    """The real CLI in-process (a fresh Python per command costs seconds here)."""
    env = {"VRM_URL": server.url, "VRM_API_TOKEN": token, "COLUMNS": "200"}
    result = CliRunner().invoke(app, list(args), input=stdin, env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliResult(result.exit_code, result.stdout_bytes, result.stderr_bytes)


def test_cli_memory_commands(server_factory: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = server_factory(CONFIG)
    source = tmp_path / "weights.bin"
    source.write_bytes(rand(200_000, 9))
    done = run_cli(
        server, "memory", "put", "w/shard-00001", str(source), "--priority", "2", "--json"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["size"] == 200_000
    done = run_cli(server, "memory", "put", "from-stdin", "-", stdin=b"piped bytes")
    assert done.returncode == 0, done.stderr
    assert b"stored from-stdin" in done.stdout

    out = tmp_path / "back.bin"
    done = run_cli(server, "memory", "get", "w/shard-00001", "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == source.read_bytes()
    assert json.loads(done.stdout)["size"] == 200_000
    done = run_cli(server, "memory", "get", "from-stdin")
    assert done.stdout == b"piped bytes"

    tiers = json.loads(run_cli(server, "memory", "tiers", "--json").stdout)
    assert sum(t["blocks"] for t in tiers["tiers"]) == 2
    assert b"L4" in run_cli(server, "memory", "tiers").stdout
    listed = json.loads(run_cli(server, "memory", "blocks", "--json", "--limit", "1").stdout)
    assert listed["total"] == 2 and listed["next_offset"] == 1
    evicted = run_cli(server, "memory", "evict", "--tier", "L4", "--bytes", "100KiB", "--json")
    assert evicted.returncode == 0, evicted.stderr
    assert json.loads(evicted.stdout)["bytes"] >= 100 * 1024

    denied = run_cli(server, "memory", "evict", token="op")
    assert denied.returncode == 1 and b"admin" in denied.stderr
    missing = run_cli(server, "memory", "get", "nope")
    assert missing.returncode == 1 and b"404" in missing.stderr
    bad = run_cli(server, "memory", "evict", "--tier", "L4", "--bytes", "lots")
    assert bad.returncode == 2 and b"--bytes" in bad.stderr
    nofile = run_cli(server, "memory", "put", "x", str(tmp_path / "absent"))
    assert nofile.returncode == 1 and b"source" in nofile.stderr
