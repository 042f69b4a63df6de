"""Tests of the benchmark tools themselves (not of the library): the policy benchmark
(bench/memory/policy.py): its simulator drives the real policy, its own
baselines are right (Belady is an upper bound, LRU agrees with libCacheSim's), and the trace
replay CLI prints the contracted JSON."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from bench.memory import traces
from bench.memory.policy import (
    TwoTierSim,
    libcachesim_available,
    run_arc,
    run_belady,
    run_gdsf,
    run_lfu,
    run_libcachesim,
    run_lru,
    run_vramancer,
)

from vramancer.memory.policy import HotnessIndex

ROOT = Path(__file__).resolve().parents[2]


def small_zipf() -> traces.Trace:
    return traces.zipf(0.9, n=6000)


def test_simulator_uses_the_real_policy_objects_and_respects_capacity() -> None:
    sim = TwoTierSim(50)
    assert isinstance(sim.index, HotnessIndex)
    hits = 0
    for key, size in small_zipf():
        hits += sim.request(key, size)
        assert sim.used <= 50
        assert sim.used == sum(b.size for b in sim.blocks.values() if b.tier == "fast")
    assert len(sim.index) == sum(1 for b in sim.blocks.values() if b.tier == "fast")
    assert hits > 0
    assert sim.clock.monotonic() == pytest.approx(6000 * 0.01)


def test_belady_bounds_every_policy_on_unit_sizes() -> None:
    trace = small_zipf()
    best = run_belady(trace, 50).hit_ratio
    for run in (run_lru, run_lfu, run_arc, run_gdsf):
        assert run(trace, 50).hit_ratio <= best
    assert run_vramancer(trace, 50, prefetch=False).hit_ratio <= best


def test_vramancer_beats_lru_on_a_loop_and_a_scan_mix() -> None:
    loop = traces.loop(length=60, n=3000)
    assert run_lru(loop, 50).hit_ratio == 0.0
    assert run_vramancer(loop, 50, prefetch=False).hit_ratio > 0.5
    mix = traces.zipf_with_scans(n=12_000, period=2000, scan_length=150, scan_space=1500)
    assert run_vramancer(mix, 50).hit_ratio > run_lru(mix, 50).hit_ratio


def test_prefetch_gains_on_sequential_reads() -> None:
    trace = traces.sequential(n=8000, sequences=20, pages=20, readers=2)
    with_prefetch = run_vramancer(trace, 50).hit_ratio
    without = run_vramancer(trace, 50, prefetch=False).hit_ratio
    assert with_prefetch > without + 0.15


def test_moving_hot_set_traces_are_seeded_and_shaped_as_described() -> None:
    switch = traces.hot_set_switch(n=50_000)
    assert switch == traces.hot_set_switch(n=50_000)
    first = {k for k, _ in switch[:25_000]}
    second = {k for k, _ in switch[25_000:]}
    # The hot set is replaced at once: the second phase's hot keys were never asked before.
    counts = Counter(k for k, _ in switch[25_000:])
    hot = {k for k, n in counts.items() if n >= 5}
    assert 600 <= len(hot) <= 700 and not hot & first
    assert sum(counts[k] for k in hot) >= 0.9 * 25_000
    drift = traces.hot_set_drift(n=20_000)
    assert drift == traces.hot_set_drift(n=20_000) and len(drift) == 20_000
    early = {k for k, _ in drift[:2000]}
    late = Counter(k for k, _ in drift[-2000:])
    # A window of 800 keys sliding one key per 8 requests: 2,250 keys further on, the hot
    # keys of the end were never hot at the start.
    assert not {k for k, n in late.items() if n >= 3} & early
    assert len(second - first) > 0


def test_after_an_abrupt_switch_the_new_hot_set_is_kept_within_4000_requests() -> None:
    """The ranking leans to recency on the ghosts of the new hot set (weight to 1, LRU order)
    within 2,000 requests of the switch, keeps the new set, then leans back. Over the first
    4,000 requests after the switch, the new set's requests miss little more than their
    compulsory first access (LRU: nothing more; before rejected blocks counted as seen once,
    354 more)."""
    trace = traces.hot_set_switch(n=50_000)
    counts = Counter(k for k, _ in trace[25_000:])
    hot = {k for k, n in counts.items() if n >= 5}
    sim = TwoTierSim(1000)
    weights: dict[int, float] = {}
    hits = {"early": 0, "late": 0}
    asked = {"early": 0, "late": 0}
    seen: set[str] = set()
    compulsory = 0
    for i, (key, size) in enumerate(trace):
        hit = sim.request(key, size)
        if i in (24_999, 27_000, 49_999):
            weights[i] = sim.index.recency_weight
        if i >= 25_000 and key in hot:
            part = "early" if i < 29_000 else "late"
            asked[part] += 1
            hits[part] += hit
            compulsory += part == "early" and key not in seen
            seen.add(key)
    assert weights[24_999] < 0.7  # a stable hot set: short of the recency end
    assert weights[27_000] == 1.0  # the switch drove it to the recency end
    assert weights[49_999] < 0.8  # and it came back once the new set was in
    assert compulsory > 600
    assert asked["early"] - hits["early"] - compulsory <= 60
    assert hits["late"] / asked["late"] >= 0.98
    resident = sum(1 for k in hot if sim.blocks[k].tier == "fast")
    assert resident >= len(hot) - 2


def test_a_small_tier_keeps_a_new_hot_set_within_450_requests_of_an_abrupt_switch() -> None:
    """64 slots; 80 % of requests on 48 hot keys, the rest one-off keys; after 4,000 requests
    the 48 hot keys are replaced by 48 others. The learned ranking is at the recency end around
    the switch, keeps the new set (all 48 resident 426 requests after the switch, some 9 reads
    each), then comes back (to 0.40 some 700 requests after it); over the new phase it hits more
    than LRU does."""
    rng = random.Random(1)
    cold = (f"c{i}" for i in itertools.count())
    old, new = [f"a{i}" for i in range(48)], [f"b{i}" for i in range(48)]

    def phase(hot: list[str]) -> list[str]:
        return [rng.choice(hot) if rng.random() < 0.8 else next(cold) for _ in range(4000)]

    keys = phase(old) + phase(new)
    sim = TwoTierSim(64)
    weights: list[float] = []
    kept_at = None
    hits = 0
    for i, key in enumerate(keys):
        hit = sim.request(key, 1)
        if i < 4000:
            continue
        hits += hit
        weights.append(sim.index.recency_weight)
        if kept_at is None and all(k in sim.blocks and sim.blocks[k].tier == "fast" for k in new):
            kept_at = i - 4000
    assert kept_at is not None and kept_at <= 450
    assert max(weights[:1000]) == 1.0 and weights[-1] < 0.6
    trace = [(k, 1) for k in keys]
    lru_hits = run_lru(trace, 64).hits - run_lru(trace[:4000], 64).hits
    assert hits > lru_hits
    assert sum(sim.blocks[k].tier == "fast" for k in new) == 48


@pytest.mark.skipif(not libcachesim_available(), reason="libcachesim not installed")
def test_own_lru_and_arc_agree_with_libcachesim() -> None:
    trace = small_zipf()
    assert run_lru(trace, 50).hits == run_libcachesim("LRU", trace, 50).hits
    assert run_arc(trace, 50).hits == run_libcachesim("ARC", trace, 50).hits


def test_trace_replay_cli_prints_hit_ratios_per_policy(tmp_path: Path) -> None:
    trace = tmp_path / "trace.txt"
    lines = ["# a comment", ""] + [k for k, _ in traces.zipf(0.9, n=3000)]
    trace.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.memory.policy",
            "--trace",
            str(trace),
            "--capacity",
            "40",
            "--json",
            "--only",
            "vramancer",
            "lru",
            "lfu",
            "arc",
            "belady",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(out.stdout)
    assert set(report) == {"vramancer", "lru", "lfu", "arc", "belady"}
    for result in report.values():
        assert 0.0 <= result["hit_ratio"] <= 1.0
        assert result["requests"] == 3000
    assert report["vramancer"]["hit_ratio"] >= report["lru"]["hit_ratio"]
    assert report["belady"]["hit_ratio"] >= report["vramancer"]["hit_ratio"]


def test_trace_replay_with_sizes_and_bad_input(tmp_path: Path) -> None:
    sized = tmp_path / "sized.txt"
    sized.write_text("a 100\nb 300\na 100\nc 50\nb 300\na 100\n", encoding="utf-8")
    assert traces.read_trace(sized)[1] == ("b", 300)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.memory.policy",
            "--trace",
            str(sized),
            "--capacity",
            "400",
            "--json",
            "--only",
            "vramancer",
            "lru",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(out.stdout)
    # LRU: a b (full) a=hit c (evicts b) b (evicts a) a (evicts c): one hit in six.
    assert report["lru"]["hit_ratio"] == pytest.approx(1 / 6, abs=1e-4)
    bad = tmp_path / "bad.txt"
    bad.write_text("a 1 2\n", encoding="utf-8")
    failed = subprocess.run(
        [sys.executable, "-m", "bench.memory.policy", "--trace", str(bad), "--capacity", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 2
    assert "expected 'key' or 'key size'" in failed.stderr
