"""Fastpath TCP against a raw socket on the same link: ``python -m bench.fastpath``.

``python -m bench.fastpath [--mib 256] [--runs 5] [--json]``

Both sides move the same ``--mib`` MiB over loopback TCP, one after the other, runs
interleaved (raw, fastpath, raw ...):

* **raw** (what ``iperf`` measures): a server thread ``sendall``s a buffer already in memory, the
  client ``recv_into``s a buffer it allocates for the transfer (a received block needs fresh
  memory: that is the same work on both sides); no framing, no checksum, nothing stored. The
  figure with one buffer allocated before timing and reused (``raw_reused``, what ``iperf``
  does) is measured too;
* **fastpath**: ``TcpInterface.recv`` of a block of that size held by a real memory store on a
  disk tier, uncompressed (the server ``sendfile``s it from the block file, in the page cache
  after the first run), greeting, framing and the xxh3-64 check included, ending with the
  block's ``bytes``; and ``TcpInterface.recv_into`` of the same block into one buffer allocated
  before timing and reused, beside ``raw_reused`` (the same work again: no fresh memory).

Figures: the median of each side's MB/s and both ratios (target >= 0.8 for each).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from vramancer.clock import SystemClock
from vramancer.devices.manager import DeviceManager
from vramancer.devices.settings import DevicesSettings
from vramancer.events import EventBus
from vramancer.fastpath.interfaces import TcpInterface
from vramancer.fastpath.service import FastpathService
from vramancer.fastpath.settings import FastpathSettings
from vramancer.memory.settings import MemorySettings
from vramancer.memory.store import TieredStore
from vramancer.observability.metrics import Metrics

TARGET_RATIO = 0.8
MIB = 1024 * 1024


def raw_once(payload: bytes, buf: bytearray | None = None) -> float:
    """Seconds to move ``payload`` over a fresh loopback connection, iperf-style, into ``buf``
    (None: a buffer allocated inside the timed part)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.sendall(payload)

    thread = threading.Thread(target=serve)
    thread.start()
    t0 = time.perf_counter()
    if buf is None:
        buf = bytearray(len(payload))
    view = memoryview(buf)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        got = 0
        while got < len(buf):
            got += sock.recv_into(view[got:], min(len(buf) - got, MIB))
    seconds = time.perf_counter() - t0
    thread.join()
    listener.close()
    return seconds


def _store(data_dir: Path, size: int) -> TieredStore:
    clock = SystemClock()
    events = EventBus(clock=clock.time)
    metrics = Metrics(node="bench")
    devices = DeviceManager(DevicesSettings(), events=events, metrics=metrics, clock=clock)
    settings = MemorySettings(
        tiers={
            "L4": {"enabled": False},
            "L5": {"capacity": 2 * size},
            "L6": {"capacity": 2 * size},
        },
        max_block_size=size,
        fsync=False,
    )
    store = TieredStore(
        settings, data_dir=data_dir, devices=devices, events=events, metrics=metrics, clock=clock
    )
    store.open()
    return store


def measure(mib: int, runs: int) -> dict[str, Any]:
    size = mib * MIB
    payload = os.urandom(size)
    raw_s: list[float] = []
    reused_s: list[float] = []
    fast_s: list[float] = []
    fast_reused_s: list[float] = []
    reused = bytearray(size)
    with tempfile.TemporaryDirectory(prefix="vrm-bench-fastpath-") as tmp:
        store = _store(Path(tmp), size)
        store.put("bench/block", payload, durable=True)
        service = FastpathService(
            FastpathSettings(port=0),
            source=store,
            max_put_bytes=size,
            metrics=Metrics(node="bench"),
            clock=SystemClock(),
        )
        service.start()
        assert service.address is not None
        client = TcpInterface(timeout_s=120)
        try:
            if client.recv("bench/block", service.address) != payload:  # warm-up, checked
                raise RuntimeError("the block came back different")
            raw_once(payload)
            for _ in range(runs):
                raw_s.append(raw_once(payload))
                reused_s.append(raw_once(payload, reused))
                t0 = time.perf_counter()
                client.recv("bench/block", service.address)
                fast_s.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                client.recv_into("bench/block", reused, service.address)
                fast_reused_s.append(time.perf_counter() - t0)
        finally:
            service.stop()
            store.close()
    raw_mbs = statistics.median(size / s / 1e6 for s in raw_s)
    reused_mbs = statistics.median(size / s / 1e6 for s in reused_s)
    fast_mbs = statistics.median(size / s / 1e6 for s in fast_s)
    fast_reused_mbs = statistics.median(size / s / 1e6 for s in fast_reused_s)
    return {
        "block_mib": mib,
        "runs": runs,
        "raw_mb_per_s_median": round(raw_mbs),
        "raw_reused_buffer_mb_per_s_median": round(reused_mbs),
        "fastpath_tcp_mb_per_s_median": round(fast_mbs),
        "fastpath_tcp_reused_buffer_mb_per_s_median": round(fast_reused_mbs),
        "ratio": round(fast_mbs / raw_mbs, 3),
        "ratio_reused_buffers": round(fast_reused_mbs / reused_mbs, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": min(fast_mbs / raw_mbs, fast_reused_mbs / reused_mbs) >= TARGET_RATIO,
        "raw_runs_s": [round(s, 4) for s in raw_s],
        "fastpath_runs_s": [round(s, 4) for s in fast_s],
        "machine": f"{platform.machine()} {platform.node()} ({os.cpu_count()} CPUs)",
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="block size in MiB")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.mib, args.runs)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{args.mib} MiB over loopback: raw {result['raw_mb_per_s_median']} MB/s, fastpath TCP "
        f"{result['fastpath_tcp_mb_per_s_median']} MB/s -> {result['ratio']} "
        f"; into a reused buffer: raw {result['raw_reused_buffer_mb_per_s_median']} MB/s, "
        f"fastpath {result['fastpath_tcp_reused_buffer_mb_per_s_median']} MB/s -> "
        f"{result['ratio_reused_buffers']} (target >= {TARGET_RATIO} for both) "
        f"{'OK' if result['meets_target'] else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
