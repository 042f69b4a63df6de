"""Durability of the block store: moved, copied and damaged data directories, a full disk,
durable puts, file modes. Real files and a real SQLite catalog throughout."""

from __future__ import annotations

import errno
import hashlib
import shutil
import sqlite3
import stat
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.unit.memory.store_support import StoreKit, make_settings
from vramancer.errors import CatalogCorrupt, Conflict, DataDirInUse, InsufficientStorage
from vramancer.memory import blockfile
from vramancer.memory.blockfile import read_block_header, write_block_file
from vramancer.memory.catalog import Catalog
from vramancer.memory.recovery import id_digest, rebuild
from vramancer.memory.storage import DataDirLock

KIB = 1024


def rand(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def fill(kit: StoreKit, count: int = 12) -> dict[str, Any]:
    """``count`` blocks on disk (L5 and L6; bytes and arrays), returned by id."""
    values: dict[str, Any] = {}
    for i in range(count):
        value: Any = rand(1500 + i, i)
        if i % 3 == 0:
            value = np.arange(i * 10, i * 10 + 60, dtype=np.float32).reshape(6, 10)
        key = f"blk/{i}"
        kit.store.put(key, value, priority=i % 4, hint="kv" if i % 2 else None)
        kit.store.demote(key, "L6" if i % 2 else "L5")
        values[key] = value
    kit.store.pin("blk/0")
    return values


def same(got: Any, want: Any) -> bool:
    if isinstance(want, np.ndarray):
        return bool(
            isinstance(got, np.ndarray)
            and got.dtype == want.dtype
            and got.shape == want.shape
            and got.tobytes() == want.tobytes()
        )
    return bool(got == want)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` -> its SHA-256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def block_files(root: Path) -> list[Path]:
    return sorted(p for tier in ("l5", "l6") for p in (root / tier).glob("*.blk"))


def quarantined(kit: StoreKit, what: str) -> float:
    total = 0.0
    for tier in ("L5", "L6", "none"):
        value = kit.metrics.registry.get_sample_value(
            "vramancer_memory_quarantined_blocks_total",
            {"node": "test", "tier": tier, "what": what},
        )
        total += value or 0.0
    return total


def test_a_moved_data_directory_keeps_every_block(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "data")
    values = fill(kit)
    kit.store.close()
    (tmp_path / "data").rename(tmp_path / "data2")
    moved = StoreKit(tmp_path / "data2")
    assert len(moved.store) == len(values)
    for key, value in values.items():
        assert same(moved.store.get(key), value), key
    assert moved.store.info("blk/0")["pinned"] is True
    moved.check_invariants()


@pytest.mark.parametrize("absolute_rows", [False, True])
def test_a_copied_data_directory_works_and_leaves_the_original_alone(
    tmp_path: Path, absolute_rows: bool
) -> None:
    original = tmp_path / "data"
    kit = StoreKit(original)
    values = fill(kit)
    kit.store.close()
    if absolute_rows:  # a catalog written by an older version: absolute paths
        with sqlite3.connect(original / "memory.sqlite") as db:
            for block_id, tier, name in db.execute("SELECT id, tier, file FROM blocks").fetchall():
                path = (original / tier.lower() / name).resolve()
                db.execute("UPDATE blocks SET file = ? WHERE id = ?", (str(path), block_id))
    before = snapshot(original)
    shutil.copytree(original, tmp_path / "copy")
    copy = StoreKit(tmp_path / "copy")
    assert len(copy.store) == len(values)
    for key, value in values.items():
        assert same(copy.store.get(key), value), key
    for key in list(values)[::2]:
        copy.store.delete(key)
    copy.store.put("new", rand(3000, 99))
    copy.store.demote("new", "L6")
    copy.store.flush()
    copy.store.close()
    assert snapshot(original) == before


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_a_lost_catalog_is_rebuilt_from_the_block_files(tmp_path: Path, damage: str) -> None:
    kit = StoreKit(tmp_path / "data")
    values = fill(kit)
    kit.store.close()
    db = tmp_path / "data" / "memory.sqlite"
    for extra in ("-wal", "-shm"):
        db.with_name(db.name + extra).unlink(missing_ok=True)
    if damage == "deleted":
        db.unlink()
    else:
        db.write_bytes(b"")
    files = block_files(tmp_path / "data")
    reopened = StoreKit(tmp_path / "data")
    assert block_files(tmp_path / "data") == files
    assert quarantined(reopened, "file") == 0
    assert len(reopened.store) == len(values)
    for key, value in values.items():
        assert reopened.store.info(key)["priority"] == int(key.split("/")[1]) % 4
        assert same(reopened.store.get(key), value), key


def test_a_corrupt_catalog_stops_with_the_recovery_and_recover_rebuilds(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "data")
    values = fill(kit, 30)
    kit.store.close()
    db = tmp_path / "data" / "memory.sqlite"
    raw = db.read_bytes()
    db.write_bytes(raw[:100] + b"\x00garbage" * 64 + raw[612:])
    with pytest.raises(CatalogCorrupt) as err:
        StoreKit(tmp_path / "data")
    assert "vramancer memory recover" in err.value.message
    assert "\n" not in err.value.message
    seen: list[tuple[int, int]] = []
    report = rebuild(
        tmp_path / "data",
        {"L5": tmp_path / "data" / "l5", "L6": tmp_path / "data" / "l6"},
        fsync=False,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert report["blocks"] == len(values)
    assert seen and seen[-1][0] == seen[-1][1] == len(block_files(tmp_path / "data"))
    aside = Path(report["moved_aside"][0])
    assert aside.name.startswith("memory.sqlite.aside-") and aside.exists()
    reopened = StoreKit(tmp_path / "data")
    for key, value in values.items():
        assert same(reopened.store.get(key), value), key


def test_recover_refuses_while_a_store_has_the_directory_open(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "data")
    fill(kit, 2)
    with pytest.raises(Conflict):
        rebuild(tmp_path / "data", {"L5": tmp_path / "data" / "l5"}, fsync=False)
    assert (tmp_path / "data" / "memory.sqlite").exists()
    kit.store.close()
    assert DataDirLock.try_acquire(tmp_path / "data") is not None


def test_a_bad_row_is_quarantined_and_its_block_rebuilt_from_its_file(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "data")
    values = fill(kit, 6)
    kit.store.close()
    with sqlite3.connect(tmp_path / "data" / "memory.sqlite") as db:
        db.execute("UPDATE blocks SET shape = 'not json' WHERE id = 'blk/3'")
        db.execute("UPDATE blocks SET size = 'many' WHERE id = 'blk/4'")
    reopened = StoreKit(tmp_path / "data")
    for key, value in values.items():
        assert same(reopened.store.get(key), value), key
    assert quarantined(reopened, "row") == 2
    assert {i for i, _ in Catalog(tmp_path / "data" / "memory.sqlite").quarantined()} == {
        "blk/3",
        "blk/4",
    }


def test_an_edited_row_never_makes_delete_remove_another_file(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "data")
    kit.store.put("a", rand(2000, 1))
    kit.store.put("b", rand(2000, 2))
    kit.store.demote("a", "L5")
    kit.store.demote("b", "L5")
    kit.store.close()
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    with sqlite3.connect(tmp_path / "data" / "memory.sqlite") as db:
        (b_file,) = db.execute("SELECT file FROM blocks WHERE id = 'b'").fetchone()
        db.execute("UPDATE blocks SET file = ? WHERE id = 'a'", (str(victim),))
    store = kit.reopen()
    assert store.get("a") == rand(2000, 1)  # rebuilt from its own file
    store.delete("a")
    store.delete("b")
    assert victim.read_text() == "keep me"
    assert not (tmp_path / "data" / "l5" / b_file).exists()
    # a row naming another block's file is not that file's owner either
    store.put("c", rand(2000, 3))
    store.put("d", rand(2000, 4))
    store.demote("c", "L5")
    store.demote("d", "L5")
    store.close()
    with sqlite3.connect(tmp_path / "data" / "memory.sqlite") as db:
        (d_file,) = db.execute("SELECT file FROM blocks WHERE id = 'd'").fetchone()
        db.execute("UPDATE blocks SET file = ? WHERE id = 'c'", (d_file,))
    store = kit.reopen()
    store.delete("c")
    assert store.get("d") == rand(2000, 4)


def test_unreadable_files_are_quarantined_not_deleted(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "data")
    fill(kit, 3)
    l5 = tmp_path / "data" / "l5"
    junk = l5 / f"{id_digest('junk')}-00000000.blk"
    junk.write_bytes(b"not a block file")
    old = l5 / f"{id_digest('old')}-00000001.blk"
    old.write_bytes(struct.pack("<4sB8sBQQQ", b"VRMF", 1, b"none", 1, 3, 3, 0) + b"abc")
    foreign = l5 / "notes.txt"
    foreign.write_text("not ours")
    store = kit.reopen()
    assert len(store) == 3
    assert (l5 / "quarantine" / junk.name).read_bytes() == b"not a block file"
    assert (l5 / "quarantine" / old.name).exists()
    assert foreign.read_text() == "not ours"
    assert quarantined(kit, "file") == 2


def test_version_1_files_with_their_row_are_still_read(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "data")
    kit.store.put("v1", rand(3000, 7))
    kit.store.demote("v1", "L5")
    kit.store.close()
    (path,) = block_files(tmp_path / "data")
    header = read_block_header(path)
    payload = path.read_bytes()[blockfile.HEADER_SIZE :][: header.payload_size]
    digest = blockfile.checksum(payload)
    path.write_bytes(
        struct.pack("<4sB8sBQQQ", b"VRMF", 1, b"none", 1, len(payload), len(payload), digest)
        + payload
    )
    store = kit.reopen()
    assert store.get("v1") == rand(3000, 7)


def full_disk(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_on_put_is_insufficient_storage_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kit = StoreKit(tmp_path / "data", make_settings(l4=None))
    kit.store.put("k", rand(2000, 1))
    before = snapshot(tmp_path / "data" / "l5")
    monkeypatch.setattr(blockfile, "_sync", full_disk)
    monkeypatch.setattr(kit.store.settings, "fsync", True)
    with pytest.raises(InsufficientStorage) as err:
        kit.store.put("k", rand(2000, 2), durable=True)
    assert err.value.http_status == 507 and err.value.code == "insufficient_storage"
    with pytest.raises(InsufficientStorage):
        kit.store.put("other", rand(2000, 3), durable=True)
    monkeypatch.undo()
    assert snapshot(tmp_path / "data" / "l5") == before
    assert kit.store.get("k") == rand(2000, 1)
    assert "other" not in kit.store
    kit.check_invariants()
    assert kit.reopen().get("k") == rand(2000, 1)


class FullCatalog:
    """A SQLite connection whose writes fail as on a full disk."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, *args: Any) -> Any:
        if sql.startswith(("INSERT", "DELETE", "UPDATE")):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *args)

    def close(self) -> None:
        self.db.close()


def test_a_full_catalog_fails_the_put_and_still_deletes(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "data", make_settings(l4=None))
    kit.store.put("keep", rand(2000, 1))
    kit.store.put("gone", rand(2000, 2))
    catalog = kit.store._db()
    real = catalog._db
    catalog._db = FullCatalog(real)  # type: ignore[assignment]
    files = block_files(tmp_path / "data")
    with pytest.raises(InsufficientStorage):
        kit.store.put("new", rand(2000, 3))
    assert block_files(tmp_path / "data") == files  # the new file was removed again
    kit.store.delete("gone")
    assert "gone" not in kit.store
    assert len(block_files(tmp_path / "data")) == 1
    catalog._db = real
    kit.store.maintain()  # the postponed row goes now
    store = kit.reopen()
    assert "gone" not in store and store.get("keep") == rand(2000, 1)


def test_durable_put_lands_on_disk_and_survives_a_crash(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "data")
    receipt = kit.store.put_receipt("plain", rand(1000, 1))
    assert receipt.tier == "L4" and receipt.durable is False
    receipt = kit.store.put_receipt("safe", rand(1000, 2), durable=True)
    assert receipt.tier in {"L5", "L6"} and receipt.durable is True
    for _ in range(30):  # hot, but it stays on disk: a promotion would make it volatile
        assert kit.store.get("safe") == rand(1000, 2)
        kit.clock.advance(0.01)
    kit.store.run_pending()
    kit.store.promote("safe")
    assert kit.store.locate("safe") in {"L5", "L6"}
    with pytest.raises(Conflict):
        kit.store.promote("safe", "L4")
    # a crash: no close, no spill; a new store opens the same directory
    kit.crash()
    crashed = kit.new_store()
    assert crashed.get("safe") == rand(1000, 2)
    assert "plain" not in crashed
    for _ in range(30):
        crashed.get("safe")
    crashed.run_pending()
    assert crashed.locate("safe") in {"L5", "L6"}


def test_durable_puts_setting_and_no_disk_tier(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "data", make_settings(durable_puts=True))
    assert kit.store.put("d", rand(500, 1)) in {"L5", "L6"}
    assert kit.store.put("v", rand(500, 2), durable=False) == "L4"
    memory_only = StoreKit(tmp_path / "mem", make_settings(l5=None, l6=None))
    with pytest.raises(Conflict):
        memory_only.store.put("d", rand(500, 1), durable=True)


def test_files_and_directories_are_private(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "data", make_settings(l4=None))
    kit.store.put("a", rand(500, 1))
    kit.store.put("b", rand(500, 2))
    kit.store.demote("b", "L6")
    kit.store.flush()  # the old copy of "b" is unlinked in the background
    data = tmp_path / "data"
    for tier in ("l5", "l6"):
        assert stat.S_IMODE((data / tier).stat().st_mode) == 0o700
    for path in [*block_files(data), data / "memory.sqlite"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_write_block_file_leaves_nothing_on_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blockfile, "_sync", full_disk)
    large = rand(300 * KIB, 4)  # checksummed by the checksum thread while it is written
    monkeypatch.setattr(blockfile, "CHECKSUM_ASIDE_FROM", 256 * KIB)
    for atomic in (False, True):
        for payload in (b"abc", large):
            with pytest.raises(OSError) as err:
                write_block_file(
                    tmp_path / f"x{atomic}.blk",
                    payload,
                    codec="none",
                    raw_size=len(payload),
                    atomic=atomic,
                )
            assert err.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_never_fails_a_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vramancer.memory import backends

    kit = StoreKit(tmp_path / "data", make_settings(l4=4 * KIB, l5=64 * KIB))
    kit.store.put("b", rand(3 * KIB, 2))
    kit.store.demote("b", "L5")
    kit.store.put("a", rand(3 * KIB, 1))
    assert kit.store.locate("a") == "L4"
    tries: list[Path] = []

    def no_room(path: Path, *args: Any, **kwargs: Any) -> int:
        tries.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(backends, "write_block_file", no_room)
    for _ in range(20):
        assert kit.store.get("b") == rand(3 * KIB, 2)
        kit.clock.advance(0.01)
    kit.store.run_pending()
    assert tries, "no promotion tried to demote a block to the full disk"
    with pytest.raises(InsufficientStorage):  # room in L4 needs the full disk
        kit.store.put("c", rand(2 * KIB, 3))
    assert "c" not in kit.store
    kit.check_invariants()
    assert kit.store.get("a") == rand(3 * KIB, 1)
    assert kit.store.locate("b") == "L5"


def test_a_second_store_on_a_held_data_directory_is_refused_and_moves_nothing(
    tmp_path: Path,
) -> None:
    """Two stores on one directory would take each other's in-flight files for strays: the
    second is refused before it reconciles anything, and the first keeps its blocks."""
    kit = StoreKit(tmp_path / "data")
    kit.store.put("a", rand(1000, 1))
    kit.store.demote("a", "L6")
    tier_dir = tmp_path / "data" / "l6"
    in_flight = tier_dir / ".in-flight.tmp"  # what a put of the first store is writing
    in_flight.write_bytes(b"partial")
    before = sorted(p.name for p in tier_dir.iterdir())
    with pytest.raises(DataDirInUse, match="another VRAMancer process is using"):
        kit.new_store()
    assert sorted(p.name for p in tier_dir.iterdir()) == before
    assert kit.store.get("a") == rand(1000, 1)


def test_a_tier_directory_missing_for_one_start_loses_no_block(tmp_path: Path) -> None:
    """A disk mounted late or a mistyped path: the tier's directory is there but holds none of
    its files. Its rows stay in the catalog (a version 1 file has no other record), and the
    blocks are all back once the directory is."""
    kit = StoreKit(tmp_path / "data")
    for i in range(3):
        kit.store.put(f"b{i}", rand(1000, i))
        kit.store.demote(f"b{i}", "L6")
    kit.store.pin("b0")  # kept in its catalog row only: a rebuilt row would forget it
    kit.store.close()
    l6 = tmp_path / "data" / "l6"
    away = tmp_path / "l6-away"
    l6.rename(away)
    kit.store = kit.new_store()  # starts with an empty l6/
    assert all(f"b{i}" not in kit.store for i in range(3))
    kit.store.close()
    shutil.rmtree(l6)
    away.rename(l6)
    kit.store = kit.new_store()
    for i in range(3):
        assert kit.store.get(f"b{i}") == rand(1000, i)
    assert kit.store.info("b0")["pinned"] is True
    assert not (l6 / "quarantine").exists() or not any((l6 / "quarantine").iterdir())
