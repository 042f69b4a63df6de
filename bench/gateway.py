"""Model gateway benchmark: the gateway's scheduler against a naive FIFO swapper.

``python -m bench.gateway [--requests 1000] [--rate 100] [--seed 7] [--policies gateway,fifo]
[--json]``

Workload: ``--requests`` requests over 4 models drawn from a seeded Zipf mix (weights 1/k^s,
``--zipf``), arriving as a Poisson process of ``--rate`` requests per second. Backend: the
fake Ollama server (``tests/fakes/ollama.py``) with ``--load-delay-s`` per load and a
streamed answer of 8 tokens, ``--chunk-delay-s`` apart. GPU: one simulated 12 GiB GPU; the
models take 8, 6, 4 and 4 GiB, so at most two are resident. The real runtime (model manager,
arbiter, devices) runs both policies:

* ``gateway``: ``vramancer.gateway.Gateway`` (serve the resident model's group before a
  swap, bounded by ``--max-wait-s``; evictions by reload cost and priority; at most 4 in
  flight per model);
* ``fifo``: requests served strictly in arrival order; when the head request's model is not
  resident, wait for the requests in flight to finish and load it (the model manager evicts
  what it must); at most 4 in flight.

Printed per policy: swaps (loads the fake Ollama saw), latency p50/p95 (arrival to the last
byte) and time to first byte p50/p95, in seconds, and the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from tests.fakes.ollama import FakeOllama

from vramancer.config import Settings
from vramancer.gateway.service import Gateway
from vramancer.gateway.settings import GatewaySettings
from vramancer.models.entry import ModelHandle
from vramancer.models.manager import ModelManager
from vramancer.runtime import Runtime
from vramancer.units import GIB

MODELS = {"m1:8b": 8 * GIB, "m2:6b": 6 * GIB, "m3:4b": 4 * GIB, "m4:4b": 4 * GIB}
MAX_CONCURRENT = 4
TOKENS = 8

Lease = Callable[[str], contextlib.AbstractAsyncContextManager[ModelHandle]]


def trace(requests: int, rate: float, zipf: float, seed: int) -> list[tuple[float, str]]:
    """``(arrival second, model)`` of every request."""
    rng = random.Random(seed)
    names = list(MODELS)
    weights = [1 / (k**zipf) for k in range(1, len(names) + 1)]
    at = 0.0
    out = []
    for _ in range(requests):
        at += rng.expovariate(rate)
        out.append((at, rng.choices(names, weights)[0]))
    return out


class FifoSwapper:
    """The naive baseline (see the module docstring)."""

    def __init__(self, models: ModelManager) -> None:
        self.models = models
        self.queue: deque[tuple[str, asyncio.Future[None]]] = deque()
        self.in_flight = 0
        self.current: str | None = None
        self.wake = asyncio.Event()
        self.runner: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                model, future = self.queue[0]
                if model == self.current and self.in_flight < MAX_CONCURRENT:
                    self.queue.popleft()
                    self.in_flight += 1
                    future.set_result(None)
                elif model != self.current and self.in_flight == 0:
                    await self.models.ensure_loaded(model, "gpu:0")
                    self.current = model
                else:
                    break

    @contextlib.asynccontextmanager
    async def lease(self, model: str) -> AsyncIterator[ModelHandle]:
        if self.runner is None:
            self.runner = asyncio.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        self.queue.append((model, future))
        self.wake.set()
        await future
        try:
            async with self.models.use(model) as handle:
                yield handle
        finally:
            self.in_flight -= 1
            self.wake.set()


async def one(
    lease: Lease, client: httpx.AsyncClient, model: str, arrived: float
) -> tuple[float, float]:
    """Latency and time to first byte of one request (seconds)."""
    first: float | None = None
    async with lease(model) as handle:
        body = {
            "model": handle.backend_model,
            "prompt": "benchmark",
            "options": {"num_predict": TOKENS},
            "keep_alive": handle.keep_alive,
        }
        async with client.stream("POST", f"{handle.endpoint}/api/generate", json=body) as reply:
            async for _line in reply.aiter_lines():
                if first is None:
                    first = time.monotonic()
    done = time.monotonic()
    return done - arrived, (first or done) - arrived


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(policy: str, args: argparse.Namespace) -> dict[str, Any]:
    with FakeOllama(dict(MODELS)) as fake, tempfile.TemporaryDirectory() as tmp:
        fake.load_delay_s = args.load_delay_s
        fake.chunk_delay_s = args.chunk_delay_s
        settings = Settings(
            data_dir=tmp,
            disable_rate_limit=True,
            ollama={"endpoint": fake.url},
            devices={"backends": [], "simulated": [{"name": "sim0", "memory": "12GiB"}]},
            models=[
                {"name": n, "backend": "ollama", "vram": size, "allowed_devices": ["gpu"]}
                for n, size in MODELS.items()
            ],
            gpu_manager={"retry_backoff_s": 0, "queue_max_wait_s": 600, "idle_timeout_s": 3600},
        )
        async with Runtime(settings) as rt, httpx.AsyncClient(timeout=600) as client:
            gateway: Gateway | None = None
            if policy == "gateway":
                gw_settings = GatewaySettings(
                    max_wait_s=args.max_wait_s,
                    max_concurrent=MAX_CONCURRENT,
                    queue_length=100_000,
                    timeout_s=3600,
                )
                gateway = Gateway(gw_settings, rt.models, metrics=rt.metrics, clock=rt.clock)
                await gateway.start()
                lease: Lease = gateway.lease
            else:
                fifo = FifoSwapper(rt.models)
                lease = fifo.lease
            started = time.monotonic()
            jobs = []
            for at, model in trace(args.requests, args.rate, args.zipf, args.seed):
                delay = started + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                jobs.append(asyncio.create_task(one(lease, client, model, started + at)))
            answers = await asyncio.gather(*jobs, return_exceptions=True)
            wall = time.monotonic() - started
            if gateway is not None:
                await gateway.stop()
            elif fifo.runner is not None:
                fifo.runner.cancel()
        swaps = sum(fake.loads_of(name) for name in MODELS)
    results = [a for a in answers if isinstance(a, tuple)]
    latency = [r[0] for r in results]
    ttfb = [r[1] for r in results]
    return {
        "errors": len(answers) - len(results),
        "swaps": swaps,
        "latency_p50_s": round(percentile(latency, 0.5), 4),
        "latency_p95_s": round(percentile(latency, 0.95), 4),
        "ttfb_p50_s": round(percentile(ttfb, 0.5), 4),
        "ttfb_p95_s": round(percentile(ttfb, 0.95), 4),
        "wall_s": round(wall, 2),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=100.0, help="arrivals per second")
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--load-delay-s", type=float, default=0.1)
    parser.add_argument("--chunk-delay-s", type=float, default=0.002)
    parser.add_argument("--max-wait-s", type=float, default=2.0)
    parser.add_argument("--policies", default="gateway,fifo", help="comma-separated")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = {policy: asyncio.run(run(policy, args)) for policy in args.policies.split(",")}
    if args.json:
        print(json.dumps(results))
        return
    print(
        f"{args.requests} requests, 4 models, Zipf s={args.zipf}, {args.rate:g}/s, seed {args.seed}"
    )
    keys = ("errors", "swaps", "latency_p50_s", "latency_p95_s", "ttfb_p50_s", "ttfb_p95_s")
    print(f"{'policy':10} " + " ".join(f"{k:>14}" for k in (*keys, "wall_s")))
    for policy, r in results.items():
        print(f"{policy:10} " + " ".join(f"{r[k]:>14}" for k in (*keys, "wall_s")))


if __name__ == "__main__":
    main()
