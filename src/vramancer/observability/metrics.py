"""One Prometheus registry shared by every subsystem.

Names follow Prometheus' naming guide: ``vramancer_`` prefix, base units as suffix
(``_bytes``, ``_seconds``, ``_celsius``, ``_watts``, ``_ratio``), counters end in ``_total``.
Labels are ``backend``, ``device`` (a GPU UUID or ``host``), ``node`` and a few bounded ones
(``tier``, ``state``); never a task or request id. Getters are idempotent so subsystems can
ask for the same metric twice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric

PREFIX = "vramancer_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_M = TypeVar("_M", bound=MetricWrapperBase)

# prometheus_client adds a ``<name>_created`` gauge (a Unix timestamp) beside every counter and
# histogram; in the text format that doubles the series, and the names break the scheme above
# (no unit, not a counter). Prometheus does not need them. A process-wide switch of the library.
disable_created_metrics()  # type: ignore[no-untyped-call]


class NodeRegistry(CollectorRegistry):
    """A registry that labels every sample with ``node`` (unless the metric set one itself).

    Every series of a VRAMancer process carries the node it came from, without each subsystem
    having to declare and fill a ``node`` label on each metric.
    """

    def __init__(self, node: str) -> None:
        super().__init__()
        self.node = node

    def collect(self) -> Iterator[Metric]:
        for family in super().collect():
            family.samples = [
                s if "node" in s.labels else s._replace(labels={**s.labels, "node": self.node})
                for s in family.samples
            ]
            yield family


class Metrics:
    """Get-or-create access to metrics in one registry (one per Runtime, so tests isolate)."""

    def __init__(self, node: str, registry: CollectorRegistry | None = None) -> None:
        self.node = node
        self.registry = registry if registry is not None else NodeRegistry(node)
        self._metrics: dict[str, MetricWrapperBase] = {}
        self._lock = threading.Lock()

    def counter(self, name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in _total")
        # prometheus_client appends _total itself; register the stem.
        return self._get(Counter, name.removesuffix("_total"), doc, labels)

    def gauge(self, name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
        return self._get(Gauge, name, doc, labels)

    def histogram(
        self,
        name: str,
        doc: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] | None = None,
    ) -> Histogram:
        with self._lock:
            key = PREFIX + name.removeprefix(PREFIX)
            existing = self._metrics.get(key)
            if existing is None:
                kwargs = {"buckets": tuple(buckets)} if buckets else {}
                existing = Histogram(
                    key,
                    doc,
                    list(labels),
                    registry=self.registry,
                    **kwargs,  # type: ignore[arg-type]
                )
                self._metrics[key] = existing
        assert isinstance(existing, Histogram)
        return existing

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def _get(self, kind: type[_M], name: str, doc: str, labels: Sequence[str]) -> _M:
        key = PREFIX + name.removeprefix(PREFIX)
        with self._lock:
            existing = self._metrics.get(key)
            if existing is None:
                existing = kind(key, doc, list(labels), registry=self.registry)
                self._metrics[key] = existing
        if not isinstance(existing, kind):
            raise TypeError(f"metric {key} already registered as {type(existing).__name__}")
        return existing
