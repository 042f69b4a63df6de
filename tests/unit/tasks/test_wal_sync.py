"""The WAL sync after durable commits (``sqlite_sync``): a durable operation is answered only
after the WAL file is synced, one that needs no sync is answered without waiting for the disk,
and a sync that fails fails the durable operations it was for."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
from tests.unit.tasks.queue_support import T0, new

from vramancer.errors import BackendUnavailable
from vramancer.tasks import sqlite_sync
from vramancer.tasks.model import Grant, OutcomeKind, TaskState
from vramancer.tasks.settings import Synchronous
from vramancer.tasks.sqlite_queue import SqliteQueue


class HeldDisk:
    """``os.fdatasync`` that waits until released, and records what it synced."""

    def __init__(self, fail: OSError | None = None) -> None:
        self.release = threading.Event()
        self.synced: list[str] = []
        self.fail = fail

    def __call__(self, fd: int) -> None:
        self.release.wait(10)
        self.synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        if self.fail is not None:
            raise self.fail


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> HeldDisk:
    held = HeldDisk()
    monkeypatch.setattr(sqlite_sync.os, "fdatasync", held)
    return held


async def test_a_durable_commit_is_answered_after_the_wal_sync_and_a_lease_is_not_held(
    tmp_path: Path, disk: HeldDisk
) -> None:
    q = SqliteQueue(tmp_path / "tasks.sqlite")
    await q.open()
    try:
        disk.release.set()
        await q.submit([new("a")], T0)  # the WAL file exists from here on
        disk.release.clear()
        submitting = asyncio.ensure_future(q.submit([new("b")], T0))
        await asyncio.sleep(0.2)
        assert not submitting.done()  # committed, not answered: the disk has not synced
        leased, _ = await asyncio.wait_for(
            q.lease([Grant("a", "host")], worker="w", now=T0, lease_s=30), 5
        )
        assert [r.task_id for r in leased] == ["a"]  # not behind the sync
        assert not submitting.done()
        disk.release.set()
        submitted, _ = await asyncio.wait_for(submitting, 5)
    finally:
        disk.release.set()
        await q.close()
    assert [s.task_id for s in submitted] == ["b"]
    assert disk.synced and all(p == str(tmp_path / "tasks.sqlite-wal") for p in disk.synced)


async def test_the_end_of_a_task_is_synced_before_it_is_answered(
    tmp_path: Path, disk: HeldDisk
) -> None:
    q = SqliteQueue(tmp_path / "tasks.sqlite")
    await q.open()
    disk.release.set()
    try:
        await q.submit([new("a")], T0)
        (record,), _ = await q.lease([Grant("a", "host")], worker="w", now=T0, lease_s=30)
        before = len(disk.synced)
        changes = await q.finish(
            [record.outcome(OutcomeKind.OK, exit_code=0)], now=T0 + 1, retry_delay=lambda a: 1.0
        )
        assert [c.state for c in changes] == [TaskState.DONE]
        assert len(disk.synced) > before  # a sync came between the commit and the answer
    finally:
        await q.close()


async def test_a_failed_sync_fails_the_durable_operations_it_was_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    q = SqliteQueue(tmp_path / "tasks.sqlite")
    await q.open()
    try:
        await q.submit([new("a")], T0)
        broken = HeldDisk(fail=OSError(5, "Input/output error"))
        broken.release.set()
        monkeypatch.setattr(sqlite_sync.os, "fdatasync", broken)
        with pytest.raises(BackendUnavailable, match="sync failed"):
            await q.submit([new("b")], T0)
        leased, _ = await q.lease([Grant("a", "host")], worker="w", now=T0, lease_s=30)
        assert [r.task_id for r in leased] == ["a"]  # answered without a sync: unaffected
    finally:
        await q.close()


async def test_with_synchronous_normal_nothing_is_synced(tmp_path: Path, disk: HeldDisk) -> None:
    q = SqliteQueue(tmp_path / "tasks.sqlite", synchronous=Synchronous.NORMAL)
    await q.open()
    try:
        await asyncio.wait_for(q.submit([new("a")], T0), 5)  # the held disk is never asked
    finally:
        await q.close()
    assert disk.synced == []
