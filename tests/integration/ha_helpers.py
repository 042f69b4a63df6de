"""Two real ``vramancer serve`` processes replicating to each other (HA), for the HA tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import ServerProcess, free_port

SECRET = "test-secret-of-at-least-32-bytes-0123456789"
CONFIG = """
[memory]
fsync = false
[tasks]
synchronous = "normal"
[ha]
replicate_data = true
ship_interval_s = 0.05
sync_timeout_s = 3
[profiles.quiet]
"""


@dataclass
class Node:
    """One HA node: where it listens, its data directory, its environment."""

    port: int
    data_dir: Path
    env: dict[str, str]
    server: ServerProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        assert self.server is not None
        return self.server.client()


def make_pair(
    tmp: Path, *, sync: bool = False, config: str = CONFIG, **extra: str
) -> tuple[Node, Node]:
    """A primary and a standby that name each other as peers (not started)."""
    ports = free_port(), free_port()
    nodes = []
    for i, role in enumerate(("primary", "standby")):
        env = {
            "VRM_HA_REPLICATION": "1",
            "VRM_HA_PEERS": f"127.0.0.1:{ports[1 - i]}",
            "VRM_HA_SECRET": SECRET,
            "VRM_HA_ROLE": role,
            "VRM_HA_SYNC": "1" if sync else "0",
            "VRM_DISABLE_RATE_LIMIT": "1",
            **extra,
        }
        nodes.append(Node(ports[i], tmp / f"node-{role}", env))
    for node in nodes:
        node.env["_CONFIG"] = config
    return nodes[0], nodes[1]


def start(node: Node, starter: Callable[..., ServerProcess]) -> Node:
    """Start ``node`` with ``starter`` (the ``server_factory`` fixture)."""
    env = {k: v for k, v in node.env.items() if not k.startswith("_")}
    node.server = starter(node.env["_CONFIG"], env=env, data_dir=node.data_dir, port=node.port)
    return node


def caught_up(primary: httpx.Client, standby: httpx.Client) -> bool:
    """The standby holds everything the primary journaled (and nothing is pending)."""
    p = primary.get("/v1/ha/status").json()
    s = standby.get("/v1/ha/status").json()
    return bool(p["last_seq"] > 0 and s["last_seq"] == p["last_seq"])


def all_history(c: httpx.Client) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 1000}
        if cursor:
            params["cursor"] = cursor
        page = c.get("/api/tasks/history", params=params).json()
        out += page["tasks"]
        cursor = page["next_cursor"]
        if not cursor:
            return out


def all_blocks(c: httpx.Client) -> list[dict[str, Any]]:
    """Every block's entry, without ``hotness`` (a score of this node's own reads)."""
    out: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        page = c.get("/v1/memory/blocks", params={"limit": 1000, "offset": offset}).json()
        out += [{k: v for k, v in b.items() if k != "hotness"} for b in page["items"]]
        offset = page["next_offset"]
    return out
