"""The gateway's Prometheus metrics (``model`` labels name configured models only)."""

from __future__ import annotations

from vramancer.observability.metrics import Metrics

#: Buckets of the waits and first bytes: a resident model answers in milliseconds, a swap in
#: seconds to minutes.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.requests = metrics.counter(
            "vramancer_gateway_requests_total",
            "Gateway requests answered, by model and HTTP status code.",
            ["model", "code"],
        )
        self.queue = metrics.histogram(
            "vramancer_gateway_queue_seconds",
            "Time a gateway request waited for its model to be resident and free.",
            buckets=SECONDS_BUCKETS,
        )
        self.ttfb = metrics.histogram(
            "vramancer_gateway_time_to_first_byte_seconds",
            "Time from a gateway request's arrival to the first byte of its answer.",
            buckets=SECONDS_BUCKETS,
        )
        self.swaps = metrics.counter(
            "vramancer_gateway_swaps_total",
            "Models the gateway made resident (a load, after evictions when needed).",
            ["model"],
        )
