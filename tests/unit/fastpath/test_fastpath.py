"""The fastpath between two memory stores on loopback: blocks byte-identical over TCP and
shared memory, a block this node lacks fetched through ``get``, a peer that leaves mid-transfer
or sends bytes that fail their checksum (a clear error, nothing kept), the shared secret."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.memory.store_support import StoreKit, make_settings
from vramancer.clock import ManualClock
from vramancer.errors import NotFound
from vramancer.fastpath.errors import FastpathError
from vramancer.fastpath.frames import (
    ANSWER_MAGIC,
    AUTH_SIZE,
    BODY,
    GREETING,
    GREETING_MAGIC,
    REQUEST,
    VERSION,
    Answer,
    Op,
    Status,
    pack_answer,
)
from vramancer.fastpath.interfaces import ShmInterface, TcpInterface
from vramancer.fastpath.links import Link, LinkTable
from vramancer.fastpath.service import FastpathService
from vramancer.fastpath.settings import FastpathSettings
from vramancer.memory.blockfile import checksum
from vramancer.memory.store import TieredStore
from vramancer.observability.metrics import Metrics

SECRET = "s" * 40


class Node:
    def __init__(self, data_dir: Path, peers: list[str], secret: str | None = None) -> None:
        self.kit = StoreKit(data_dir, make_settings(l4=1 << 20, l5=8 << 20, l6=32 << 20))
        self.store: TieredStore = self.kit.store
        settings = FastpathSettings(port=0, peers=peers, secret=secret)
        self.fastpath = FastpathService(
            settings,
            source=self.store,
            max_put_bytes=16 << 20,
            metrics=Metrics(node="t"),
            clock=ManualClock(),
        )
        self.fastpath.start()
        self.store.remote = self.fastpath.fetch

    @property
    def address(self) -> str:
        assert self.fastpath.address is not None
        return self.fastpath.address

    def stop(self) -> None:
        self.fastpath.stop()
        self.store.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Node, Node]]:
    a = Node(tmp_path / "a", [])
    b = Node(tmp_path / "b", [a.address])
    yield a, b
    b.stop()
    a.stop()


def test_a_block_comes_back_byte_identical_over_tcp_and_shared_memory(
    pair: tuple[Node, Node],
) -> None:
    a, _ = pair
    ram = os.urandom(200_000)
    disk = os.urandom(3 << 20)
    a.store.put("kv/ram", ram)
    a.store.put("weights/disk", disk, durable=True)  # a block file on a disk tier
    assert a.store.locate("weights/disk") in ("L5", "L6")
    export = a.store.export("weights/disk")
    try:
        assert export.fd is not None  # sent from its file, not copied through the process
        assert export.length == len(disk) and export.checksum == checksum(disk)
    finally:
        export.close()
    for interface in (TcpInterface(), ShmInterface()):
        assert interface.recv("kv/ram", a.address) == ram
        assert interface.recv("weights/disk", a.address) == disk
        with pytest.raises(NotFound):
            interface.recv("nope", a.address)


def test_recv_into_fills_a_reused_buffer_and_refuses_one_too_small(pair: tuple[Node, Node]) -> None:
    a, _ = pair
    first, second = os.urandom(3 << 20), os.urandom(1 << 20)
    a.store.put("w/first", first, durable=True)
    a.store.put("w/second", second, durable=True)
    buf = bytearray(4 << 20)
    tcp = TcpInterface()
    assert tcp.recv_into("w/first", buf, a.address) == len(first)
    assert bytes(buf[: len(first)]) == first
    assert tcp.recv_into("w/second", buf, a.address) == len(second)
    assert bytes(buf[: len(second)]) == second
    small = bytearray(1000)
    with pytest.raises(FastpathError, match="is 1048576 bytes, the buffer 1000"):
        tcp.recv_into("w/second", small, a.address)
    assert small == bytearray(1000)
    with pytest.raises(NotFound):
        tcp.recv_into("nope", buf, a.address)


def test_get_of_a_block_held_by_a_peer_fetches_it_and_keeps_it_here(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    data = os.urandom(100_000)
    a.store.put("dataset/shard-3", data)
    with pytest.raises(NotFound):
        b.store.locate("dataset/shard-3")
    assert b.store.get("dataset/shard-3") == data
    assert b.store.locate("dataset/shard-3") == "L4"  # kept: the next get is local
    with pytest.raises(NotFound, match="any fastpath peer"):
        b.store.get("held/by/nobody")


def test_send_stores_the_block_on_the_peer_over_both_interfaces(
    pair: tuple[Node, Node],
) -> None:
    a, _ = pair
    for interface in (TcpInterface(), ShmInterface()):
        data = os.urandom(50_000)
        name = f"pushed/{interface.name}"
        assert interface.send(name, data, a.address) == len(data)
        assert a.store.get(name) == data


def _fake_peer(answer_for: bytes, body: bytes) -> tuple[str, threading.Thread]:
    """A server speaking the protocol that answers a GET with ``answer_for`` and ``body``, then
    closes the connection (a probe's PING is dropped at once); it stops after its first GET."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def one(conn: socket.socket) -> bool:
        with conn:
            conn.sendall(GREETING.pack(GREETING_MAGIC, VERSION, b"n" * 16))
            conn.recv(AUTH_SIZE)
            head = conn.recv(REQUEST.size)
            if len(head) < REQUEST.size or head[4] != Op.GET:
                return False
            id_len = int.from_bytes(head[5:7], "little")
            conn.recv(id_len + BODY.size)
            conn.sendall(answer_for + body)
            return True

    def serve() -> None:
        with listener:
            while not one(listener.accept()[0]):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"127.0.0.1:{port}", thread


def test_a_peer_that_leaves_mid_transfer_is_an_error_and_nothing_is_kept(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    head = pack_answer(Answer(Status.OK, len(data), checksum(data)))
    address, thread = _fake_peer(head, data[: len(data) // 2])
    node = Node(tmp_path / "n", [address])
    try:
        with pytest.raises(FastpathError, match=f"after {len(data) // 2} of {len(data)} bytes"):
            node.store.get("weights/big")
        with pytest.raises(NotFound):
            node.store.locate("weights/big")  # no partial block
    finally:
        node.stop()
    thread.join(5)


def test_bytes_that_fail_their_checksum_are_refused(tmp_path: Path) -> None:
    data = os.urandom(4096)
    head = pack_answer(Answer(Status.OK, len(data), checksum(data) ^ 1))
    address, thread = _fake_peer(head, data)
    try:
        with pytest.raises(FastpathError, match="checksum mismatch"):
            TcpInterface().recv("kv/page", address)
    finally:
        thread.join(5)
    assert head[:4] == ANSWER_MAGIC


def test_with_a_secret_only_peers_that_know_it_are_served(tmp_path: Path) -> None:
    node = Node(tmp_path / "s", [], secret=SECRET)
    try:
        node.store.put("private/block", b"x" * 1000)
        assert TcpInterface(secret=SECRET).recv("private/block", node.address) == b"x" * 1000
        for wrong in (None, "w" * 40):
            with pytest.raises(FastpathError):
                TcpInterface(secret=wrong).recv("private/block", node.address)
    finally:
        node.stop()


def test_serving_beyond_loopback_needs_a_secret() -> None:
    with pytest.raises(ValueError, match="needs \\[fastpath\\] secret"):
        FastpathService(
            FastpathSettings(port=0, host="0.0.0.0"),
            source=None,  # type: ignore[arg-type]
            max_put_bytes=1,
            metrics=Metrics(node="t"),
            clock=ManualClock(),
        ).start()


def test_probes_measure_both_interfaces_to_a_local_peer_and_the_report_names_the_best(
    pair: tuple[Node, Node],
) -> None:
    a, b = pair
    links = b.fastpath.probe(a.address)
    assert sorted(x.interface for x in links) == ["shm", "tcp"]
    assert all(x.usable and x.latency_s is not None and x.latency_s > 0 for x in links)
    report = b.fastpath.report()
    best = [x for x in report["links"] if x["best"]]
    assert len(best) == 1 and best[0]["peer"] == a.address
    # The background probe may have measured again since probe() returned: the report's best is
    # the fastest of the report's own rows for that peer.
    rows = [x for x in report["links"] if x["peer"] == a.address and x["error"] is None]
    fastest = max(rows, key=lambda x: x["bandwidth_bytes_per_s"] or 0)
    assert best[0]["interface"] == fastest["interface"]


def test_the_link_table_picks_the_highest_bandwidth_and_ages_measurements() -> None:
    table = LinkTable(ttl_s=60)
    table.record(Link("p1", "tcp", 0.0002, 1e9, measured_at=100))
    table.record(Link("p1", "shm", 0.0001, 5e9, measured_at=100))
    table.record(Link("p2", "tcp", 0.0003, 2e9, measured_at=100))
    table.record(Link("p3", "tcp", None, None, measured_at=100, error="refused"))
    best = table.best("p1")
    assert best is not None and best.interface == "shm"
    assert table.best("p3") is None
    assert table.peers_by_speed(["p3", "p2", "p1", "p4"]) == ["p1", "p2", "p3", "p4"]
    assert not table.stale("p1", "tcp", now=159.9)
    assert table.stale("p1", "tcp", now=160) and table.stale("p4", "tcp", now=0)
