"""Memory-policy benchmark: hit ratio of VRAMancer's default policy beside baselines.

``python -m bench.memory.policy`` runs the synthetic suite (``bench/memory/traces.py``) and
prints a table per trace; ``--trace FILE --capacity N [--json]`` replays a trace file (one
request per line, ``key`` or ``key size``) and prints ``{"vramancer": {"hit_ratio": …}, …}``.

Model: a fast tier of capacity C (blocks, or bytes when the trace has sizes) over a slow tier
that holds everything. The first request of a key writes the block (``put``: a compulsory miss
for every policy); later requests read it (``get``): a hit when it is in the fast tier.

* ``vramancer`` drives the REAL policy objects of ``vramancer.memory.policy`` (the store's
  :func:`default_policy`: hotness model, placement, per-tier eviction index, promotion decision,
  prefetcher) through :class:`TwoTierSim`, a thin executor with an injected
  :class:`~vramancer.clock.ManualClock` that advances by ``--tick`` seconds per request (10 ms
  by default: 100 requests/s against the default 60 s half-life). A block read from the slow
  tier is promoted when the policy says so; prefetched ids that exist in the slow tier are
  promoted before the next request (the prefetch is assumed to finish within one tick).
* ``vramancer-noprefetch``: the same without the prefetcher (placement and eviction alone).
* Own baselines (pure Python, this file): ``lru``, ``lfu`` (in-cache frequency, LRU tie-break),
  ``arc`` (Megiddo & Modha, unit sizes only), ``belady`` (MIN with bypass: the offline optimum
  for unit sizes; for sized traces it evicts the farthest next use, not optimal), ``gdsf``.
* libCacheSim baselines when the ``libcachesim`` package is installed (extra ``bench``):
  ``lcs-arc``, ``lirs``, ``s3fifo``, ``wtinylfu``, ``lcs-gdsf``, ``belady-size``, ``lcs-lru``.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.memory.traces import Trace, read_trace, sized_capacity, suite
from vramancer.clock import ManualClock
from vramancer.memory.policy import (
    DEFAULT_RELOAD_UNIT_BYTES,
    BlockMeta,
    NoPrefetch,
    PolicyBundle,
    TierView,
    default_policy,
    policy_config_from,
)
from vramancer.memory.settings import MemorySettings

FAST = "fast"
SLOW = "slow"
#: Relative latencies of the two simulated tiers (an L4-like fast tier over an L5-like SSD).
FAST_LATENCY = 5.0
SLOW_LATENCY = 16.0
DEFAULT_TICK_S = 0.01
NEVER = 1 << 62


@dataclass
class Result:
    """Outcome of one policy on one trace."""

    hits: int = 0
    requests: int = 0
    hit_bytes: int = 0
    bytes: int = 0
    #: Reload cost saved by hits / reload cost of all requests, with the policy's cost model
    #: ``1 + size / reload_unit`` (the latency factor is the same for every block here).
    hit_cost: float = 0.0
    cost: float = 0.0
    seconds: float = 0.0

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def byte_hit_ratio(self) -> float:
        return self.hit_bytes / self.bytes if self.bytes else 0.0

    @property
    def cost_hit_ratio(self) -> float:
        return self.hit_cost / self.cost if self.cost else 0.0

    def as_dict(self, impl: str) -> dict[str, Any]:
        return {
            "hit_ratio": round(self.hit_ratio, 5),
            "byte_hit_ratio": round(self.byte_hit_ratio, 5),
            "cost_hit_ratio": round(self.cost_hit_ratio, 5),
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "impl": impl,
        }


def _count(result: Result, hit: bool, size: int) -> None:
    result.requests += 1
    result.bytes += size
    cost = 1.0 + size / DEFAULT_RELOAD_UNIT_BYTES
    result.cost += cost
    if hit:
        result.hits += 1
        result.hit_bytes += size
        result.hit_cost += cost


# --------------------------------------------------------------------------------------------
# VRAMancer: the real policy objects behind a thin two-tier executor
# --------------------------------------------------------------------------------------------


class TwoTierSim:
    """A fast tier over a slow tier, moved by a :class:`PolicyBundle` exactly as the store does.

    The fast tier's watermarks are set to 1.0 so that, like every baseline, the policy uses the
    whole capacity C (the store runs its eviction cycle down to ``pressure_low`` instead).
    """

    def __init__(
        self,
        capacity: int,
        *,
        tick_s: float = DEFAULT_TICK_S,
        prefetch: bool = True,
        bundle: PolicyBundle | None = None,
    ) -> None:
        if bundle is None:
            config = policy_config_from(MemorySettings(), pressure_high=1.0, pressure_low=1.0)
            bundle = default_policy(config)
        if not prefetch:
            bundle.prefetcher = NoPrefetch()  # type: ignore[assignment]
        self.bundle = bundle
        self.capacity = capacity
        self.used = 0
        self.clock = ManualClock(start=0.0)
        self.tick_s = tick_s
        self.index = bundle.new_index(reload_latency=SLOW_LATENCY, tier=SLOW)
        self.blocks: dict[str, BlockMeta] = {}
        self.promotions = 0
        self.prefetches = 0

    def _views(self) -> tuple[TierView, TierView]:
        fast = TierView(FAST, FAST_LATENCY, self.capacity, self.used)
        slow = TierView(SLOW, SLOW_LATENCY, 1 << 62, 0)
        return fast, slow

    def request(self, key: str, size: int) -> bool:
        """Serve one request; True when it was a fast-tier hit."""
        self.clock.advance(self.tick_s)
        now = self.clock.monotonic()
        bundle = self.bundle
        meta = self.blocks.get(key)
        if meta is None:
            meta = BlockMeta(id=key, size=size, tier=SLOW, created=now, last_access=now)
            self.blocks[key] = meta
            bundle.on_put(meta)
            order = bundle.placement.place(meta, self._views(), now)
            if order and order[0] == FAST:
                self._move_up(meta, now)
            return False
        hit = meta.tier == FAST
        ahead = bundle.on_read(meta, now)
        if hit:
            self.index.touch(meta, now)
        else:
            fast, slow = self._views()
            if bundle.should_promote(meta, slow, fast, now):
                self._move_up(meta, now)
        for pid in ahead:
            other = self.blocks.get(pid)
            if other is not None and other.tier == SLOW:
                self.prefetches += 1
                self._move_up(other, now, prefetched=True)
        return hit

    def _move_up(self, meta: BlockMeta, now: float, *, prefetched: bool = False) -> None:
        if meta.size > self.capacity:
            return
        fast, _ = self._views()
        need = self.bundle.promotion.bytes_to_free(fast, meta.size)
        if need > 0:
            for victim in self.index.victims(need, now):
                self.index.remove(victim)
                victim.tier = SLOW
                self.used -= victim.size
        if self.used + meta.size > self.capacity:
            return
        meta.tier = FAST
        self.used += meta.size
        self.index.add(meta, now, prefetched=prefetched)
        self.promotions += 1


def run_vramancer(
    trace: Trace, capacity: int, *, tick_s: float = DEFAULT_TICK_S, prefetch: bool = True
) -> Result:
    sim = TwoTierSim(capacity, tick_s=tick_s, prefetch=prefetch)
    result = Result()
    request = sim.request
    for key, size in trace:
        _count(result, request(key, size), size)
        if sim.used > capacity:
            raise AssertionError("the fast tier went over its capacity")
    return result


# --------------------------------------------------------------------------------------------
# Own baselines
# --------------------------------------------------------------------------------------------


def run_lru(trace: Trace, capacity: int) -> Result:
    cache: OrderedDict[str, int] = OrderedDict()
    used = 0
    result = Result()
    for key, size in trace:
        if key in cache:
            cache.move_to_end(key)
            _count(result, True, size)
            continue
        _count(result, False, size)
        if size > capacity:
            continue
        while used + size > capacity:
            _, old = cache.popitem(last=False)
            used -= old
        cache[key] = size
        used += size
    return result


def run_lfu(trace: Trace, capacity: int) -> Result:
    """In-cache LFU: evict the least frequently used, least recently used among equals."""
    freq: dict[str, tuple[int, int, int]] = {}  # key -> (count, last time, size)
    heap: list[tuple[int, int, str]] = []
    used = 0
    result = Result()
    for t, (key, size) in enumerate(trace):
        entry = freq.get(key)
        if entry is not None:
            count = entry[0] + 1
            freq[key] = (count, t, entry[2])
            heapq.heappush(heap, (count, t, key))
            _count(result, True, size)
            continue
        _count(result, False, size)
        if size > capacity:
            continue
        while used + size > capacity:
            count, last, victim = heapq.heappop(heap)
            current = freq.get(victim)
            if current is not None and current[0] == count and current[1] == last:
                del freq[victim]
                used -= current[2]
        freq[key] = (1, t, size)
        heapq.heappush(heap, (1, t, key))
        used += size
    return result


def run_arc(trace: Trace, capacity: int) -> Result:
    """ARC (Megiddo & Modha 2003) for unit-size blocks."""
    c = capacity
    t1: OrderedDict[str, None] = OrderedDict()
    t2: OrderedDict[str, None] = OrderedDict()
    b1: OrderedDict[str, None] = OrderedDict()
    b2: OrderedDict[str, None] = OrderedDict()
    p = 0.0
    result = Result()

    def replace(in_b2: bool) -> None:
        if t1 and (len(t1) > p or (in_b2 and len(t1) == p)):
            old, _ = t1.popitem(last=False)
            b1[old] = None
        elif t2:
            old, _ = t2.popitem(last=False)
            b2[old] = None
        else:
            old, _ = t1.popitem(last=False)
            b1[old] = None

    for key, size in trace:
        if key in t1:
            del t1[key]
            t2[key] = None
            _count(result, True, size)
            continue
        if key in t2:
            t2.move_to_end(key)
            _count(result, True, size)
            continue
        _count(result, False, size)
        if key in b1:
            p = min(float(c), p + max(len(b2) / len(b1), 1.0))
            replace(False)
            del b1[key]
            t2[key] = None
            continue
        if key in b2:
            p = max(0.0, p - max(len(b1) / len(b2), 1.0))
            replace(True)
            del b2[key]
            t2[key] = None
            continue
        l1 = len(t1) + len(b1)
        if l1 == c:
            if len(t1) < c:
                b1.popitem(last=False)
                replace(False)
            else:
                t1.popitem(last=False)
        elif l1 < c and l1 + len(t2) + len(b2) >= c:
            if l1 + len(t2) + len(b2) == 2 * c:
                b2.popitem(last=False)
            replace(False)
        t1[key] = None
    return result


def next_uses(trace: Trace) -> list[int]:
    """For each request, the index of the next request of the same key (``NEVER`` if none)."""
    nxt = [NEVER] * len(trace)
    last: dict[str, int] = {}
    for i in range(len(trace) - 1, -1, -1):
        key = trace[i][0]
        nxt[i] = last.get(key, NEVER)
        last[key] = i
    return nxt


def run_belady(trace: Trace, capacity: int) -> Result:
    """MIN with bypass: keep the blocks used soonest (optimal for unit sizes)."""
    nxt = next_uses(trace)
    cache: dict[str, tuple[int, int]] = {}  # key -> (next use, size)
    heap: list[tuple[int, str]] = []  # (-next use, key)
    used = 0
    result = Result()
    for i, (key, size) in enumerate(trace):
        hit = key in cache
        _count(result, hit, size)
        if hit:
            used -= cache.pop(key)[1]
        if nxt[i] == NEVER or size > capacity:
            continue
        cache[key] = (nxt[i], size)
        used += size
        heapq.heappush(heap, (-nxt[i], key))
        while used > capacity:
            neg, victim = heapq.heappop(heap)
            current = cache.get(victim)
            if current is not None and current[0] == -neg:
                del cache[victim]
                used -= current[1]
    return result


def run_gdsf(trace: Trace, capacity: int) -> Result:
    """GreedyDual-Size-Frequency with unit miss cost: priority ``L + freq / size``."""
    info: dict[str, tuple[float, int, int]] = {}  # key -> (priority, freq, size)
    heap: list[tuple[float, str]] = []
    clock = 0.0
    used = 0
    result = Result()
    for key, size in trace:
        entry = info.get(key)
        if entry is not None:
            freq = entry[1] + 1
            pri = clock + freq / size
            info[key] = (pri, freq, size)
            heapq.heappush(heap, (pri, key))
            _count(result, True, size)
            continue
        _count(result, False, size)
        if size > capacity:
            continue
        while used + size > capacity:
            pri, victim = heapq.heappop(heap)
            current = info.get(victim)
            if current is not None and current[0] == pri:
                del info[victim]
                used -= current[2]
                clock = pri
        pri = clock + 1.0 / size
        info[key] = (pri, 1, size)
        heapq.heappush(heap, (pri, key))
        used += size
    return result


# --------------------------------------------------------------------------------------------
# libCacheSim baselines
# --------------------------------------------------------------------------------------------

LCS_POLICIES: dict[str, str] = {
    "lcs-lru": "LRU",
    "lcs-arc": "ARC",
    "lirs": "LIRS",
    "s3fifo": "S3FIFO",
    "wtinylfu": "WTinyLFU",
    "lcs-gdsf": "GDSF",
    "belady-size": "BeladySize",
}


def libcachesim_available() -> bool:
    try:
        import libcachesim  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    return True


def run_libcachesim(class_name: str, trace: Trace, capacity: int) -> Result:
    import libcachesim as lcs

    ids: dict[str, int] = {}
    nxt = next_uses(trace)
    cache = getattr(lcs, class_name)(cache_size=capacity)
    result = Result()
    op = lcs.ReqOp.OP_GET
    for i, (key, size) in enumerate(trace):
        obj = ids.setdefault(key, len(ids) + 1)
        nu = nxt[i] if nxt[i] != NEVER else -1
        req = lcs.Request(obj_size=size, op=op, obj_id=obj, clock_time=i, next_access_vtime=nu)
        _count(result, bool(cache.get(req)), size)
    return result


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------

Runner = Callable[[Trace, int], Result]


def policies(sized: bool, tick_s: float) -> dict[str, tuple[str, Runner]]:
    """Policy name -> (implementation label, runner) for a trace of this kind."""
    table: dict[str, tuple[str, Runner]] = {
        "vramancer": (
            "vramancer.memory.policy.default_policy",
            lambda t, c: run_vramancer(t, c, tick_s=tick_s),
        ),
        "vramancer-noprefetch": (
            "vramancer.memory.policy.default_policy without prefetcher",
            lambda t, c: run_vramancer(t, c, tick_s=tick_s, prefetch=False),
        ),
        "lru": ("own", run_lru),
        "lfu": ("own", run_lfu),
        "belady": ("own (MIN with bypass)" if not sized else "own (farthest next use)", run_belady),
        "gdsf": ("own", run_gdsf),
    }
    if not sized:
        table["arc"] = ("own", run_arc)
    if libcachesim_available():
        for name, cls in LCS_POLICIES.items():
            table[name] = (f"libcachesim {cls}", _lcs_runner(cls))
    return table


def _lcs_runner(cls: str) -> Runner:
    return lambda t, c: run_libcachesim(cls, t, c)


def evaluate(
    trace: Trace,
    capacity: int,
    *,
    sized: bool,
    tick_s: float = DEFAULT_TICK_S,
    only: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Every policy's result on ``trace`` at ``capacity``."""
    out: dict[str, dict[str, Any]] = {}
    for name, (impl, runner) in policies(sized, tick_s).items():
        if only and name not in only:
            continue
        start = time.perf_counter()
        result = runner(trace, capacity)
        result.seconds = time.perf_counter() - start
        out[name] = result.as_dict(impl)
    return out


BEST_OF_OTHERS = ("lcs-arc", "arc", "lirs", "s3fifo", "wtinylfu")


def verdict(results: dict[str, dict[str, Any]], *, scan: bool = False) -> dict[str, Any]:
    """Floor (≥ best of LRU and LFU − 1 point) and aim (≥ best of the others) for one trace."""
    vr = results["vramancer"]["hit_ratio"]
    floor = max(results["lru"]["hit_ratio"], results["lfu"]["hit_ratio"]) - 0.01
    others = [results[n]["hit_ratio"] for n in BEST_OF_OTHERS if n in results]
    best = max(others) if others else None
    opt_name = "belady-size" if "belady-size" in results else "belady"
    out: dict[str, Any] = {
        "floor_ok": vr >= floor and (not scan or vr > results["lru"]["hit_ratio"]),
        "gap_to_best_other": round(vr - best, 5) if best is not None else None,
        "gap_to_belady": round(results["belady"]["hit_ratio"] - vr, 5),
    }
    if opt_name != "belady":
        out["gap_to_belady_size"] = round(results[opt_name]["hit_ratio"] - vr, 5)
    return out


def _table(name: str, spec_desc: str, capacity: int, results: dict[str, dict[str, Any]]) -> str:
    lines = [
        f"### {name}: {spec_desc} (capacity {capacity})",
        "",
        "| policy | hit ratio | byte hit ratio | cost hit ratio | implementation |",
        "|---|---|---|---|---|",
    ]
    for policy, r in sorted(results.items(), key=lambda kv: -kv[1]["hit_ratio"]):
        lines.append(
            f"| {policy} | {r['hit_ratio']:.4f} | {r['byte_hit_ratio']:.4f} "
            f"| {r['cost_hit_ratio']:.4f} | {r['impl']} |"
        )
    return "\n".join(lines)


def run_suite(
    tick_s: float, only: Sequence[str] | None, traces: Sequence[str] | None
) -> dict[str, Any]:
    report: dict[str, Any] = {}
    for spec in suite():
        if traces and spec.name not in traces:
            continue
        trace = spec.build()
        capacity = sized_capacity(trace) if spec.sized else spec.capacity
        results = evaluate(trace, capacity, sized=spec.sized, tick_s=tick_s, only=only)
        entry: dict[str, Any] = {
            "capacity": capacity,
            "description": spec.description,
            "results": results,
        }
        if "lru" in results and "lfu" in results and "vramancer" in results and "belady" in results:
            entry["verdict"] = verdict(results, scan=spec.name == "zipf-scans")
        report[spec.name] = entry
        print(f"# {spec.name} done", file=sys.stderr, flush=True)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory.policy", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--trace", type=Path, help="trace file: one 'key' or 'key size' per line")
    parser.add_argument(
        "--capacity", type=int, help="fast-tier capacity (blocks, or bytes with sizes)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("--tick", type=float, default=DEFAULT_TICK_S, help="seconds per request")
    parser.add_argument("--only", nargs="*", help="run only these policies")
    parser.add_argument("--traces", nargs="*", help="synthetic suite: only these traces")
    args = parser.parse_args(argv)
    if args.trace is not None:
        if args.capacity is None or args.capacity <= 0:
            parser.error("--capacity N (a positive integer) is required with --trace")
        try:
            trace = read_trace(args.trace)
        except (OSError, ValueError) as exc:
            parser.error(str(exc))
        sized = any(size != 1 for _, size in trace)
        results = evaluate(trace, args.capacity, sized=sized, tick_s=args.tick, only=args.only)
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            print(_table(str(args.trace), f"{len(trace)} requests", args.capacity, results))
        return 0
    report = run_suite(args.tick, args.only, args.traces)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, entry in report.items():
            print(_table(name, entry["description"], entry["capacity"], entry["results"]))
            if "verdict" in entry:
                print(f"\nverdict: {entry['verdict']}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
