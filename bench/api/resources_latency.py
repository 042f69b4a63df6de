"""``GET /v1/system/resources`` throughput and latency beside a bare FastAPI endpoint.

``python -m bench.api.resources_latency [--runs 3] [--duration 5] [--connections 16]
[--client auto|wrk|python] [--json]``

Both servers are real uvicorn processes started the same way (``vramancer serve`` with two
simulated GPUs, 1 s polling, no tokens, rate limit off; the baseline a FastAPI app with one
route returning ``{"status": "ok"}``). Runs alternate between the two; figures are medians.
Target: VRAMancer ≥ 50 % of the bare endpoint's requests/s (the route reads the cached
snapshot, so the gap is auth, middleware and a bigger body).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from bench.api.loadgen import LoadResult, have_wrk, run_python, run_wrk
from bench.api.servers import bare_server, vramancer_server

TARGET_RATIO = 0.5


def _measure(url: str, client: str, duration: float, connections: int) -> LoadResult:
    if client == "wrk":
        return run_wrk(url, duration, connections)
    return run_python(url, duration, connections)


def _summary(results: list[LoadResult]) -> dict[str, Any]:
    return {
        "requests_per_s": round(statistics.median(r.requests_per_s for r in results), 1),
        "p50_ms": round(statistics.median(r.p50_ms for r in results), 3),
        "p99_ms": round(statistics.median(r.p99_ms for r in results), 3),
        "errors": sum(r.errors for r in results),
        "runs": [round(r.requests_per_s, 1) for r in results],
    }


def run(runs: int, duration: float, connections: int, client: str) -> dict[str, Any]:
    if client == "auto":
        client = "wrk" if have_wrk() else "python"
    bare: list[LoadResult] = []
    ours: list[LoadResult] = []
    with bare_server() as b, vramancer_server(poll_interval_s=1.0) as v:
        bare_url, our_url = b.url + "/bare", v.url + "/v1/system/resources"
        _measure(bare_url, client, 1, connections)  # warm-up
        _measure(our_url, client, 1, connections)
        for _ in range(runs):
            bare.append(_measure(bare_url, client, duration, connections))
            ours.append(_measure(our_url, client, duration, connections))
    bare_summary, our_summary = _summary(bare), _summary(ours)
    ratio = our_summary["requests_per_s"] / max(bare_summary["requests_per_s"], 1e-9)
    result: dict[str, Any] = {
        "client": client,
        "connections": connections,
        "duration_s": duration,
        "bare_fastapi": bare_summary,
        "vramancer_system_resources": our_summary,
    }
    result["throughput_ratio"] = round(ratio, 3)
    result["target_ratio"] = TARGET_RATIO
    result["meets_target"] = ratio >= TARGET_RATIO
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.runs, args.duration, args.connections, args.client)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name in ("bare_fastapi", "vramancer_system_resources"):
            r = result[name]
            print(f"{name:28s} {r['requests_per_s']:9.1f} req/s  p50 {r['p50_ms']:.2f} ms  "
                  f"p99 {r['p99_ms']:.2f} ms  errors {r['errors']}")  # fmt: skip
        print(f"ratio {result['throughput_ratio']:.2f} (target ≥ {TARGET_RATIO}) "
              f"client={result['client']}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
