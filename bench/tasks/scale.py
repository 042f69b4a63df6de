"""The queue at scale: submit, lease, status and history latency with 1k ... 1M tasks queued.

``python -m bench.tasks.scale [--sizes 1000,10000,100000,1000000] [--samples 100] [--json]``

Target: with 1,000,000 tasks queued, submit and lease stay within 2x of an empty queue
(indexes, not scans) and a history page costs the same at any depth.

One ``SqliteQueue`` is filled step by step (batches of 10,000 in one transaction each, mixed
priorities and expected run times so the ready index is realistic); a second, nearly empty one
(100 tasks) is the baseline. At each size every operation is timed on both queues, alternating
one call on the big queue with one on the empty queue, so the noise of this shared machine hits
both alike; figures are medians and the ratio is big / empty.

* ``submit``: one task, one transaction, acknowledged after COMMIT; measured without fsync
  (``submit_ms``) so that fsync jitter (0.4-4 ms here) does not hide what the indexes cost, and
  with fsync (``submit_fsync_ms``, the default durability) for the record;
* ``lease``: what a dispatch round does: one read of the next 16 ready tasks in order and of
  the overdue ones (aging, ``starvation_s`` 600: none here), then lease one;
* ``aging``: the overdue read alone when every queued task is overdue (the 8 that have waited
  longest), the index range a round reads once tasks start to starve;
* ``status``: one task by id; ``history``: the newest page of 50, a page 50 deep in the middle
  (by cursor), and a page of one state from the middle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vramancer.arbiter.types import Priority
from vramancer.tasks.model import Grant, NewTask, TaskSpec, TaskState, TaskType
from vramancer.tasks.sqlite_queue import SqliteQueue

FILL_BATCH = 10_000
BASELINE_TASKS = 100
#: ``[tasks] starvation_s`` default: a dispatch round also asks for tasks ready this long.
STARVATION_S = 600.0
PRIORITIES = (Priority.BACKGROUND, Priority.NORMAL, Priority.NORMAL, Priority.HIGH)
SPECS = {p: TaskSpec(type=TaskType.CMD, cmd=["python", "train.py"], priority=p) for p in Priority}


class _Ids:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return f"{self.prefix}{self.n:09d}"


def _new(task_id: str, i: int) -> NewTask:
    priority = PRIORITIES[i % len(PRIORITIES)]
    spec = SPECS[priority]
    body = (
        f'{{"task_id":"{task_id}","type":"cmd","cmd":["python","train.py"],'
        f'"priority":"{priority.value}"}}'
    )
    return NewTask(
        task_id=task_id,
        spec=spec,
        spec_json=body,
        priority_rank=priority.rank,
        estimate_s=float(i % 97),
        estimate_key="cmd:python train.py",
        max_retries=2,
        timeout_s=3600.0,
        maintenance=False,
    )


async def _fill(queue: SqliteQueue, ids: _Ids, count: int, now: float) -> float:
    t0 = time.perf_counter()
    left = count
    while left > 0:
        size = min(FILL_BATCH, left)
        batch = [_new(ids.next(), ids.n) for _ in range(size)]
        await queue.submit(batch, now)
        left -= size
    return time.perf_counter() - t0


def _set_fsync(queue: SqliteQueue, on: bool) -> None:
    writer = queue._writer  # bench-only switch of the writer's fsync policy
    assert writer is not None
    writer._fsync = on


async def _paired(
    samples: int,
    big: Callable[[], Awaitable[Any]],
    empty: Callable[[], Awaitable[Any]],
) -> tuple[float, float]:
    """Median ms of ``big`` and of ``empty``, calls alternating."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(samples):
        t0 = time.perf_counter()
        await big()
        a.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        await empty()
        b.append(time.perf_counter() - t0)
    return statistics.median(a) * 1000, statistics.median(b) * 1000


class _Side:
    """One queue under test and the ids it has."""

    def __init__(self, queue: SqliteQueue, ids: _Ids) -> None:
        self.queue = queue
        self.ids = ids

    async def submit(self) -> None:
        await self.queue.submit([_new(self.ids.next(), self.ids.n)], time.time())

    async def lease(self) -> None:
        ready, _ = await self.queue.dispatch_view(
            limit=16, overdue_before=time.time() - STARVATION_S, overdue_limit=8
        )
        first = ready[0]
        await self.queue.lease(
            [Grant(first.task_id, "gpu:0", previous=first.state)],
            worker="bench",
            now=time.time(),
            lease_s=30,
        )

    async def aging(self) -> None:
        _, overdue = await self.queue.dispatch_view(
            limit=0, overdue_before=time.time(), overdue_limit=8
        )
        assert len(overdue) == 8

    async def status(self) -> None:
        await self.queue.get(f"{self.ids.prefix}{max(1, self.ids.n // 2):09d}")

    async def history_first(self) -> None:
        await self.queue.history(state=None, since=None, cursor=None, limit=50)

    async def history_deep(self) -> None:
        await self.queue.history(state=None, since=None, cursor=str(self.ids.n // 2), limit=50)

    async def history_state(self) -> None:
        await self.queue.history(
            state=TaskState.QUEUED, since=None, cursor=str(self.ids.n // 2), limit=50
        )


async def _measure_size(big: _Side, empty: _Side, samples: int) -> dict[str, float]:
    out: dict[str, float] = {}
    names = ("submit", "lease", "aging", "status", "history_first", "history_deep", "history_state")
    for name in names:
        b, e = await _paired(samples, getattr(big, name), getattr(empty, name))
        out[f"{name}_ms"] = round(b, 4)
        out[f"{name}_empty_ms"] = round(e, 4)
        out[f"{name}_ratio"] = round(b / e, 2) if e else 0.0
    _set_fsync(big.queue, True)
    _set_fsync(empty.queue, True)
    b, e = await _paired(max(10, samples // 4), big.submit, empty.submit)
    _set_fsync(big.queue, False)
    _set_fsync(empty.queue, False)
    out["submit_fsync_ms"] = round(b, 3)
    out["submit_fsync_empty_ms"] = round(e, 3)
    return out


async def run(sizes: list[int], samples: int, workdir: Path) -> list[dict[str, Any]]:
    big_q = SqliteQueue(workdir / "big.sqlite")
    empty_q = SqliteQueue(workdir / "empty.sqlite")
    await big_q.open()
    await empty_q.open()
    _set_fsync(big_q, False)
    _set_fsync(empty_q, False)
    big = _Side(big_q, _Ids("b"))
    empty = _Side(empty_q, _Ids("e"))
    now = time.time()
    await _fill(empty_q, empty.ids, BASELINE_TASKS, now)
    rows = []
    queued = 0
    try:
        for size in sorted(sizes):
            fill_s = await _fill(big_q, big.ids, size - queued, now)
            fill_rate = (size - queued) / fill_s if fill_s else 0.0
            queued = size
            row: dict[str, Any] = {"queued": size, "fill_tasks_per_s": round(fill_rate)}
            row.update(await _measure_size(big, empty, samples))
            # Keep the baseline nearly empty: top it up to BASELINE_TASKS ready tasks.
            await _fill(empty_q, empty.ids, samples, now)
            row["db_mib"] = round(
                sum(p.stat().st_size for p in workdir.glob("big.sqlite*")) / 2**20, 1
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        await big_q.close()
        await empty_q.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--dir", type=Path, default=None, help="where the databases go")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="vrm-bench-scale-", dir=args.dir) as tmp:
        rows = asyncio.run(run(sizes, args.samples, Path(tmp)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    header = (
        "queued      submit  lease   aging   status  hist.first hist.deep hist.state  (ms; ratio)"
    )
    print(header)
    for r in rows:
        print(
            f"{r['queued']:>9,}  "
            + "  ".join(
                f"{r[k + '_ms']:.3f} ({r[k + '_ratio']:.2f}x)"
                for k in (
                    "submit",
                    "lease",
                    "aging",
                    "status",
                    "history_first",
                    "history_deep",
                    "history_state",
                )
            )
        )


if __name__ == "__main__":
    main()
