"""``VRM_TRACING=1``: the store's moves leave the tracing spans — ``orch.place_block``
(put), ``memory.demote``, ``memory.promote`` and ``memory.evict_cycle`` — with their
attributes. Own process: OpenTelemetry's tracer provider is set once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

SCRIPT = """
import asyncio
from vramancer import Runtime, Settings

async def main():
    settings = Settings.load(
        devices={"backends": []},
        memory={"fsync": False, "tiers": {"L4": {"capacity": 65536}, "L5": {"capacity": 262144},
                                          "L6": {"capacity": 1048576}}},
    )
    async with Runtime(settings) as rt:
        store = rt.memory
        store.put("a/1", bytes(4096))
        store.demote("a/1", "L6")
        store.promote("a/1", "L4")
        store.evict_cycle(force=True)

asyncio.run(main())
"""


def spans(text: str) -> list[dict[str, Any]]:
    """The JSON objects the console exporter printed, one per span."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    index = text.find("{")
    while index != -1:
        obj, end = decoder.raw_decode(text, index)
        found.append(obj)
        index = text.find("{", end)
    return found


def test_moves_and_cycles_are_traced(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VRM_", "OTEL_"))}
    env |= {"VRM_TRACING": "1", "VRM_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=90
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for span in spans(proc.stdout):
        by_name.setdefault(span["name"], []).append(span["attributes"])
    assert by_name["orch.place_block"] == [{"block_id": "a/1", "size": 4096, "tier": "L4"}]
    assert {"block_id": "a/1", "source": "L4", "target": "L6"} in by_name["memory.demote"]
    assert by_name["memory.promote"] == [{"block_id": "a/1", "source": "L6", "target": "L4"}]
    assert {"force": True} in by_name["memory.evict_cycle"]
