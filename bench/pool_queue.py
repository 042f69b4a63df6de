"""The pool's JetStream task queue against the embedded SQLite one: submit and lease cost with
an empty queue and with 100k tasks queued, both queues in the same run.

``python -m bench.pool_queue [--queued 100000] [--samples 200] [--json]``

A local ``nats-server -js`` (file store in a temporary directory; ``$VRM_BENCH_NATS_SERVER``,
else ``nats-server`` on PATH or ``/usr/sbin/nats-server``) holds two buckets, one filled with
``--queued`` tasks (mixed priorities and expected run times, as ``bench.tasks.scale``), one
nearly empty (100 tasks); the SQLite side is two ``SqliteQueue`` files filled the same way
(``synchronous=NORMAL``: no fsync per commit, as JetStream's file store does not fsync each
write by default). Calls alternate big / empty so this shared machine's noise hits both alike;
figures are medians in microseconds per operation.

* ``submit``: one task, acknowledged once durable (JetStream: the create's acknowledgement);
* ``lease``: what a dispatch round does: read the next 16 ready tasks and the overdue ones,
  then lease the first;
* ``load_s``: a new orchestrator's ``open()`` of the big bucket (the watcher delivers every
  task into the in-memory copy).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats

from bench.tasks.scale import BASELINE_TASKS, STARVATION_S, _Ids, _new, _paired
from vramancer.pool.jsqueue import JetStreamQueue
from vramancer.tasks.model import Grant
from vramancer.tasks.queue import TaskQueue
from vramancer.tasks.settings import Synchronous
from vramancer.tasks.sqlite_queue import SqliteQueue

FILL_BATCH = 1000


def _binary() -> str:
    found = os.environ.get("VRM_BENCH_NATS_SERVER") or shutil.which("nats-server")
    if found is None and Path("/usr/sbin/nats-server").exists():
        found = "/usr/sbin/nats-server"
    if found is None:
        raise SystemExit("no nats-server (set VRM_BENCH_NATS_SERVER or install nats-server)")
    return found


@contextlib.contextmanager
def nats_server(store: Path) -> Iterator[str]:
    """A JetStream server on a free port; its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [_binary(), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            time.sleep(0.05)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


class Side:
    """One queue under test, the ids it has, and the two operations timed."""

    def __init__(self, queue: TaskQueue, prefix: str) -> None:
        self.queue = queue
        self.ids = _Ids(prefix)

    async def fill(self, count: int) -> float:
        t0 = time.perf_counter()
        left = count
        while left > 0:
            size = min(FILL_BATCH, left)
            batch = [_new(self.ids.next(), self.ids.n) for _ in range(size)]
            await self.queue.submit(batch, time.time())
            left -= size
        return time.perf_counter() - t0

    async def submit(self) -> None:
        await self.queue.submit([_new(self.ids.next(), self.ids.n)], time.time())

    async def lease(self) -> None:
        ready, _ = await self.queue.dispatch_view(
            limit=16, overdue_before=time.time() - STARVATION_S, overdue_limit=8
        )
        first = ready[0]
        leased, _ = await self.queue.lease(
            [Grant(first.task_id, "node-1/gpu:0", previous=first.state)],
            worker="bench",
            now=time.time(),
            lease_s=30,
        )
        assert leased, "the first ready task was not leased"


async def compare(big: Side, empty: Side, samples: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("submit", "lease"):
        b, e = await _paired(samples, getattr(big, name), getattr(empty, name))
        out[f"{name}_us"] = round(b * 1000, 1)
        out[f"{name}_empty_us"] = round(e * 1000, 1)
        out[f"{name}_ratio"] = round(b / e, 2) if e else 0.0
    return out


@contextlib.asynccontextmanager
async def js_link(url: str) -> AsyncIterator[Any]:
    nc = await nats.connect(url)
    try:
        yield nc
    finally:
        await nc.close()


async def jetstream_side(url: str, queued: int, samples: int) -> dict[str, Any]:
    async with js_link(url) as nc:
        big_q = JetStreamQueue(nc.jetstream, bucket="bench_big")
        empty_q = JetStreamQueue(nc.jetstream, bucket="bench_empty")
        await big_q.open()
        await empty_q.open()
        big, empty = Side(big_q, "b"), Side(empty_q, "e")
        fill_s = await big.fill(queued)
        await empty.fill(BASELINE_TASKS)
        row = {"fill_tasks_per_s": round(queued / fill_s) if fill_s else 0}
        row.update(await compare(big, empty, samples))
        fresh = JetStreamQueue(nc.jetstream, bucket="bench_big")
        t0 = time.perf_counter()
        await fresh.open()
        row["load_s"] = round(time.perf_counter() - t0, 2)
        row["loaded_tasks"] = sum((await fresh.counts()).values())
        for q in (fresh, big_q, empty_q):
            await q.close()
    return row


async def sqlite_side(workdir: Path, queued: int, samples: int) -> dict[str, Any]:
    big_q = SqliteQueue(workdir / "big.sqlite", synchronous=Synchronous.NORMAL)
    empty_q = SqliteQueue(workdir / "empty.sqlite", synchronous=Synchronous.NORMAL)
    await big_q.open()
    await empty_q.open()
    try:
        big, empty = Side(big_q, "b"), Side(empty_q, "e")
        fill_s = await big.fill(queued)
        await empty.fill(BASELINE_TASKS)
        row = {"fill_tasks_per_s": round(queued / fill_s) if fill_s else 0}
        row.update(await compare(big, empty, samples))
        return row
    finally:
        await big_q.close()
        await empty_q.close()


async def run(queued: int, samples: int, workdir: Path) -> dict[str, Any]:
    with nats_server(workdir / "nats") as url:
        jetstream = await jetstream_side(url, queued, samples)
    sqlite = await sqlite_side(workdir, queued, samples)
    return {"queued": queued, "samples": samples, "jetstream": jetstream, "sqlite": sqlite}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queued", type=int, default=100_000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dir", type=Path, default=None, help="where the stores go")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vrm-bench-pool-queue-", dir=args.dir) as tmp:
        result = asyncio.run(run(args.queued, args.samples, Path(tmp)))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['queued']:,} tasks queued vs {BASELINE_TASKS}; median us per operation")
    for name in ("jetstream", "sqlite"):
        r = result[name]
        print(
            f"{name:>9}: submit {r['submit_us']:8.1f} (empty {r['submit_empty_us']:8.1f}, "
            f"{r['submit_ratio']:.2f}x)  lease {r['lease_us']:8.1f} "
            f"(empty {r['lease_empty_us']:8.1f}, {r['lease_ratio']:.2f}x)"
        )
    print(
        f"JetStream: a new orchestrator loads the big bucket in {result['jetstream']['load_s']} s"
    )


if __name__ == "__main__":
    main()
