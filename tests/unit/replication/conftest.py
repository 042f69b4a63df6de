"""Shared pieces of the replication tests: a key ring and an opened journal factory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vramancer.clock import ManualClock
from vramancer.observability.metrics import Metrics
from vramancer.replication.journal import Journal
from vramancer.replication.keys import KeyRing, hour_of

SECRET = b"s" * 32
#: The UTC hour a fresh ``ManualClock`` is in.
HOUR = hour_of(ManualClock().time())


@pytest.fixture
def keyring() -> KeyRing:
    return KeyRing(SECRET)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


JournalFactory = Callable[..., Journal]


@pytest.fixture
def make_journal(tmp_path: Path, keyring: KeyRing, clock: ManualClock) -> Iterator[JournalFactory]:
    """Open a journal on ``tmp_path/journal`` (reopen by calling again); all closed at the end."""
    opened: list[Journal] = []

    def make(segment_max_bytes: int = 1 << 20, metrics: Metrics | None = None) -> Journal:
        journal = Journal(
            tmp_path / "journal",
            keyring,
            segment_max_bytes=segment_max_bytes,
            fsync=False,
            clock=clock,
            metrics=metrics,
        )
        journal.open()
        opened.append(journal)
        return journal

    yield make
    for journal in opened:
        journal.close()
