"""Cost of one NVML poll, on a machine with an NVIDIA GPU.

``python -m bench.api.nvml_poll [--iterations 200] [--json]``

Measures, with real NVML: one ``NvidiaBackend.read(i)`` per GPU (memory, utilization,
temperature, power, processes, MIG), and a whole ``DeviceManager.refresh()`` (every GPU plus
the host). The baseline is the same manager with no real backend (host only), run side by
side; figures are medians and p99 in microseconds. Exits with 2 where NVML finds no GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from vramancer.clock import SystemClock
from vramancer.devices.manager import DeviceManager
from vramancer.devices.nvidia import NvidiaBackend
from vramancer.devices.settings import DevicesSettings
from vramancer.events import EventBus
from vramancer.observability.metrics import Metrics


def _timings_us(fn: Callable[[], object], iterations: int) -> dict[str, float]:
    fn()  # warm-up
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return {
        "median_us": round(statistics.median(samples), 1),
        "p99_us": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 1),
    }


def _manager(backends: list[str]) -> DeviceManager:
    settings = DevicesSettings.model_validate({"backends": backends})
    return DeviceManager(
        settings, events=EventBus(), metrics=Metrics(node="bench"), clock=SystemClock()
    )


def run(iterations: int) -> dict[str, Any] | None:
    backend = NvidiaBackend.open()
    if backend is None:
        return None
    result: dict[str, Any] = {"iterations": iterations, "gpus": []}
    try:
        for i in range(backend.device_count()):
            snap = backend.read(i)
            entry = {"index": i, "name": snap.name, "uuid": snap.uuid,
                     "mig_slices": len(snap.mig), "processes": len(snap.processes)}  # fmt: skip
            entry.update(_timings_us(lambda i=i: backend.read(i), iterations))  # type: ignore[misc]
            result["gpus"].append(entry)
    finally:
        backend.close()
    with_nvml = _manager(["nvidia"])
    host_only = _manager([])
    try:
        result["manager_refresh_nvidia"] = _timings_us(with_nvml.refresh, iterations)
        result["manager_refresh_host_only"] = _timings_us(host_only.refresh, iterations)
    finally:
        with_nvml.close()
        host_only.close()
    result["nvml_share_of_refresh_us"] = round(
        result["manager_refresh_nvidia"]["median_us"]
        - result["manager_refresh_host_only"]["median_us"],
        1,
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.iterations)
    if result is None:
        print("no NVIDIA GPU answered NVML on this machine; nothing to measure", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for gpu in result["gpus"]:
            print(f"GPU {gpu['index']} {gpu['name']}: read {gpu['median_us']} µs median, "
                  f"{gpu['p99_us']} µs p99")  # fmt: skip
        for key in ("manager_refresh_nvidia", "manager_refresh_host_only"):
            r = result[key]
            print(f"{key}: {r['median_us']} µs median, {r['p99_us']} µs p99")
    return 0


if __name__ == "__main__":
    sys.exit(main())
