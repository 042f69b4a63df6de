"""Scale of the memory policy: metadata bytes per block and eviction time.

``python -m bench.memory.scale [--sizes 10000 100000 1000000] [--runs 5] [--json]``

For each size ``n`` it builds what the store keeps per block — a :class:`BlockMeta` in an
``id -> meta`` dict, indexed by the default policy's :class:`HotnessIndex` (window + heap) —
and measures, beside the baseline of the bare id dict:

* **Python heap per block** (``tracemalloc``): everything allocated while building the metadata
  and the index, divided by ``n``. Target ≤ 500 bytes.
* **Eviction cycle**: ``victims(1 % of the indexed bytes)`` then ``remove`` of every victim (what
  the store's cycle does besides moving data), median of ``--runs`` cycles on a warm index with
  hits spread over it. Target ≤ 200 ms at 1,000,000 blocks. The full sort of every block that an
  index without incremental structure would need is timed beside it, as the baseline.

Ids look like the store's (``model-x/shard-00001234``), sizes vary per block (distinct int
objects, as ``len(data)`` gives), and a tenth of the blocks have been read (own hit counts).

``--store`` measures the same through the real ``TieredStore`` (L4 only, 8-byte ``bytes``
blocks put one by one): Python heap per block of everything the store keeps (its entry, layout,
data object, catalogue of ids, and the policy structures above), and the time of
``victims(1 %)`` on the store's own L4 index (selection only: without a lower tier the store
cannot demote, and moving data is the data-path benchmark's business).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import tracemalloc
from dataclasses import dataclass
from typing import Any

from vramancer.memory.policy import BlockMeta, HotnessIndex, default_policy

DEFAULT_SIZES = (10_000, 100_000, 1_000_000)
EVICT_SHARE = 0.01
BYTES_BUDGET = 500
CYCLE_BUDGET_S = 0.200


@dataclass
class ScaleRow:
    blocks: int
    bytes_per_block: float
    dict_only_bytes_per_block: float
    build_s: float
    cycle_ms: float
    victims_per_cycle: int
    full_sort_ms: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "blocks": self.blocks,
            "bytes_per_block": round(self.bytes_per_block, 1),
            "dict_only_bytes_per_block": round(self.dict_only_bytes_per_block, 1),
            "build_s": round(self.build_s, 2),
            "cycle_ms": round(self.cycle_ms, 2),
            "victims_per_cycle": self.victims_per_cycle,
            "full_sort_ms": round(self.full_sort_ms, 1),
            "bytes_ok": self.bytes_per_block <= BYTES_BUDGET,
            "cycle_ok": self.cycle_ms / 1000 <= CYCLE_BUDGET_S,
        }


def _build(n: int) -> tuple[dict[str, BlockMeta], HotnessIndex, float]:
    bundle = default_policy()
    index = bundle.new_index(reload_latency=16.0, tier="L5")
    blocks: dict[str, BlockMeta] = {}
    now = 1000.0
    for i in range(n):
        now += 0.001
        meta = BlockMeta(
            id=f"model-x/shard-{i:08d}",
            size=4096 + (i * 7919) % 65536,
            tier="L4",
            created=now,
            last_access=now,
        )
        blocks[meta.id] = meta
        index.add(meta, now)
    for i in range(0, n, 10):  # a tenth has been read: its own count and a re-keyed entry
        now += 0.001
        meta = blocks[f"model-x/shard-{(i * 7) % n:08d}"]
        bundle.hotness.record_hit(meta, now)
        index.touch(meta, now)
    return blocks, index, now


def _heap_per_block(n: int) -> tuple[float, float]:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    blocks, index, _ = _build(n)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del blocks, index
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    only = {f"model-x/shard-{i:08d}": i for i in range(n)}
    dict_used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    del only
    return used / n, dict_used / n


def _cycles(n: int, runs: int) -> tuple[float, int, float, float]:
    start = time.perf_counter()
    blocks, index, now = _build(n)
    build_s = time.perf_counter() - start
    need = int(EVICT_SHARE * index.bytes)
    times: list[float] = []
    count = 0
    for _ in range(runs):
        now += 0.001
        t0 = time.perf_counter()
        victims = index.victims(need, now)
        for victim in victims:
            index.remove(victim)
        times.append(time.perf_counter() - t0)
        count = len(victims)
        for victim in victims:  # back in (a demoted block promoted again), off the clock
            index.add(victim, now)
    sorts: list[float] = []
    for _ in range(max(1, runs // 2)):
        t0 = time.perf_counter()
        ranked = sorted(index.blocks(), key=index.value_log)
        sorts.append(time.perf_counter() - t0)
        del ranked
    del blocks
    return statistics.median(times), count, statistics.median(sorts), build_s


def _store_row(n: int, runs: int) -> dict[str, Any]:
    """Heap per block and ``victims(1 %)`` time through a real ``TieredStore`` (L4 only)."""
    import tempfile
    from pathlib import Path

    from bench.memory.common import open_store
    from vramancer.clock import ManualClock
    from vramancer.memory.settings import MemorySettings

    clock = ManualClock()
    settings = MemorySettings(
        tiers={"L4": {"capacity": 1 << 40}, "L5": {"enabled": False}, "L6": {"enabled": False}},
        fsync=False,
        spill_on_stop=False,
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(settings, Path(tmp), clock)
        gc.collect()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        for i in range(n):
            clock.advance(0.001)
            store.put(f"model-x/shard-{i:08d}", i.to_bytes(8, "little"))
        put_s = time.perf_counter() - start
        used = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        index = store._by_name["L4"].index  # the store's own index for the tier
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            victims = index.victims(max(1, n // 100) * 8, clock.monotonic())
            times.append(time.perf_counter() - t0)
        store.close(spill=False)
    return {
        "blocks": n,
        "store_bytes_per_block": round(used / n, 1),
        "put_us": round(put_s / n * 1e6, 1),
        "victims_ms": round(statistics.median(times) * 1000, 2),
        "victims": len(victims),
    }


def measure(sizes: tuple[int, ...], runs: int) -> list[ScaleRow]:
    rows: list[ScaleRow] = []
    for n in sizes:
        per_block, dict_only = _heap_per_block(n)
        cycle_s, count, sort_s, build_s = _cycles(n, runs)
        rows.append(
            ScaleRow(n, per_block, dict_only, build_s, cycle_s * 1000, count, sort_s * 1000)
        )
        gc.collect()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory.scale")
    parser.add_argument("--sizes", nargs="*", type=int, default=list(DEFAULT_SIZES))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--store", action="store_true", help="through the real TieredStore")
    args = parser.parse_args(argv)
    if args.store:
        store_rows = [_store_row(n, args.runs) for n in args.sizes]
        if args.json:
            print(json.dumps(store_rows, indent=2))
        else:
            print("| blocks | store heap B/block | put µs | victims(1 %) ms | victims |")
            print("|---|---|---|---|---|")
            for sr in store_rows:
                print(
                    f"| {sr['blocks']:,} | {sr['store_bytes_per_block']:.0f} "
                    f"| {sr['put_us']:.0f} | {sr['victims_ms']:.1f} | {sr['victims']:,} |"
                )
        return 0
    rows = measure(tuple(args.sizes), args.runs)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    print(
        "| blocks | heap B/block | (id dict alone) | eviction cycle ms | victims | "
        "full sort ms (baseline) | build s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r.blocks:,} | {r.bytes_per_block:.0f} | {r.dict_only_bytes_per_block:.0f} "
            f"| {r.cycle_ms:.1f} | {r.victims_per_cycle:,} | {r.full_sort_ms:.0f} "
            f"| {r.build_s:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
