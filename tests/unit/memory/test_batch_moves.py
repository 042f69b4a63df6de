"""Moves into a disk tier as one batch: each block file fsynced, the directory fsynced once, the
catalog rows committed after it in one transaction. What a crash leaves at any point of a batch
loses no block that was on disk. Real files and a real SQLite catalog throughout."""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.unit.memory.store_support import StoreKit, make_settings
from vramancer import files
from vramancer.errors import Conflict, InsufficientStorage, NotFound
from vramancer.memory import backends, blockfile
from vramancer.memory.catalog import read_rows
from vramancer.memory.planner import Move

KIB = 1024


def rand(n: int, which: int) -> bytes:
    return np.random.default_rng(which).integers(0, 256, n, dtype=np.uint8).tobytes()


def blocks(kit: StoreKit, count: int, size: int = 8 * KIB) -> dict[str, bytes]:
    values = {f"b/{i}": rand(size, i) for i in range(count)}
    for key, value in values.items():
        assert kit.store.put(key, value) == "L4"
    return values


class Journal:
    """What reaches the disk, in order: the fsyncs a batch defers (a file's data, a directory:
    by tier directory name) and catalog commits of several rows."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kit: StoreKit) -> None:
        self.calls: list[str] = []
        real_fsync_dir = files.fsync_dir

        def fsync_dir(path: Path) -> None:
            self.calls.append(f"fsync {path.name}")
            real_fsync_dir(path)

        def sync_file(path: Path) -> None:
            self.calls.append(f"fdatasync {path.parent.name}")
            real_sync_file(path)

        real_sync_file = blockfile.sync_file
        monkeypatch.setattr(blockfile, "fsync_dir", fsync_dir)
        monkeypatch.setattr(backends, "fsync_dir", fsync_dir)
        monkeypatch.setattr(backends, "sync_file", sync_file)
        catalog = kit.store._db()
        real_upsert_many = catalog.upsert_many

        def upsert_many(rows: list[Any], *, durable: bool = True) -> None:
            self.calls.append(f"commit {len(rows)}")
            real_upsert_many(rows, durable=durable)

        monkeypatch.setattr(catalog, "upsert_many", upsert_many)

    def count(self, call: str) -> int:
        return self.calls.count(call)


def fsync_kit(path: Path, **settings: Any) -> StoreKit:
    return StoreKit(path, make_settings(fsync=True, **settings))


def test_a_batch_demote_fsyncs_the_directory_once_then_commits_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kit = fsync_kit(tmp_path / "data")
    values = blocks(kit, 5)
    journal = Journal(monkeypatch, kit)
    assert kit.store.demote_many(list(values)[:4], "L5") == {f"b/{i}": "L5" for i in range(4)}
    assert journal.calls == [*["fdatasync l5"] * 4, "fsync l5", "commit 4"]
    kit.store.demote("b/4", "L5")  # one block alone: its own directory fsync, its own commit
    assert journal.count("fsync l5") == 2 and journal.count("commit 4") == 1
    rows = {row.id: row for row in read_rows(tmp_path / "data" / "memory.sqlite")}
    assert set(rows) == set(values)
    for row in rows.values():
        assert row.tier == "L5" and (tmp_path / "data" / "l5" / row.file).is_file()
    kit.check_invariants()
    kit.crash()
    store = kit.new_store()
    for key, value in values.items():
        assert store.locate(key) == "L5" and store.get(key) == value


def test_the_eviction_cycle_moves_its_blocks_down_as_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kit = fsync_kit(tmp_path / "data")
    values = blocks(kit, 6)
    journal = Journal(monkeypatch, kit)
    kit.store.set_capacity("L4", 16 * KIB)
    moved = [key for key in values if kit.store.locate(key) == "L5"]
    assert len(moved) >= 4
    assert journal.calls == [*["fdatasync l5"] * len(moved), "fsync l5", f"commit {len(moved)}"]
    for key, value in values.items():
        assert kit.store.get(key) == value
    kit.check_invariants()


def crash_at_commit(kit: StoreKit, image: Path) -> None:
    """The catalog's next commit of several rows finds the process dead: ``image`` gets what
    the data directory holds at that moment, and the commit fails."""
    catalog = kit.store._db()

    def upsert_many(rows: list[Any], *, durable: bool = True) -> None:
        shutil.copytree(kit.data_dir, image)
        raise RuntimeError("power cut")

    catalog.upsert_many = upsert_many  # type: ignore[method-assign]


def test_a_crash_between_the_files_and_the_commit_loses_no_block(tmp_path: Path) -> None:
    kit = fsync_kit(tmp_path / "data")
    values = blocks(kit, 4)
    crash_at_commit(kit, tmp_path / "crashed")
    with pytest.raises(RuntimeError, match="power cut"):
        kit.store.demote_many(values, "L5")
    # the process that lives on: the batch undone, its own files gone, every block in L4
    assert not list((tmp_path / "data" / "l5").glob("*.blk"))
    for key, value in values.items():
        assert kit.store.locate(key) == "L4" and kit.store.get(key) == value
    kit.check_invariants()
    # the crash image: every file of the batch was complete and named, so the restart adopts
    # each block from its file's record
    assert len(list((tmp_path / "crashed" / "l5").glob("*.blk"))) == 4
    restarted = StoreKit(tmp_path / "crashed", kit.settings).store
    for key, value in values.items():
        assert restarted.locate(key) == "L5" and restarted.get(key) == value


def test_a_crash_in_a_batch_between_disk_tiers_keeps_the_old_copies(tmp_path: Path) -> None:
    kit = fsync_kit(tmp_path / "data")
    values = blocks(kit, 4)
    kit.store.demote_many(values, "L5")
    crash_at_commit(kit, tmp_path / "crashed")
    with pytest.raises(RuntimeError, match="power cut"):
        kit.store.demote_many(values, "L6")
    assert not list((tmp_path / "data" / "l6").glob("*.blk"))
    # the crash image: the committed rows still name the L5 files; the new L6 copies are
    # other copies of blocks that have one: set aside, never deleted
    restarted = StoreKit(tmp_path / "crashed", kit.settings).store
    for key, value in values.items():
        assert restarted.locate(key) == "L5" and restarted.get(key) == value
    assert len(list((tmp_path / "crashed" / "l6" / "quarantine").glob("*.blk"))) == 4


def failing_on_write(number: int) -> Callable[..., int]:
    """``write_block_file`` whose ``number``-th call finds the disk full."""
    real = blockfile.write_block_file
    calls = iter(range(1, 1 << 20))

    def write(*args: Any, **kwargs: Any) -> int:
        if next(calls) == number:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    return write


def test_a_full_disk_in_a_batch_commits_the_blocks_written_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kit = fsync_kit(tmp_path / "data")
    values = blocks(kit, 4)
    monkeypatch.setattr(backends, "write_block_file", failing_on_write(3))
    with pytest.raises(InsufficientStorage):
        kit.store.demote_many(values, "L5")
    monkeypatch.undo()
    tiers = [kit.store.locate(key) for key in values]
    assert tiers == ["L5", "L5", "L4", "L4"]
    assert len(list((tmp_path / "data" / "l5").glob("*.blk"))) == 2
    kit.check_invariants()
    kit.crash()
    store = kit.new_store()
    assert [k for k in values if k in store] == ["b/0", "b/1"]
    assert store.get("b/1") == values["b/1"]


def test_a_stale_move_in_a_batch_is_skipped_and_the_others_moved(tmp_path: Path) -> None:
    kit = fsync_kit(tmp_path / "data")
    values = blocks(kit, 3)
    kit.store.pin("b/1")
    plan = [Move(key, len(value), "L4", "L5", "evict") for key, value in values.items()]
    assert kit.store._moves.apply(plan) == 2
    assert [kit.store.locate(k) for k in values] == ["L5", "L4", "L5"]
    kit.check_invariants()


def test_a_batch_takes_no_more_room_than_its_tier_has(tmp_path: Path) -> None:
    kit = fsync_kit(tmp_path / "data", l5=20 * KIB)
    values = blocks(kit, 4)
    plan = [Move(key, len(value), "L4", "L5", "evict") for key, value in values.items()]
    assert kit.store._moves.apply(plan) == 2
    assert [kit.store.locate(k) for k in values] == ["L5", "L5", "L4", "L4"]
    kit.check_invariants()


def test_demote_many_refuses_pinned_and_unknown_blocks_before_moving_any(
    tmp_path: Path,
) -> None:
    kit = fsync_kit(tmp_path / "data")
    values = blocks(kit, 3)
    kit.store.pin("b/2")
    with pytest.raises(Conflict):
        kit.store.demote_many(values, "L5")
    with pytest.raises(NotFound):
        kit.store.demote_many(["b/0", "missing"], "L5")
    assert [kit.store.locate(k) for k in values] == ["L4", "L4", "L4"]
    # without a tier: each to the nearest tier below with room, as demote does
    assert kit.store.demote_many(["b/0", "b/1"]) == {"b/0": "L5", "b/1": "L5"}


def test_a_spill_whose_batch_cannot_commit_goes_on_and_keeps_its_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kit = fsync_kit(tmp_path / "data")
    values = blocks(kit, 3)

    def full(rows: list[Any], *, durable: bool = True) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kit.store._db(), "upsert_many", full)
    assert kit.store.spill() == 0
    assert not list((tmp_path / "data" / "l5").glob("*.blk"))
    for key, value in values.items():
        assert kit.store.locate(key) == "L4" and kit.store.get(key) == value
    kit.check_invariants()
