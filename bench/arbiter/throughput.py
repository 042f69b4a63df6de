"""Arbiter request/release cost beside a bare accountant, run side by side.

``python -m bench.arbiter.throughput [--json]``

* baseline: a lock, a dict and a sum — the least a correct VRAM accountant does (no priorities,
  quality, preemption, events or metrics);
* vramancer: ``Arbiter.allocate`` + ``release_allocation`` with the same number of
  live allocations, and a preempting request (a user-facing request that takes one background
  holder, which is then given back so every round sees the same state).

Each figure is the median over 15 batches of 400 operations (robust to GC pauses and a busy
machine); ratios are vramancer / baseline.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import threading
import time
from collections.abc import Callable

from vramancer.arbiter.arbiter import Arbiter
from vramancer.arbiter.types import AllocationRequest, Priority, WorkloadType
from vramancer.units import GIB, MIB

RUNS = 15
OPS = 400


class BareAccountant:
    """Grants while the sum fits; nothing else."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._held: dict[int, int] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def request(self, size: int) -> int:
        with self._lock:
            if sum(self._held.values()) + size > self.budget:
                raise MemoryError(size)
            key = next(self._ids)
            self._held[key] = size
            return key

    def release(self, key: int) -> None:
        with self._lock:
            del self._held[key]


def _median_us(op: Callable[[], None]) -> float:
    samples = []
    for _ in range(RUNS):
        start = time.perf_counter()
        for _ in range(OPS):
            op()
        samples.append((time.perf_counter() - start) / OPS * 1e6)
    return statistics.median(samples)


def measure(live: int) -> dict[str, float]:
    budget = 64 * GIB
    size = 16 * MIB
    bare = BareAccountant(budget)
    for _ in range(live):
        bare.request(size)

    def bare_op() -> None:
        bare.release(bare.request(size))

    arbiter = Arbiter.for_vram_gb(64)
    for _ in range(live):
        arbiter.allocate(AllocationRequest(WorkloadType.OTHER, Priority.BACKGROUND, size))

    def arbiter_op() -> None:
        granted = arbiter.allocate(AllocationRequest(WorkloadType.LLM, Priority.NORMAL, size))
        arbiter.release_allocation(granted.id)

    full = Arbiter.for_vram_gb(1)
    per_holder = GIB // max(1, live)
    for _ in range(live):
        full.allocate(AllocationRequest(WorkloadType.OTHER, Priority.BACKGROUND, per_holder))

    def preempt_op() -> None:
        granted = full.allocate(
            AllocationRequest(WorkloadType.LLM, Priority.USER_FACING, per_holder)
        )
        full.release_allocation(granted.id)
        full.allocate(AllocationRequest(WorkloadType.OTHER, Priority.BACKGROUND, per_holder))

    baseline = _median_us(bare_op)
    plain = _median_us(arbiter_op)
    preempting = _median_us(preempt_op)
    return {
        "live_allocations": live,
        "baseline_us": round(baseline, 2),
        "vramancer_us": round(plain, 2),
        "ratio": round(plain / baseline, 1),
        "vramancer_preempt_us": round(preempting, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [measure(live) for live in (0, 10, 100, 1000)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'live':>6} {'baseline µs':>12} {'vramancer µs':>13} {'ratio':>6} {'preempt µs':>11}")
    for r in rows:
        print(
            f"{r['live_allocations']:>6} {r['baseline_us']:>12} {r['vramancer_us']:>13} "
            f"{r['ratio']:>6} {r['vramancer_preempt_us']:>11}"
        )


if __name__ == "__main__":
    main()
