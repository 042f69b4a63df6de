"""The fastpath of one node: its server, the link table kept fresh by probes, and fetching a
block this node does not hold from the peers (what ``rt.memory.get`` calls on a miss).

Probes run on a thread of their own every ``probe_ttl_s`` (a peer not measured yet is reached
over TCP): per peer and interface a PING round trip (latency) and a PROBE of
``probe_bytes`` (bandwidth). ``shm`` is measured only for peers on this host. The measured
bandwidth is exported as ``vramancer_fastpath_interface_bandwidth_bytes_per_second``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from vramancer.clock import Clock
from vramancer.errors import NotFound
from vramancer.fastpath.errors import FastpathError
from vramancer.fastpath.frames import Op, Request
from vramancer.fastpath.interfaces import (
    Connection,
    ShmInterface,
    TcpInterface,
    attach,
    split_address,
)
from vramancer.fastpath.links import Link, LinkTable
from vramancer.fastpath.server import BlockSource, FastpathServer, buffer
from vramancer.fastpath.settings import FastpathSettings
from vramancer.fastpath.sockets import is_loopback, recv_exact
from vramancer.observability.metrics import Metrics
from vramancer.units import format_size

log = logging.getLogger(__name__)


class FastpathService:
    """See the module docstring. ``start()`` / ``stop()``; ``fetch(block_id)`` from the peers."""

    def __init__(
        self,
        settings: FastpathSettings,
        *,
        source: BlockSource,
        max_put_bytes: int,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.source = source
        self.max_put_bytes = max_put_bytes
        self.clock = clock
        self.links = LinkTable(settings.probe_ttl_s)
        args: dict[str, Any] = {"secret": settings.secret, "timeout_s": settings.timeout_s}
        self.interfaces: dict[str, TcpInterface | ShmInterface] = {
            "tcp": TcpInterface(metrics=metrics, **args),
            "shm": ShmInterface(metrics=metrics, **args),
        }
        self._bandwidth = metrics.gauge(
            "vramancer_fastpath_interface_bandwidth_bytes_per_second",
            "Last measured bandwidth of the fastpath link to a peer, per interface.",
            ["interface", "peer"],
        )
        self.server: FastpathServer | None = None
        #: More peers, asked at each use (a pool's nodes announce theirs); set by the runtime.
        self.discover: Callable[[], list[str]] | None = None
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def address(self) -> str | None:
        return self.server.address if self.server is not None else None

    def advertised(self, node_name: str) -> str | None:
        """The address other nodes reach this one at (``[fastpath] advertise``)."""
        if self.server is None:
            return None
        if self.settings.advertise:
            return self.settings.advertise
        host, port = split_address(self.server.address)
        if host in ("0.0.0.0", "::"):
            host = node_name
        return f"{host}:{port}"

    def peers(self) -> list[str]:
        """The configured peers, then the discovered ones (each once, never this node)."""
        found = list(self.settings.peers)
        if self.discover is not None:
            found += self.discover()
        return [p for p in dict.fromkeys(found) if p != self.address]

    def start(self) -> None:
        self.server = FastpathServer(self.settings, self.source, self.max_put_bytes)
        self.server.start()
        log.info("fastpath: serving blocks on %s", self.server.address)
        if self.settings.peers or self.discover is not None:
            self._prober = threading.Thread(
                target=self._probe_loop, name="vrm-fastpath-probe", daemon=True
            )
            self._prober.start()

    def stop(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.stop()
            self.server = None

    # -- fetching ------------------------------------------------------------------------
    def fetch(self, block_id: str) -> bytearray:
        """The block from the first peer that has it, over that peer's fastest link;
        ``NotFound`` when none has it; ``FastpathError`` when every peer that may have it
        failed (no partial block is ever returned)."""
        errors: list[str] = []
        with self._lock:
            order = self.links.peers_by_speed(self.peers())
            chosen = {peer: self.links.best(peer) for peer in order}
        for peer in order:
            link = chosen[peer]  # not measured yet: TCP
            interface = self.interfaces[link.interface if link is not None else "tcp"]
            try:
                return interface.recv(block_id, peer)
            except NotFound:
                continue
            except FastpathError as exc:
                errors.append(str(exc))
        if errors:
            raise FastpathError(f"block {block_id!r} could not be fetched: {'; '.join(errors)}")
        raise NotFound(f"no block {block_id!r} here or on any fastpath peer")

    # -- probing -------------------------------------------------------------------------
    def _probe_loop(self) -> None:
        while not self._stop.is_set():
            for peer in self.peers():
                if self._stop.is_set():
                    return
                self.probe(peer)
            self._stop.wait(self.settings.probe_ttl_s)

    def interfaces_for(self, peer: str) -> list[str]:
        host, _ = split_address(peer)
        local = is_loopback(host) or host in (socket.gethostname(), socket.getfqdn())
        return ["tcp", "shm"] if local else ["tcp"]

    def probe(self, peer: str) -> list[Link]:
        """Measure every interface to ``peer`` now; the table and the gauge are updated."""
        measured = []
        for name in self.interfaces_for(peer):
            link = self._measure(peer, name)
            with self._lock:
                self.links.record(link)
            if link.bandwidth_bytes_per_s is not None:
                self._bandwidth.labels(interface=name, peer=peer).set(link.bandwidth_bytes_per_s)
            measured.append(link)
        return measured

    def _measure(self, peer: str, name: str) -> Link:
        now = self.clock.time()
        try:
            conn = Connection(peer, self.settings.secret, self.settings.timeout_s)
        except FastpathError as exc:
            return Link(peer, name, None, None, now, str(exc))
        try:
            t0 = time.perf_counter()
            conn.ask(Request(Op.PING, ""))
            latency = time.perf_counter() - t0
            n = self.settings.probe_bytes
            t0 = time.perf_counter()
            if name == "tcp":
                answer, sock = conn.ask(Request(Op.PROBE, "", n))
                recv_exact(sock, answer.length, "a probe")
            else:
                answer, _ = conn.ask(Request(Op.PROBE_SHM, "", n))
                segment = attach(answer.name, peer)
                try:
                    bytes(buffer(segment)[: answer.length])
                finally:
                    segment.close()
            seconds = max(time.perf_counter() - t0, 1e-9)
        except FastpathError as exc:
            return Link(peer, name, None, None, now, str(exc))
        finally:
            conn.close()
        log.debug(
            "fastpath %s to %s: %.3f ms, %s/s", name, peer, latency * 1000, format_size(n / seconds)
        )
        return Link(peer, name, latency, n / seconds, now)

    def report(self) -> dict[str, Any]:
        """``GET /v1/fastpath``."""
        with self._lock:
            rows = self.links.rows()
            peers = self.peers()
            best = {p: self.links.best(p) for p in peers}
        return {
            "enabled": True,
            "address": self.address,
            "interfaces": ["tcp", "shm", "local"],
            "peers": peers,
            "links": [
                {
                    "peer": x.peer,
                    "interface": x.interface,
                    "latency_s": x.latency_s,
                    "bandwidth_bytes_per_s": x.bandwidth_bytes_per_s,
                    "measured_at": x.measured_at,
                    "error": x.error,
                    "best": best.get(x.peer) is x,
                }
                for x in rows
            ],
        }
