"""The link table (pure): per peer and interface, the last measured latency and bandwidth, how
old they are, and which interface is the fastest to each peer."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Link:
    """One measurement of ``interface`` to ``peer`` at ``measured_at`` (unix seconds);
    ``error`` when the link could not be measured (it is then never chosen)."""

    peer: str
    interface: str
    latency_s: float | None
    bandwidth_bytes_per_s: float | None
    measured_at: float
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.error is None and bool(self.bandwidth_bytes_per_s)


class LinkTable:
    """Measurements kept for ``ttl_s``; ``best(peer)`` is the usable link with the highest
    bandwidth (the lower latency on a tie)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._links: dict[tuple[str, str], Link] = {}

    def record(self, link: Link) -> None:
        self._links[(link.peer, link.interface)] = link

    def stale(self, peer: str, interface: str, now: float) -> bool:
        link = self._links.get((peer, interface))
        return link is None or now - link.measured_at >= self.ttl_s

    def best(self, peer: str) -> Link | None:
        usable = [x for (p, _), x in self._links.items() if p == peer and x.usable]
        if not usable:
            return None
        return max(usable, key=lambda x: (x.bandwidth_bytes_per_s or 0.0, -(x.latency_s or 0.0)))

    def peers_by_speed(self, peers: list[str]) -> list[str]:
        """``peers``, the ones with the fastest usable link first (unmeasured ones last, in
        their configured order)."""

        def speed(peer: str) -> float:
            link = self.best(peer)
            return link.bandwidth_bytes_per_s or 0.0 if link is not None else -1.0

        return sorted(peers, key=speed, reverse=True)

    def rows(self) -> list[Link]:
        return sorted(self._links.values(), key=lambda x: (x.peer, x.interface))
