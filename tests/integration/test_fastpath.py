"""Two ``vramancer serve`` processes on loopback with the fastpath on: a block stored on one is
read through the other's HTTP API, byte-identical, and ``GET /v1/fastpath`` shows the links."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tests.helpers import free_port, running_server, start_server, wait_for
from tests.natsserver import NatsServer
from tests.poolprocs import pool_toml


def _config(port: int, peers: list[str]) -> str:
    listed = ", ".join(f'"{p}"' for p in peers)
    return f"[fastpath]\nport = {port}\npeers = [{listed}]\nprobe_ttl_s = 1.0\n"


def test_a_block_put_on_one_node_is_read_through_the_other(tmp_path: Path) -> None:
    port_a, port_b = free_port(), free_port()
    data = os.urandom(2 << 20)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with (
        running_server(tmp_path / "a", _config(port_a, [])) as a,
        running_server(tmp_path / "b", _config(port_b, [f"127.0.0.1:{port_a}"])) as b,
        a.client() as ca,
        b.client() as cb,
    ):
        assert ca.put("/v1/memory/blocks/shared%2Fweights", content=data).status_code < 300
        assert cb.get("/v1/memory/blocks/nowhere").status_code == 404
        got = cb.get("/v1/memory/blocks/shared%2Fweights")
        assert got.status_code == 200 and got.content == data
        listed = cb.get("/v1/memory/blocks").json()
        assert "shared/weights" in [x["id"] for x in listed["items"]]  # kept on b

        def measured() -> list[dict[str, object]]:
            report = cb.get("/v1/fastpath").json()
            return [x for x in report["links"] if x["best"]]

        best = wait_for(measured, timeout=20)
        assert best[0]["peer"] == f"127.0.0.1:{port_a}"
        assert best[0]["interface"] in ("tcp", "shm")
        assert ca.get("/v1/fastpath").json()["address"] == f"127.0.0.1:{port_a}"
        # a task on b that names a block only a holds reads it as a file
        assert ca.put("/v1/memory/blocks/data%2Fshard-7", content=data[:4096]).status_code < 300
        body = {
            "type": "shell",
            "shell": 'sha256sum < "$VRM_BLOCKS_DIR/data%2Fshard-7"',
            "blocks": ["data/shard-7"],
        }
        task_id = cb.post("/api/tasks/submit", json=body).json()["task_id"]

        def ended() -> dict[str, object] | None:
            status = cb.get("/api/tasks/status", params={"task_id": task_id}).json()
            return status if status["state"] in ("done", "failed") else None

        status = wait_for(ended, timeout=30)
        assert status["state"] == "done", status
        logs = cb.get(f"/api/tasks/{task_id}/logs").json()
        assert logs["stdout"].split()[0] == hashlib.sha256(data[:4096]).hexdigest()
        metrics = cb.get("/metrics").text
        assert "vramancer_fastpath_interface_bandwidth_bytes_per_second{" in metrics
        assert 'vramancer_fastpath_interface_latency_seconds_count{interface="tcp"' in metrics


def test_in_a_pool_nodes_find_each_others_fastpath_without_configured_peers(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    port_a, port_b = free_port(), free_port()
    data = os.urandom(1 << 20)
    configs = {
        name: pool_toml(nats_server.url, name, extra=f"\n[fastpath]\nport = {port}\n")
        for name, port in (("hub-a", port_a), ("hub-b", port_b))
    }
    a = start_server(tmp_path, configs["hub-a"], data_dir=tmp_path / "hub-a")
    b = start_server(tmp_path, configs["hub-b"], data_dir=tmp_path / "hub-b")
    try:
        with a.client() as ca, b.client() as cb:

            def announced() -> bool:
                nodes = cb.get("/v1/cluster/nodes").json()["nodes"]
                return {n["name"]: n.get("fastpath") for n in nodes}.get("hub-a") == (
                    f"127.0.0.1:{port_a}"
                )

            wait_for(announced, timeout=30)
            assert ca.put("/v1/memory/blocks/pool%2Fdata", content=data).status_code < 300
            got = cb.get("/v1/memory/blocks/pool%2Fdata")
            assert got.status_code == 200 and got.content == data
            assert f"127.0.0.1:{port_a}" in cb.get("/v1/fastpath").json()["peers"]
    finally:
        for server in (a, b):
            server.stop()
            if server.proc.stdout:
                server.proc.stdout.close()
