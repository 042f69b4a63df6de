"""Segments are released only up to the seq every peer acknowledged, and sync-mode waits end
on the first peer's acknowledgement (``Shippers``, with a real journal, no network)."""

from __future__ import annotations

import asyncio

from tests.unit.replication.conftest import JournalFactory
from vramancer.clock import ManualClock
from vramancer.observability.metrics import Metrics
from vramancer.replication.journal import Journal
from vramancer.replication.settings import HaSettings
from vramancer.replication.shipper import Shippers


async def _nothing() -> bytes:
    return b""


async def _never(epoch: int, address: str) -> None:
    raise AssertionError("no newer epoch here")


def shippers(journal: Journal, peers: list[str]) -> Shippers:
    return Shippers(
        peers,
        journal=journal,
        settings=HaSettings(),
        metrics=Metrics(node="n"),
        clock=ManualClock(),
        snapshot=_nothing,
        on_newer_epoch=_never,
        own_address="127.0.0.1:1",
    )


def fill(journal: Journal, n: int) -> None:
    for i in range(n):
        journal.append("task", b"x" * 100)
        if i % 10 == 9:
            journal.rotate()


def test_segments_go_only_once_every_peer_acked_them(make_journal: JournalFactory) -> None:
    async def run() -> None:
        journal = make_journal()
        fill(journal, 50)
        ship = shippers(journal, ["a:1", "b:1"])
        first, second = ship.peers
        before = [s.first_seq for s in journal.segments()]
        first.acked_seq = 50
        ship._acked()
        assert [s.first_seq for s in journal.segments()] == before  # b has acked nothing yet
        second.acked_seq = 25
        ship._acked()
        assert journal.oldest_seq == 21  # 1-10 and 11-20 are held by both; 21-30 is not
        first.acked_seq = None  # a peer that went down and came back unknown holds everything
        second.acked_seq = 50
        ship._acked()
        assert journal.oldest_seq == 21
        await ship.client.aclose()

    asyncio.run(run())


def test_sync_wait_ends_on_the_first_peer_ack(make_journal: JournalFactory) -> None:
    async def run() -> None:
        journal = make_journal()
        fill(journal, 5)
        ship = shippers(journal, ["a:1", "b:1"])

        async def ack_later() -> None:
            await asyncio.sleep(0.05)
            ship.peers[1].acked_seq = 5
            ship._acked()

        acking = asyncio.create_task(ack_later())
        assert await ship.wait_acked(5, 2.0)
        await acking
        assert not await ship.wait_acked(6, 0.05)
        await ship.client.aclose()

    asyncio.run(run())
