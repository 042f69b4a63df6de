"""CPU and RSS of an idle ``vramancer serve`` polling devices every second.

``python -m bench.api.idle_cpu [--seconds 30] [--windows 3] [--json]``

The daemon (two simulated GPUs, 1 s polling, every subsystem started) and the bare FastAPI
baseline app run side by side; after a warm-up, the CPU time each process uses is read with
psutil over ``--windows`` windows spanning ``--seconds`` in all. CPU is in percent of one core;
figures are medians of the windows. Target: VRAMancer below 2 % of one core.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import psutil

from bench.api.servers import bare_server, vramancer_server

TARGET_CPU_PERCENT = 2.0
WARMUP_S = 5.0


def _cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def run(seconds: float, windows: int) -> dict[str, Any]:
    window = seconds / windows
    samples: dict[str, list[float]] = {"vramancer": [], "bare_fastapi": []}
    with bare_server() as b, vramancer_server(poll_interval_s=1.0) as v:
        procs = {"vramancer": psutil.Process(v.pid), "bare_fastapi": psutil.Process(b.pid)}
        time.sleep(WARMUP_S)
        for _ in range(windows):
            before = {name: _cpu_s(p) for name, p in procs.items()}
            start = time.monotonic()
            time.sleep(window)
            elapsed = time.monotonic() - start
            for name, p in procs.items():
                samples[name].append((_cpu_s(p) - before[name]) / elapsed * 100.0)
        rss = {name: p.memory_info().rss for name, p in procs.items()}
    result: dict[str, Any] = {"seconds": seconds, "windows": windows, "poll_interval_s": 1.0}
    for name, values in samples.items():
        result[name] = {
            "cpu_percent_of_one_core": round(statistics.median(values), 3),
            "windows": [round(x, 3) for x in values],
            "rss_bytes": rss[name],
            "rss_mib": round(rss[name] / 1024**2, 1),
        }
    ours = result["vramancer"]["cpu_percent_of_one_core"]
    result["target_cpu_percent"] = TARGET_CPU_PERCENT
    result["meets_target"] = ours < TARGET_CPU_PERCENT
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.seconds, args.windows)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in ("bare_fastapi", "vramancer"):
            r = result[name]
            print(f"{name:14s} CPU {r['cpu_percent_of_one_core']:6.3f} % of one core "
                  f"(windows {r['windows']})  RSS {r['rss_mib']} MiB")  # fmt: skip
        print(f"target < {TARGET_CPU_PERCENT} %: {'met' if result['meets_target'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
