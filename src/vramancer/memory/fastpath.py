"""``FastInterface.send/recv``: moving block bytes over a fast link.

A transfer between tiers or hosts is delegated to an interface. This module holds the protocol
and the in-process local copy: the reference behaviour (byte-identical data, one copy) and the
baseline the others are measured against; the interfaces that reach other nodes (TCP, shared
memory) are in ``vramancer.fastpath``. Each transfer's latency goes to
``vramancer_fastpath_interface_latency_seconds{interface}``.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable

from vramancer.errors import NotFound
from vramancer.observability.metrics import Metrics

#: The latency histogram every interface reports to (label ``interface``).
LATENCY_METRIC = "vramancer_fastpath_interface_latency_seconds"
LATENCY_BUCKETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)


@runtime_checkable
class FastInterface(Protocol):
    """A link that carries block bytes to a peer (``peer`` None: this host)."""

    name: str

    def send(
        self, block_id: str, data: bytes | bytearray | memoryview, peer: str | None = None
    ) -> int:
        """Send the bytes of ``block_id``; returns the number of bytes sent."""
        ...

    def recv(self, block_id: str, peer: str | None = None) -> bytes | bytearray:
        """Receive the bytes sent for ``block_id``; ``NotFound`` if none are waiting."""
        ...


class LocalCopyInterface:
    """In-process mailbox: ``send`` copies the bytes in, ``recv`` hands them out once."""

    name = "local"

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._boxes: dict[tuple[str | None, str], bytes] = {}
        self._lock = threading.Lock()
        self._latency = (
            metrics.histogram(
                LATENCY_METRIC,
                "Seconds one fastpath transfer took, per interface.",
                ["interface"],
                buckets=LATENCY_BUCKETS,
            ).labels(interface=self.name)
            if metrics is not None
            else None
        )

    def send(
        self, block_id: str, data: bytes | bytearray | memoryview, peer: str | None = None
    ) -> int:
        start = time.perf_counter()
        copy = bytes(data)
        with self._lock:
            self._boxes[(peer, block_id)] = copy
        self._observe(start)
        return len(copy)

    def recv(self, block_id: str, peer: str | None = None) -> bytes:
        start = time.perf_counter()
        with self._lock:
            data = self._boxes.pop((peer, block_id), None)
        if data is None:
            raise NotFound(f"nothing was sent for block {block_id!r}")
        self._observe(start)
        return data

    def _observe(self, start: float) -> None:
        if self._latency is not None:
            self._latency.observe(time.perf_counter() - start)
