"""Hit-path benchmark: ``get`` of L4-resident blocks, operations per second, one core.

``python -m bench.memory.hitpath [--runs 5] [--ops 200000] [--json]``

The store runs with its default policy (decayed hotness, eviction index touch, sequential
prefetcher) and a ``ManualClock`` advanced by 1 µs per operation. Cases:

* ``one block``: the same 4 KiB bytes block over and over;
* ``10k blocks, uniform``: 10,000 resident 4 KiB blocks read in a random order;
* ``numpy 1 MiB``: a 1 MiB float32 array (``get`` returns a read-only view, no copy).

Baseline in the same run: a plain ``dict.get`` under a ``threading.Lock`` with the same keys
(the least any thread-safe store does). Target: ≥ 100,000 ``get``/s for the store. The process
is pinned to one CPU where the OS allows it. Medians of ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.memory.common import open_store
from vramancer.clock import ManualClock
from vramancer.memory.policy import (
    BlockMeta,
    DecayedHotness,
    EvictionIndex,
    FastestFirstStrategy,
    LruIndex,
    TierView,
)
from vramancer.memory.settings import MemorySettings
from vramancer.memory.store import StorePolicy, TieredStore

TARGET_OPS = 100_000


class MinimalPolicy:
    """Decayed hit count, LRU index, no prefetch: isolates the store's own hit-path cost."""

    def __init__(self) -> None:
        self.hotness = DecayedHotness()
        self.placement = FastestFirstStrategy()

    def new_index(self, reload_latency: float, tier: str | None) -> EvictionIndex:
        return LruIndex()

    def on_put(self, block: BlockMeta) -> None:
        return None

    def on_read(self, block: BlockMeta, now: float) -> Sequence[str]:
        self.hotness.record_hit(block, now)
        return ()

    def should_promote(
        self, block: BlockMeta, from_tier: TierView | str, to_tier: TierView, now: float
    ) -> bool:
        return False


def make_store(
    directory: Path, clock: ManualClock, policy: StorePolicy | None = None
) -> TieredStore:
    settings = MemorySettings(
        tiers={"L4": {"capacity": "1GiB"}, "L5": {"capacity": "1GiB"}, "L6": {"capacity": "1GiB"}},
        fsync=False,
        spill_on_stop=False,
    )
    return open_store(settings, directory, clock, policy=policy)


def measure(store: TieredStore, clock: ManualClock, keys: list[str]) -> float:
    get = store.get
    advance = clock.advance
    start = time.perf_counter()
    for key in keys:
        get(key)
        advance(1e-6)
    return len(keys) / (time.perf_counter() - start)


def measure_dict(table: dict[str, Any], keys: list[str]) -> float:
    lock = threading.Lock()
    start = time.perf_counter()
    for key in keys:
        with lock:
            table.get(key)
    return len(keys) / (time.perf_counter() - start)


def run(runs: int, ops: int) -> dict[str, Any]:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    rng = np.random.default_rng(0)
    clock = ManualClock()
    cases: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="vrm-hitpath-") as tmp:
        store = make_store(Path(tmp), clock)
        store.put("one", bytes(4096))
        cases["one block"] = ["one"] * ops
        for i in range(10_000):
            store.put(f"blk/{i}", rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
        order = rng.integers(0, 10_000, ops)
        cases["10k blocks, uniform"] = [f"blk/{i}" for i in order]
        store.put("arr", rng.standard_normal(256 * 1024).astype(np.float32))
        cases["numpy 1 MiB"] = ["arr"] * ops
        assert all(t["name"] != "L4" or t["blocks"] == 10_002 for t in store.stats()["tiers"])
        table = {k: None for k in ("one", "arr", *(f"blk/{i}" for i in range(10_000)))}
        results: dict[str, Any] = {}
        for name, keys in cases.items():
            store_ops = [measure(store, clock, keys) for _ in range(runs)]
            dict_ops = [measure_dict(table, keys) for _ in range(runs)]
            ops_s = statistics.median(store_ops)
            results[name] = {
                "store_ops_s": round(ops_s),
                "dict_lock_ops_s": round(statistics.median(dict_ops)),
                "pass": ops_s >= TARGET_OPS,
            }
        assert all(store.locate(k) == "L4" for k in ("one", "arr", "blk/0"))
        store.close()
    with tempfile.TemporaryDirectory(prefix="vrm-hitpath-") as tmp:
        minimal = make_store(Path(tmp), clock, MinimalPolicy())
        for i in range(10_000):
            minimal.put(f"blk/{i}", bytes(4096))
        keys = cases["10k blocks, uniform"]
        store_ops = [measure(minimal, clock, keys) for _ in range(runs)]
        dict_ops = [measure_dict(table, keys) for _ in range(runs)]
        ops_s = statistics.median(store_ops)
        results["10k blocks, uniform, minimal policy (store's own cost)"] = {
            "store_ops_s": round(ops_s),
            "dict_lock_ops_s": round(statistics.median(dict_ops)),
            "pass": ops_s >= TARGET_OPS,
        }
        minimal.close()
    return {"ops": ops, "runs": runs, "target_ops_s": TARGET_OPS, "cases": results}


def report(result: dict[str, Any]) -> str:
    lines = [
        f"Hit path, {result['ops']} gets per run, median of {result['runs']} runs, one core",
        "",
        "| case | store get/s | dict+lock get/s | ≥ 100k/s |",
        "|---|---:|---:|---|",
    ]
    for name, r in result["cases"].items():
        ok = "yes" if r["pass"] else "NO"
        lines.append(f"| {name} | {r['store_ops_s']:,} | {r['dict_lock_ops_s']:,} | {ok} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ops", type=int, default=200_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.runs, args.ops)
    print(json.dumps(result, indent=2) if args.json else report(result))
    default = [r for name, r in result["cases"].items() if "minimal" not in name]
    return 0 if all(r["pass"] for r in default) else 1


if __name__ == "__main__":
    sys.exit(main())
