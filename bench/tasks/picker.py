"""Device choice among 16 GPUs: microseconds per decision (target: at most 50 µs).

``python -m bench.tasks.picker [--devices 16] [--decisions 20000] [--runs 5] [--json]``

Each decision is ``pick(views, need, pin, policy)`` over 16 device views with random telemetry
(some too hot, too busy, stale or full), a random VRAM need and now and then a pin, for both
strategies; ``pick + assume`` (one dispatch-round step) and ``build_views`` from a snapshot are
timed too. The baseline beside it is a MAESTRO-style choice (filter by heartbeat, temperature
and busy, then ``min`` by score, no VRAM accounting), run on the same inputs. Medians of runs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

from vramancer.devices.ids import DeviceId
from vramancer.devices.types import DeviceVendor, GpuSnapshot, HostSnapshot, SystemSnapshot
from vramancer.tasks.picker import (
    DeviceView,
    LocalLoad,
    PickerPolicy,
    Placement,
    assume,
    build_views,
    pick,
)
from vramancer.tasks.settings import PickerStrategy

GIB = 1024**3
TARGET_US = 50.0


def random_views(rng: random.Random, n: int) -> list[DeviceView]:
    views = []
    for i in range(n):
        total = rng.choice([8, 12, 16, 24, 48, 80]) * GIB
        views.append(
            DeviceView(
                device=str(DeviceId.gpu(i)),
                index=i,
                total_bytes=total,
                free_bytes=int(total * rng.uniform(0.0, 1.0)),
                grantable_bytes=int(total * rng.uniform(0.0, 0.9)),
                unseen_bytes=rng.choice([0, 0, GIB]),
                utilization_ratio=rng.choice([None, rng.uniform(0, 1)]),
                temperature_celsius=rng.choice([None, rng.uniform(30, 85)]),
                age_s=rng.choice([0.5, 1.0, 6.0, 20.0]),
                running=rng.randint(0, 2),
                slots=2,
            )
        )
    return views


def seed_maestro(views: list[DeviceView]) -> str | None:
    """A MAESTRO-style ``pick_gpu``: heartbeat/temperature/busy filter, then lowest score."""
    best, best_score = None, 0.0
    for v in views:
        if v.age_s > 15 or (v.temperature_celsius or 0) > 78 or (v.utilization_ratio or 0) > 0.95:
            continue
        busy = 100 * v.utilization_ratio if v.utilization_ratio is not None else 50.0
        temp = v.temperature_celsius if v.temperature_celsius is not None else 60.0
        score = busy + 0.5 * temp + (30.0 if v.age_s > 15 else 0.0)
        if best is None or score < best_score:
            best, best_score = v.device, score
    return best


def _snapshot(rng: random.Random, n: int) -> SystemSnapshot:
    host = HostSnapshot(
        cpu_count=16,
        cpu_utilization_ratio=0.1,
        memory_total_bytes=64 * GIB,
        memory_available_bytes=32 * GIB,
        memory_used_bytes=32 * GIB,
        swap_total_bytes=0,
        swap_used_bytes=0,
    )
    gpus = tuple(
        GpuSnapshot(
            index=i,
            uuid=f"GPU-{i}",
            name="bench",
            vendor=DeviceVendor.NVIDIA,
            memory_total_bytes=24 * GIB,
            memory_used_bytes=int(rng.uniform(0, 24) * GIB),
            memory_free_bytes=int(rng.uniform(0, 24) * GIB),
            utilization_ratio=rng.uniform(0, 1),
            temperature_celsius=rng.uniform(30, 85),
            taken_at=100.0,
            cuda_index=i,
        )
        for i in range(n)
    )
    return SystemSnapshot(host=host, gpus=gpus, taken_at=100.0)


def _time_per_call(fn: Any, inputs: list[Any]) -> float:
    t0 = time.perf_counter()
    for item in inputs:
        fn(item)
    return (time.perf_counter() - t0) / len(inputs) * 1e6


def measure(devices: int, decisions: int, runs: int, seed: int = 5) -> dict[str, Any]:
    rng = random.Random(seed)
    cases = [
        (
            random_views(rng, devices),
            rng.choice([0, GIB, 4 * GIB, 10 * GIB]),
            rng.choice([None] * 9 + [rng.randrange(devices)]),
        )
        for _ in range(decisions)
    ]
    spread = PickerPolicy()
    binpack = PickerPolicy(strategy=PickerStrategy.BINPACK)
    snapshot = _snapshot(rng, devices)
    local = {str(DeviceId.gpu(i)): LocalLoad(1, GIB) for i in range(0, devices, 3)}
    grantable = {str(DeviceId.gpu(i)): 20 * GIB for i in range(devices)}

    def pick_spread(case: Any) -> Any:
        return pick(case[0], case[1], case[2], spread)

    def pick_binpack(case: Any) -> Any:
        return pick(case[0], case[1], case[2], binpack)

    def pick_and_assume(case: Any) -> Any:
        decision = pick(case[0], case[1], case[2], spread)
        if isinstance(decision, Placement):
            assume(case[0], decision, case[1])
        return decision

    def views(_: Any) -> Any:
        return build_views(
            snapshot, 101.0, grantable=grantable, local=local, slots_per_device=2, host_slots=2
        )

    def maestro(case: Any) -> Any:
        return seed_maestro(case[0])

    timed = {
        "pick_spread_us": pick_spread,
        "pick_binpack_us": pick_binpack,
        "pick_and_assume_us": pick_and_assume,
        "build_views_us": views,
        "seed_maestro_us": maestro,
    }
    samples: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(runs):
        for name, fn in timed.items():
            inputs = cases if name != "build_views_us" else cases[: max(1, decisions // 10)]
            samples[name].append(_time_per_call(fn, inputs))
    result: dict[str, Any] = {"devices": devices, "decisions": decisions, "runs": runs}
    result.update({name: round(statistics.median(v), 2) for name, v in samples.items()})
    worst = max(result["pick_spread_us"], result["pick_binpack_us"])
    result["ratio_to_seed_maestro"] = round(worst / result["seed_maestro_us"], 2)
    result["target_us"] = TARGET_US
    result["meets_target"] = worst <= TARGET_US
    placed = sum(isinstance(pick_spread(c), Placement) for c in cases)
    result["placed_fraction"] = round(placed / len(cases), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=16)
    parser.add_argument("--decisions", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.devices, args.decisions, args.runs)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{args.devices} devices: pick {result['pick_spread_us']} µs (spread), "
        f"{result['pick_binpack_us']} µs (binpack), pick+assume {result['pick_and_assume_us']} µs,"
        f" build_views {result['build_views_us']} µs; seed MAESTRO filter+min "
        f"{result['seed_maestro_us']} µs -> target <= {TARGET_US} µs "
        f"{'OK' if result['meets_target'] else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
