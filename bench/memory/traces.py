"""Request traces for the memory-policy benchmark: synthetic suite and file reader.

A trace is a list of ``(key, size)`` pairs, one per request. Every synthetic trace is
deterministic (seeded numpy generator) and comes with the fast-tier capacity it is meant for
(in blocks for unit-size traces, in bytes for the size-aware one).

Key names matter to the prefetcher, so they are chosen to be honest: popular keys of the zipf
traces are random numbers (a permutation of ranks), so numerically adjacent ids are not related;
scan and loop keys are opaque hashes (no trailing integer), so only a *learned* order can be
predicted; only the sequential trace uses ``conv<j>/page/<i>`` ids, which is what it is about.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Trace = list[tuple[str, int]]

#: Requests per synthetic trace and the fast tier's capacity in blocks (unit-size traces).
DEFAULT_REQUESTS = 200_000
DEFAULT_CAPACITY = 1_000
#: Distinct keys of the zipf-like traces.
UNIVERSE = 20_000
KIB = 1024
MIB = 1024 * KIB


@dataclass(frozen=True)
class TraceSpec:
    """A named synthetic trace and the capacity it is replayed with."""

    name: str
    description: str
    capacity: int
    #: True when the capacity and the sizes are bytes (mixed block sizes).
    sized: bool
    build: Callable[[], Trace]


def _opaque(kind: str, number: int) -> str:
    """A key without a trailing integer, so the stream detector cannot read an order into it."""
    digest = hashlib.blake2b(f"{kind}{number}".encode(), digest_size=6).hexdigest()
    return f"{kind}-{digest}x"


def _zipf_ranks(rng: np.random.Generator, alpha: float, universe: int, n: int) -> np.ndarray:
    """``n`` ranks in ``[0, universe)`` with P(rank r) ∝ 1 / (r + 1)^alpha (alpha may be < 1)."""
    weights = 1.0 / np.arange(1, universe + 1, dtype=np.float64) ** alpha
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    return np.searchsorted(cdf, rng.random(n), side="right").clip(0, universe - 1)


def _zipf_keys(rng: np.random.Generator, alpha: float, universe: int, n: int) -> list[str]:
    ranks = _zipf_ranks(rng, alpha, universe, n)
    ids = rng.permutation(universe * 10)[:universe]  # popular ranks get unrelated numbers
    return [f"obj/{ids[r]}" for r in ranks]


def zipf(alpha: float, n: int = DEFAULT_REQUESTS, seed: int = 1) -> Trace:
    """Independent requests, popularity ∝ 1/rank^alpha over ``UNIVERSE`` keys."""
    rng = np.random.default_rng(seed)
    return [(k, 1) for k in _zipf_keys(rng, alpha, UNIVERSE, n)]


def zipf_with_scans(
    alpha: float = 1.0,
    n: int = DEFAULT_REQUESTS,
    period: int = 10_000,
    scan_length: int = 3 * DEFAULT_CAPACITY,
    scan_space: int = 30 * DEFAULT_CAPACITY,
    seed: int = 2,
) -> Trace:
    """Zipf requests interrupted every ``period`` requests by a scan of ``scan_length`` keys.

    Each scan reads a contiguous window of a large table (``scan_space`` keys, 30 × capacity),
    the next window each time, so a scanned key comes back only after many periods: scans are
    pure pollution for a cache. Scan keys are opaque (no readable order).
    """
    rng = np.random.default_rng(seed)
    base = _zipf_keys(rng, alpha, UNIVERSE, n)
    out: Trace = []
    scan_start = 0
    i = 0
    while len(out) < n:
        chunk = base[i : i + period]
        i += period
        out.extend((k, 1) for k in chunk)
        for j in range(scan_length):
            out.append((_opaque("scan", (scan_start + j) % scan_space), 1))
        scan_start = (scan_start + scan_length) % scan_space
    return out[:n]


def loop(length: int = int(1.2 * DEFAULT_CAPACITY), n: int = DEFAULT_REQUESTS) -> Trace:
    """The same ``length`` keys over and over in the same order (a loop slightly larger than C)."""
    keys = [_opaque("loop", i) for i in range(length)]
    return [(keys[i % length], 1) for i in range(n)]


def shifting_hot_set(
    n: int = DEFAULT_REQUESTS,
    hot: int = int(0.8 * DEFAULT_CAPACITY),
    hot_share: float = 0.9,
    shift_every: int = 20_000,
    seed: int = 3,
) -> Trace:
    """90 % of requests go uniformly to a hot set of 0.8 × C keys, the rest to any key; the hot
    set is replaced by a fresh random one every ``shift_every`` requests."""
    rng = np.random.default_rng(seed)
    out: Trace = []
    for start in range(0, n, shift_every):
        count = min(shift_every, n - start)
        hot_ids = rng.choice(UNIVERSE, size=hot, replace=False)
        is_hot = rng.random(count) < hot_share
        hot_pick = hot_ids[rng.integers(0, hot, count)]
        cold_pick = rng.integers(0, UNIVERSE, count)
        picks = np.where(is_hot, hot_pick, cold_pick)
        out.extend((f"obj/{p * 7919 % 1_000_003}", 1) for p in picks)
    return out


def hot_set_switch(
    n: int = DEFAULT_REQUESTS,
    hot: int = int(0.7 * DEFAULT_CAPACITY),
    hot_share: float = 0.95,
    alpha: float = 0.8,
    phase: int = 25_000,
    seed: int = 6,
) -> Trace:
    """A hot set that switches abruptly: for ``phase`` requests, ``hot_share`` of the requests
    go to a hot set of 0.7 × C keys (zipf α=0.8 within it, so its head builds a high count), the
    rest to any key; then the hot set is replaced at once by a disjoint one."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(UNIVERSE * 10)
    out: Trace = []
    for number, start in enumerate(range(0, n, phase)):
        count = min(phase, n - start)
        hot_ids = order[number * hot : (number + 1) * hot]
        is_hot = rng.random(count) < hot_share
        hot_pick = hot_ids[_zipf_ranks(rng, alpha, hot, count)]
        cold_pick = order[-UNIVERSE:][rng.integers(0, UNIVERSE, count)]
        picks = np.where(is_hot, hot_pick, cold_pick)
        out.extend((f"obj/{p}", 1) for p in picks)
    return out


def hot_set_drift(
    n: int = DEFAULT_REQUESTS,
    hot: int = int(0.8 * DEFAULT_CAPACITY),
    hot_share: float = 0.9,
    every: int = 8,
    seed: int = 7,
) -> Trace:
    """A hot set that drifts gradually: ``hot_share`` of the requests go uniformly to a window
    of 0.8 × C keys that slides by one key every ``every`` requests (a key is hot for some
    6,400 requests, then never again), the rest to any key. Keys are random numbers, so their
    order cannot be read from their names."""
    rng = np.random.default_rng(seed)
    line = rng.permutation(UNIVERSE * 10)  # the drift's key order; cold keys from its tail
    starts = np.arange(n) // every
    is_hot = rng.random(n) < hot_share
    hot_pick = line[starts + rng.integers(0, hot, n)]
    cold_pick = line[-UNIVERSE:][rng.integers(0, UNIVERSE, n)]
    picks = np.where(is_hot, hot_pick, cold_pick)
    return [(f"obj/{p}", 1) for p in picks]


def sequential(
    n: int = DEFAULT_REQUESTS,
    sequences: int = 200,
    pages: int = 40,
    readers: int = 4,
    alpha: float = 0.8,
    seed: int = 4,
) -> Trace:
    """KV pages of conversations read in order: ``readers`` interleaved readers each pick a
    conversation (zipf popularity over ``sequences``) and read ``conv<j>/page/0..pages-1``."""
    rng = np.random.default_rng(seed)
    popular = rng.permutation(sequences)
    weights = 1.0 / np.arange(1, sequences + 1, dtype=np.float64) ** alpha
    weights /= weights.sum()

    def pick() -> Iterator[str]:
        while True:
            conv = popular[rng.choice(sequences, p=weights)]
            for page in range(pages):
                yield f"conv{conv}/page/{page}"

    streams = [pick() for _ in range(readers)]
    out: Trace = []
    while len(out) < n:
        reader = int(rng.integers(0, readers))
        out.append((next(streams[reader]), 1))
    return out


def sized_zipf(
    alpha: float = 0.9,
    n: int = DEFAULT_REQUESTS,
    min_size: int = 4 * KIB,
    max_size: int = 4 * MIB,
    seed: int = 5,
) -> Trace:
    """Zipf requests whose keys have fixed sizes drawn log-uniformly in [4 KiB, 4 MiB]."""
    rng = np.random.default_rng(seed)
    ranks = _zipf_ranks(rng, alpha, UNIVERSE, n)
    sizes = np.exp(rng.uniform(np.log(min_size), np.log(max_size), UNIVERSE)).astype(np.int64)
    ids = rng.permutation(UNIVERSE * 10)[:UNIVERSE]
    return [(f"obj/{ids[r]}", int(sizes[r])) for r in ranks]


def sized_capacity(trace: Trace, share: float = 0.05) -> int:
    """``share`` of the total bytes of the distinct keys of ``trace``."""
    sizes: dict[str, int] = {}
    for key, size in trace:
        sizes.setdefault(key, size)
    return int(share * sum(sizes.values()))


def suite() -> list[TraceSpec]:
    """The built-in synthetic suite, in report order."""
    sized_trace: Trace | None = None

    def sized() -> Trace:
        nonlocal sized_trace
        if sized_trace is None:
            sized_trace = sized_zipf()
        return sized_trace

    c = DEFAULT_CAPACITY
    return [
        TraceSpec("zipf-0.8", f"zipf α=0.8 over {UNIVERSE} keys", c, False, lambda: zipf(0.8)),
        TraceSpec("zipf-1.0", f"zipf α=1.0 over {UNIVERSE} keys", c, False, lambda: zipf(1.0)),
        TraceSpec(
            "zipf-scans",
            "zipf α=1.0, every 10k requests a 3×C scan of a 30×C table",
            c,
            False,
            zipf_with_scans,
        ),
        TraceSpec("loop", "loop over 1.2×C keys", c, False, loop),
        TraceSpec(
            "shifting",
            "90 % of requests on a 0.8×C hot set that changes every 20k requests",
            c,
            False,
            shifting_hot_set,
        ),
        TraceSpec(
            "switch",
            "95 % of requests on a 0.7×C hot set (zipf α=0.8), replaced at once every 25k",
            c,
            False,
            hot_set_switch,
        ),
        TraceSpec(
            "drift",
            "90 % of requests on a 0.8×C hot window sliding by one key every 8 requests",
            c,
            False,
            hot_set_drift,
        ),
        TraceSpec(
            "sequential",
            "4 interleaved readers of 40-page conversations (zipf α=0.8 over 200)",
            c,
            False,
            sequential,
        ),
        TraceSpec(
            "sized",
            "zipf α=0.9, sizes log-uniform 4 KiB–4 MiB, capacity 5 % of the bytes",
            0,  # computed from the trace: sized_capacity()
            True,
            sized,
        ),
    ]


def read_trace(path: Path) -> Trace:
    """Read a trace file: one request per line, ``key`` or ``key size`` (bytes); ``#`` comments
    and blank lines are skipped. A key's first size is kept for all its requests."""
    out: Trace = []
    with path.open(encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) > 2:
                raise ValueError(f"{path}:{number}: expected 'key' or 'key size', got {line!r}")
            size = 1
            if len(parts) == 2:
                try:
                    size = int(parts[1])
                except ValueError:
                    raise ValueError(f"{path}:{number}: size must be an integer") from None
                if size <= 0:
                    raise ValueError(f"{path}:{number}: size must be positive")
            out.append((parts[0], size))
    return out
