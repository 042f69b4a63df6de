"""The shared registry: every series carries ``node``; names are checked at registration."""

from __future__ import annotations

import pytest

from vramancer.observability.metrics import Metrics


def _series(metrics: Metrics) -> list[str]:
    return [line for line in metrics.render().decode().splitlines() if not line.startswith("#")]


def test_every_sample_gets_the_node_label_unless_it_has_one() -> None:
    metrics = Metrics(node="gpu-box")
    metrics.counter("blocks_moved_total", "moves", ("tier",)).labels(tier="L4").inc(2)
    metrics.gauge("budget_bytes", "budget").set(5)
    metrics.gauge("peer_up", "peer", ("node",)).labels(node="other-box").set(1)
    assert _series(metrics) == [
        'vramancer_blocks_moved_total{node="gpu-box",tier="L4"} 2.0',
        'vramancer_budget_bytes{node="gpu-box"} 5.0',
        'vramancer_peer_up{node="other-box"} 1.0',
    ]


def test_histogram_buckets_carry_the_node_too() -> None:
    metrics = Metrics(node="n1")
    metrics.histogram("wait_seconds", "wait", buckets=(1.0,)).observe(0.5)
    assert _series(metrics) == [
        'vramancer_wait_seconds_bucket{le="1.0",node="n1"} 1.0',
        'vramancer_wait_seconds_bucket{le="+Inf",node="n1"} 1.0',
        'vramancer_wait_seconds_count{node="n1"} 1.0',
        'vramancer_wait_seconds_sum{node="n1"} 0.5',
    ]


def test_counters_must_end_in_total_and_getters_are_idempotent() -> None:
    metrics = Metrics(node="n1")
    with pytest.raises(ValueError, match="_total"):
        metrics.counter("moves", "bad name")
    assert metrics.gauge("x_bytes", "x") is metrics.gauge("x_bytes", "x")
    metrics.gauge("c", "as gauge")
    with pytest.raises(TypeError):
        metrics.counter("c_total", "as counter")
