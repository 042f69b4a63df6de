"""The pool benchmark (bench/tasks/pool.py): one side runs a few ``true`` tasks through a real
pool (nats-server, orchestrator, one worker), measures a dispatch latency, and leaves no process
behind; the pure parts (config, percentiles, argument parsing) answer as documented."""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

import pytest
from bench.tasks.pool import VramancerSide, _pct, _worker_counts, node_toml

from tests.natsserver import nats_server_binary


def test_node_config_gives_the_slots_and_the_pool_only_where_asked() -> None:
    pooled = tomllib.loads(node_toml("box0", nats_url="nats://h:4222", gpus=2))
    assert pooled["nats"]["url"] == "nats://h:4222"
    assert pooled["tasks"]["slots_per_device"] == 2
    assert [d["name"] for d in pooled["devices"]["simulated"]] == ["box0-sim0", "box0-sim1"]
    alone = tomllib.loads(node_toml("hub", nats_url=None, gpus=0, dispatch_interval_s=0.05))
    assert "nats" not in alone and "devices" not in alone
    assert alone["tasks"]["dispatch_interval_s"] == 0.05
    assert alone["tasks"]["synchronous"] == "normal"


def test_percentiles_and_worker_counts() -> None:
    values = [float(v) for v in range(1, 101)]
    assert _pct(values, 0.5) == 51.0  # nearest rank on 100 values
    assert _pct(values, 0.99) == 99.0
    assert _worker_counts("1, 2,4") == [1, 2, 4]
    with pytest.raises(argparse.ArgumentTypeError, match="--workers"):
        _worker_counts("0,2")
    with pytest.raises(argparse.ArgumentTypeError, match="--workers"):
        _worker_counts("two")


@pytest.mark.timeout(60)
def test_a_pool_side_runs_tasks_and_stops_every_process(tmp_path: Path) -> None:
    if nats_server_binary() is None:
        pytest.skip("no nats-server binary")
    side = VramancerSide("pool", tmp_path / "pool", 1, pool=True, dispatch_interval_s=0.05)
    try:
        side.setup()  # includes a warm-up batch, checked done
        assert side.run_once(10) > 0
        assert side.counts()["done"] == 30
        latencies = side.latency(2)
        assert len(latencies) == 2 and all(0 < ms < 10_000 for ms in latencies)
        procs = list(side.procs.procs)
        assert len(procs) == 2  # the orchestrator and the worker
    finally:
        side.teardown()
    assert all(proc.poll() is not None for proc in procs)
    assert side.nats is not None and side.nats.proc is None
