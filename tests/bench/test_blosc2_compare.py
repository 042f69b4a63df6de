"""The blosc2-beside-ours compression benchmark (bench/memory/blosc2_compare.py) measures both
sides on the same blocks, and every round trip it times gives the block back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_blosc2_compare_reports_both_sides_on_every_block() -> None:
    command = ["bench.memory.blosc2_compare", "--runs", "1", "--block-mib", "1", "--json"]
    done = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = json.loads(done.stdout)["rows"]
    blocks = {r["block"] for r in rows}
    assert blocks == {"minilm-bf16", "minilm-fp16", "minilm-int8", "random-bf16"}
    for block in blocks:
        options = {r["option"]: r for r in rows if r["block"] == block}
        assert {"ours zstd-1", "blosc2 zstd clevel 1", "ours lz4", "blosc2 lz4 clevel 5"} <= set(
            options
        )
        # the same bytes, the same codec: ratios within a few per cent of each other
        ours, theirs = options["ours zstd-1"]["ratio"], options["blosc2 zstd clevel 1"]["ratio"]
        assert ours > 1.0 and abs(ours - theirs) / ours < 0.05
        assert all(r["c_mb_cpu_s"] > 0 and r["d_mb_cpu_s"] > 0 for r in options.values())


def test_blosc2_compare_store_legs_move_every_block_with_each_family() -> None:
    command = ["bench.memory.blosc2_compare", "--store", "--runs", "1", "--block-mib", "1"]
    done = subprocess.run(
        [sys.executable, "-m", *command, "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    legs = json.loads(done.stdout)["legs"]
    seen = {(r["block"], r["option"], r["leg"]) for r in legs}
    assert len(seen) == len(legs) == 4 * 3 * 4  # blocks × (ours, blosc2, both) × legs
    for row in legs:
        assert row["mb_s"] > 0
        if row["option"] == "ours":
            assert row["codec"] in {"none", "zstd", "lz4", "gzip"}
        if row["option"] == "blosc2":
            assert row["codec"] == "none" or row["codec"].startswith("b2")
        if row["leg"].endswith("L6") and row["block"] != "minilm-int8":
            assert row["codec"] != "none" and row["ratio"] > 1.1  # the archive compresses


def test_blosc2_compare_refuses_bad_arguments() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory.blosc2_compare", "--runs", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2 and "--runs" in done.stderr
