"""What the model gateway adds to a request for a resident model.

``python -m bench.gateway_overhead [--requests 300] [--runs 5] [--json]``

The same non-streamed ``POST /api/generate`` (Ollama's shape, a short prompt, the fake Ollama
server of ``tests/fakes/ollama.py`` answering at once and keeping its connections, as Ollama
does) sent one at a time, over one kept-alive HTTP connection each, two ways, alternating in
runs:

* **direct**: to the backend (the fake Ollama server);
* **gateway**: to ``/ollama/api/generate`` of a real ``vramancer serve`` (a separate process,
  rate limiting off) whose managed model lives on that backend and is resident (loaded before
  timing), so the request is queued, admitted, held, relayed and counted, as a user's is.

Figures: per run the median latency of each way; the overhead is the median over runs of
(gateway − direct). Target: at most 1 ms at p50.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from tests.fakes.ollama import FakeOllama
from tests.helpers import running_server

from vramancer.units import GIB

MODEL = "bench:1b"
TARGET_OVERHEAD_MS = 1.0
BODY = {"model": MODEL, "prompt": "hello", "stream": False}


def _config(ollama_url: str) -> str:
    return f"""
[ollama]
endpoint = "{ollama_url}"

[[devices.simulated]]
name = "sim0"
memory = "12GiB"

[[models]]
name = "{MODEL}"
backend = "ollama"
vram = "1GiB"
allowed_devices = ["gpu"]
"""


def _latencies_ms(client: httpx.Client, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        answer = client.post(path, json=BODY)
        out.append((time.perf_counter() - t0) * 1000)
        answer.raise_for_status()
    return out


def measure(requests: int, runs: int) -> dict[str, Any]:
    direct_p50: list[float] = []
    gateway_p50: list[float] = []
    with (
        FakeOllama({MODEL: 1 * GIB}, keep_alive=True) as fake,
        tempfile.TemporaryDirectory() as tmp,
    ):
        env = {"VRM_DISABLE_RATE_LIMIT": "1"}
        with (
            running_server(Path(tmp), _config(fake.url), env=env) as server,
            httpx.Client(base_url=fake.url, timeout=30) as direct,
            httpx.Client(base_url=server.url, timeout=60) as gateway,
        ):
            gateway.post("/ollama/api/generate", json=BODY).raise_for_status()  # load it
            _latencies_ms(direct, "/api/generate", 20)  # warm both paths
            _latencies_ms(gateway, "/ollama/api/generate", 20)
            for _ in range(runs):
                direct_p50.append(
                    statistics.median(_latencies_ms(direct, "/api/generate", requests))
                )
                gateway_p50.append(
                    statistics.median(_latencies_ms(gateway, "/ollama/api/generate", requests))
                )
    overheads = [g - d for g, d in zip(gateway_p50, direct_p50, strict=True)]
    overhead = statistics.median(overheads)
    return {
        "requests_per_run": requests,
        "runs": runs,
        "direct_p50_ms": round(statistics.median(direct_p50), 3),
        "gateway_p50_ms": round(statistics.median(gateway_p50), 3),
        "overhead_p50_ms": round(overhead, 3),
        "overhead_runs_ms": [round(x, 3) for x in overheads],
        "target_ms": TARGET_OVERHEAD_MS,
        "meets_target": overhead <= TARGET_OVERHEAD_MS,
        "machine": f"{platform.machine()} ({os.cpu_count()} CPUs)",
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per way and run")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = measure(args.requests, args.runs)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"generate on a resident model, p50: direct {result['direct_p50_ms']} ms, through the "
        f"gateway {result['gateway_p50_ms']} ms -> overhead {result['overhead_p50_ms']} ms "
        f"(target <= {TARGET_OVERHEAD_MS} ms) {'OK' if result['meets_target'] else 'MISSED'}; "
        f"per run {result['overhead_runs_ms']}"
    )


if __name__ == "__main__":
    main()
