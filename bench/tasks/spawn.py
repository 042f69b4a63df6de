"""Per-task overhead of the scheduler: ``n`` ``cmd`` tasks running ``true`` against spawning
``true`` ``n`` times directly (target: at most 10 ms of overhead per task).

``python -m bench.tasks.spawn [--n 1000] [--runs 3] [--json]``

Both sides run the tasks one after the other: the scheduler on a CPU-only host with one slot
(``host_slots = 1``), the baseline with ``subprocess.run(["true"])`` in a loop. The scheduler's
side includes everything a user task costs: submit (durable, fsynced), dispatch, lease, the
``running`` mark, the process with captured output, completion, events and metrics. Runs
alternate (baseline, scheduler, baseline ...) and the figures are medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from vramancer.arbiter.arbiter import Arbiter
from vramancer.arbiter.settings import ArbiterSettings
from vramancer.clock import SystemClock
from vramancer.devices.manager import DeviceManager
from vramancer.devices.settings import DevicesSettings
from vramancer.events import EventBus
from vramancer.observability.metrics import Metrics
from vramancer.tasks.service import TaskService
from vramancer.tasks.settings import TasksSettings

TARGET_OVERHEAD_MS = 10.0


class _NoMemory:
    """Maintenance is not exercised here."""

    def warmup(self, max_blocks: int) -> int:
        return 0

    def compress_cold(self, max_blocks: int) -> int:
        return 0


def direct(n: int) -> float:
    """Seconds to spawn ``true`` ``n`` times, one after the other."""
    true = shutil.which("true") or "true"
    t0 = time.perf_counter()
    for _ in range(n):
        subprocess.run([true], check=True)
    return time.perf_counter() - t0


async def _scheduled(n: int, data_dir: Path) -> float:
    clock = SystemClock()
    events = EventBus()
    metrics = Metrics(node="bench")
    devices = DeviceManager(
        DevicesSettings(backends=[]), events=events, metrics=metrics, clock=clock
    )
    await devices.start()
    arbiter = Arbiter(
        ArbiterSettings(), devices=devices, events=events, metrics=metrics, clock=clock
    )
    svc = TaskService(
        TasksSettings(host_slots=1),
        data_dir=data_dir,
        devices=devices,
        arbiter=arbiter,
        memory=_NoMemory(),
        events=events,
        metrics=metrics,
        clock=clock,
    )
    await svc.start()
    try:
        t0 = time.perf_counter()
        ids = [s.task_id for s in await svc.submit_batch([{"type": "cmd", "cmd": ["true"]}] * n)]
        await svc.wait(ids, timeout_s=600)
        elapsed = time.perf_counter() - t0
        if svc.counts()["done"] != n:
            raise RuntimeError(f"expected {n} done, got {svc.counts()}")
        return elapsed
    finally:
        await svc.stop()
        await devices.stop()


def scheduled(n: int) -> float:
    """Seconds for ``n`` ``true`` tasks through a fresh TaskService (one host slot)."""
    with tempfile.TemporaryDirectory(prefix="vrm-bench-spawn-") as tmp:
        return asyncio.run(_scheduled(n, Path(tmp)))


def measure(n: int, runs: int) -> dict[str, Any]:
    scheduled(20)  # warm-up: imports, SQLite, first spawn
    direct(20)
    base, sched = [], []
    for _ in range(runs):
        base.append(direct(n))
        sched.append(scheduled(n))
    b, s = statistics.median(base), statistics.median(sched)
    overhead_ms = (s - b) / n * 1000
    return {
        "n": n,
        "runs": runs,
        "direct_s": round(b, 3),
        "scheduled_s": round(s, 3),
        "direct_per_task_ms": round(b / n * 1000, 3),
        "scheduled_per_task_ms": round(s / n * 1000, 3),
        "overhead_per_task_ms": round(overhead_ms, 3),
        "ratio": round(s / b, 2),
        "target_overhead_ms": TARGET_OVERHEAD_MS,
        "meets_target": overhead_ms <= TARGET_OVERHEAD_MS,
        "all_direct_s": [round(x, 3) for x in base],
        "all_scheduled_s": [round(x, 3) for x in sched],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.n, args.runs)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{args.n} x true: direct {result['direct_per_task_ms']:.2f} ms/task, scheduled "
        f"{result['scheduled_per_task_ms']:.2f} ms/task -> overhead "
        f"{result['overhead_per_task_ms']:.2f} ms/task (target <= {TARGET_OVERHEAD_MS} ms) "
        f"{'OK' if result['meets_target'] else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
