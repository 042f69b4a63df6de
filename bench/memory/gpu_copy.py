"""GPU copy benchmark: L3 (pinned host) ↔ L1 (VRAM) for 64 MiB blocks.

``python -m bench.memory.gpu_copy [--runs 9] [--mib 64] [--json]``

Needs torch with CUDA and an NVIDIA GPU; elsewhere it says so and exits with status 2.
Store legs: ``store.promote(id, "L1")`` from L3 and ``store.demote(id, "L3")`` from L1 — the
store's whole move (backend copy, stream synchronisation, accounting, events). Baseline in the
same run: torch's own ``copy_`` between a pinned host tensor and a device tensor of the same
size (``non_blocking=True`` then ``torch.cuda.synchronize()``). Medians; target ≥ 80 %.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.memory.common import open_store
from vramancer.clock import SystemClock
from vramancer.memory.settings import MemorySettings

MIB = 1024 * 1024
TARGET = 0.80


def timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def run(runs: int, mib: int, directory: Path) -> dict[str, Any]:
    import torch

    size = mib * MIB
    settings = MemorySettings(
        tiers={
            "L1": {"capacity": 4 * size},
            "L3": {"capacity": 4 * size},
            "L4": {"capacity": 4 * size},
            "L5": {"capacity": 4 * size},
            "L6": {"capacity": 4 * size},
        },
        fsync=False,
        spill_on_stop=False,
    )
    store = open_store(settings, directory, SystemClock())
    if store.tiers[0] != "L1" or "L3" not in store.tiers:
        raise SystemExit(f"gpu_copy: the store has no L1/L3 here (tiers: {store.tiers})")
    sync = torch.cuda.synchronize
    block = torch.randint(0, 256, (size,), dtype=torch.uint8)
    assert store.put("b", block) == "L1"
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(size, dtype=torch.uint8, device="cuda")
    pinned.copy_(block)
    samples: dict[str, list[float]] = {k: [] for k in ("s_h2d", "s_d2h", "b_h2d", "b_d2h")}
    for i in range(runs + 1):  # the first round warms allocators up and is dropped
        d2h = timed(lambda: store.demote("b", "L3"), sync)
        h2d = timed(lambda: store.promote("b", "L1"), sync)
        b_h2d = timed(lambda: device.copy_(pinned, non_blocking=True), sync)
        b_d2h = timed(lambda: pinned.copy_(device, non_blocking=True), sync)
        if i:
            samples["s_d2h"].append(d2h)
            samples["s_h2d"].append(h2d)
            samples["b_h2d"].append(b_h2d)
            samples["b_d2h"].append(b_d2h)
    back = store.get("b")
    assert back.is_cuda and torch.equal(back.cpu(), block)
    store.close()

    def gbs(values: list[float]) -> float:
        return size / statistics.median(values) / 1e9

    legs = {
        "L3->L1": (gbs(samples["s_h2d"]), gbs(samples["b_h2d"])),
        "L1->L3": (gbs(samples["s_d2h"]), gbs(samples["b_d2h"])),
    }
    return {
        "device": torch.cuda.get_device_name(0),
        "block_bytes": size,
        "runs": runs,
        "target_ratio": TARGET,
        "legs": {
            leg: {
                "store_gb_s": round(s, 2),
                "torch_gb_s": round(b, 2),
                "ratio": round(s / b, 3),
                "pass": s / b >= TARGET,
            }
            for leg, (s, b) in legs.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("gpu_copy: needs torch with CUDA (pip install torch); nothing measured")
        return 2
    if not torch.cuda.is_available():
        print(
            "gpu_copy: no CUDA device here (torch.cuda.is_available() is False); "
            "run it on a machine with an NVIDIA GPU. Nothing measured."
        )
        return 2
    with tempfile.TemporaryDirectory(prefix="vrm-gpucopy-") as tmp:
        result = run(args.runs, args.mib, Path(tmp))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"GPU copy on {result['device']}, {args.mib} MiB blocks, median of {args.runs}")
        print("| leg | store GB/s | torch pinned copy GB/s | ratio | ≥ 80 % |")
        print("|---|---:|---:|---:|---|")
        for leg, r in result["legs"].items():
            ok = "yes" if r["pass"] else "NO"
            print(f"| {leg} | {r['store_gb_s']} | {r['torch_gb_s']} | {r['ratio']:.0%} | {ok} |")
    return 0 if all(r["pass"] for r in result["legs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
