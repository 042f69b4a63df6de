"""Tests of the benchmark tools themselves (not of the library): the policy benchmark
(bench/memory/policy.py): its simulator drives the real policy, its own
baselines are right (Belady is an upper bound, LRU agrees with libCacheSim's), and the trace
replay CLI prints the contracted JSON."""

from __future__ import annotations

import json
import subprocess
import sys
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
