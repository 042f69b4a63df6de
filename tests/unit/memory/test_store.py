"""TieredStore on real files and SQLite: round trips, moves, pressure, pins, errors, restart."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.promtext import metric_value
from tests.unit.memory.store_support import StoreKit, make_settings
from vramancer.errors import Conflict, InsufficientMemory, InvalidInput, NotFound, ShuttingDown
from vramancer.memory.backends import FileBackend
from vramancer.memory.compression import (
    AdaptiveCompression,
    CompressionSettings,
    CorruptBlock,
    NoCompression,
)
from vramancer.memory.store import BlockTooLarge

KIB = 1024


@pytest.fixture
def kit(tmp_path: Path) -> StoreKit:
    return StoreKit(tmp_path / "data")


def rand(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def same(a: Any, b: Any) -> bool:
    if isinstance(a, bytes):
        return isinstance(b, bytes) and a == b
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.tobytes() == b.tobytes()
        )
    return (
        isinstance(b, torch.Tensor)
        and a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(
            a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8) if b.dim() else b
        )
    )


SAMPLES: dict[str, Any] = {
    "bytes-random": rand(5000, 1),
    "bytes-one": b"\x07",
    "bytes-zeros": bytes(20_000),
    "numpy-f32-3d": np.random.default_rng(2).standard_normal((4, 5, 6)).astype(np.float32),
    "numpy-bool": np.random.default_rng(3).integers(0, 2, 333).astype(bool),
    "numpy-0d": np.array(3.5, dtype=np.float64),
    "numpy-f16-compressible": np.zeros((64, 64), dtype=np.float16),
    "torch-bf16": torch.randn(33, 7).to(torch.bfloat16),
    "torch-i64": torch.arange(1000, dtype=torch.int64).reshape(10, 100),
    "torch-noncontiguous": torch.arange(64, dtype=torch.float32).reshape(8, 8).t(),
}


@pytest.mark.parametrize("manager", ["adaptive", "none"])
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip_at_every_tier(tmp_path: Path, name: str, manager: str) -> None:
    compression = AdaptiveCompression() if manager == "adaptive" else NoCompression()
    kit = StoreKit(tmp_path / "data", compression=compression)
    store = kit.store
    data = SAMPLES[name]
    expected = data.contiguous().clone() if isinstance(data, torch.Tensor) else data
    assert store.tiers == ["L4", "L5", "L6"]
    for tier in store.tiers:
        key = f"{name}/{tier}"
        assert store.put(key, data) == "L4"
        if tier != "L4":
            assert store.demote(key, tier) == tier
        assert store.locate(key) == tier
        got = store.get(key)
        assert same(expected, got), (name, tier)
    if manager == "none":
        assert store.info(f"{name}/L5")["compression"] == "none"
    kit.check_invariants()


def test_archive_always_compresses_and_l5_only_when_it_pays(tmp_path: Path) -> None:
    manager = AdaptiveCompression(CompressionSettings(min_bytes_per_s=1))  # the ratio decides
    kit = StoreKit(tmp_path / "data", compression=manager)
    store = kit.store
    store.put("zeros", bytes(60_000))
    store.put("noise", rand(60_000))
    store.demote("zeros", "L5")
    store.demote("noise", "L5")
    assert store.info("zeros")["compression"] != "none"
    assert store.info("noise")["compression"] == "none"
    store.demote("zeros", "L6")
    assert store.info("zeros")["compression"] != "none"
    l6 = next(t for t in store.stats()["tiers"] if t["name"] == "L6")
    assert l6["compression_ratio"] > 10
    assert store.get("zeros") == bytes(60_000)


def test_get_records_a_hit_and_promotes_one_tier(kit: StoreKit) -> None:
    store = kit.store
    store.put("a", rand(1000))
    store.demote("a", "L6")
    assert store.get("a") == rand(1000)
    assert store.locate("a") == "L5"
    assert store.get("a") == rand(1000)
    assert store.locate("a") == "L4"
    assert kit.kinds().count("block_promoted") == 2
    assert store.stats()["promotions"] == 2
    assert store.info("a")["hotness"] > 1.5


def test_put_under_pressure_cascades_and_never_exceeds(kit: StoreKit) -> None:
    store = kit.store
    blocks = {f"k{i}": rand(8 * KIB, i) for i in range(60)}
    for key, value in blocks.items():
        store.put(key, value)
        kit.check_invariants()
        kit.clock.advance(1.0)
    where = {store.locate(k) for k in blocks}
    assert where == {"L4", "L5", "L6"}
    for key, value in blocks.items():
        assert store.get(key) == value
        kit.check_invariants()
    assert "block_evicted" in kit.kinds()
    assert store.stats()["evictions"] > 0


def test_crossing_the_high_mark_evicts_down_to_the_low_mark(kit: StoreKit) -> None:
    store = kit.store  # L4: 64 KiB, high 90 %, low 75 %
    for i in range(7):
        store.put(f"b{i}", rand(8 * KIB, i))
    l4 = store.stats()["tiers"][0]
    assert l4["used_bytes"] == 56 * KIB  # 87.5 %: under the high mark, nothing moved
    store.put("b7", rand(8 * KIB, 7))  # 100 % > 90 %: cycle to <= 75 %
    l4 = store.stats()["tiers"][0]
    assert l4["used_bytes"] <= 0.75 * 64 * KIB
    assert store.stats()["evictions"] >= 2


def test_pinned_blocks_never_move(kit: StoreKit) -> None:
    store = kit.store
    store.put("pinned", rand(8 * KIB, 99))
    store.pin("pinned")
    for i in range(40):
        store.put(f"f{i}", rand(8 * KIB, i))
        assert store.locate("pinned") == "L4"
    store.evict()
    store.set_capacity("L4", 0)
    assert store.locate("pinned") == "L4"
    with pytest.raises(Conflict):
        store.demote("pinned")
    store.unpin("pinned")
    assert store.demote("pinned") == "L5"
    assert store.get("pinned") == rand(8 * KIB, 99)


def test_no_room_is_insufficient_memory_and_keeps_the_old_block(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "d", make_settings(l4=4 * KIB, l5=4 * KIB, l6=8 * KIB))
    store = kit.store
    store.put("old", rand(3000, 1))
    store.pin("old")
    for i in range(3):
        store.put(f"x{i}", rand(3000, 10 + i))
    with pytest.raises(InsufficientMemory) as err:
        store.put("x9", rand(3000, 20))
    assert err.value.details["requested_bytes"] == 3000
    with pytest.raises(InsufficientMemory):
        store.put("old", rand(4000, 2))  # replacement without room: the old block stays
    assert store.get("old") == rand(3000, 1)
    assert "x9" not in store
    kit.check_invariants()


@pytest.mark.parametrize("bad", ["", "a b", "x" * 257, "é", "a\nb", "a?b", None, 3])
def test_bad_ids_are_refused(kit: StoreKit, bad: Any) -> None:
    with pytest.raises(InvalidInput) as err:
        kit.store.put(bad, b"x")
    assert err.value.details["field"] == "id"


@pytest.mark.parametrize("priority", [-1, 1001, True, "3", 1.5])
def test_bad_priorities_are_refused(kit: StoreKit, priority: Any) -> None:
    with pytest.raises(InvalidInput) as err:
        kit.store.put("a", b"x", priority=priority)
    assert err.value.details["field"] == "priority"


def test_bad_data_is_refused(kit: StoreKit) -> None:
    store = kit.store
    with pytest.raises(InvalidInput, match="empty"):
        store.put("a", b"")
    with pytest.raises(InvalidInput, match="not list"):
        store.put("a", [1, 2])
    with pytest.raises(InvalidInput, match="cannot be stored"):
        store.put("a", np.array([object()], dtype=object))
    with pytest.raises(InvalidInput, match="hint"):
        store.put("a", b"x", hint="bad\x00hint")
    big = make_settings(max_block_size=1000)
    small = StoreKit(kit.data_dir.parent / "small", big).store
    with pytest.raises(BlockTooLarge) as err:
        small.put("a", bytes(1001))
    assert err.value.http_status == 413
    assert small.put("a", bytes(1000)) == "L4"
    assert len(store) == 0


def test_ids_with_slashes_colons_and_dots(kit: StoreKit) -> None:
    for block_id in ("model/layer.3/w:0", "kv/conv-1/page/7", "A_b.c", "x" * 256, "../etc"):
        kit.store.put(block_id, block_id.encode())
        kit.store.demote(block_id, "L6")
        assert kit.store.get(block_id) == block_id.encode()


def test_delete_removes_data_file_and_row(kit: StoreKit) -> None:
    store = kit.store
    store.put("gone", rand(2000))
    store.demote("gone", "L5")
    files = list((kit.data_dir / "l5").glob("*.blk"))
    assert len(files) == 1
    store.delete("gone")
    assert not files[0].exists()
    with pytest.raises(NotFound):
        store.get("gone")
    with pytest.raises(NotFound):
        store.delete("gone")
    assert "gone" not in kit.reopen()
    assert "block_deleted" in kit.kinds()


def test_numpy_and_bytes_from_the_hit_path_cannot_be_mutated(kit: StoreKit) -> None:
    arr = np.arange(10, dtype=np.int32)
    kit.store.put("arr", arr)
    arr[0] = 99  # the store kept its own copy
    got = kit.store.get("arr")
    assert got[0] == 0
    assert not got.flags.writeable
    with pytest.raises(ValueError):
        got.flags.writeable = True
    with pytest.raises(ValueError):
        got[1] = 5
    assert kit.store.get("arr")[1] == 1


def test_a_block_being_read_is_not_freed_under_the_reader(
    kit: StoreKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = kit.store
    store.put("r", rand(4000, 5))
    store.demote("r", "L5")
    path = next((kit.data_dir / "l5").glob("*.blk"))
    entered, release = threading.Event(), threading.Event()
    original = FileBackend.read

    def slow_read(self: FileBackend, handle: Any, layout: Any, block_id: str) -> Any:
        entered.set()
        assert release.wait(10)
        return original(self, handle, layout, block_id)

    monkeypatch.setattr(FileBackend, "read", slow_read)
    result: list[Any] = []
    reader = threading.Thread(target=lambda: result.append(store.get("r")))
    reader.start()
    assert entered.wait(10)
    store.delete("r")  # the reader holds the block: its file must survive until it is done
    assert path.exists()
    assert "r" not in store
    release.set()
    reader.join(10)
    assert result == [rand(4000, 5)]
    store.flush()
    assert not path.exists()
    kit.check_invariants()


def test_restart_recovers_every_block_on_disk(kit: StoreKit) -> None:
    store = kit.store
    values: dict[str, Any] = {
        "b5": rand(3000, 1),
        "b6": rand(3000, 2),
        "n6": np.arange(12, dtype=np.float64).reshape(3, 4),
        "t5": torch.randn(5, 5).to(torch.bfloat16),
    }
    for key, value in values.items():
        store.put(key, value, priority=7)
        store.demote(key, "L6" if key.endswith("6") else "L5")
    store.pin("b6")
    store.put("volatile", b"in L4 only")
    store = kit.reopen()
    assert "volatile" not in store  # L4 is volatile (spill_on_stop is off here)
    for key, value in values.items():
        assert store.locate(key) == ("L6" if key.endswith("6") else "L5")
        assert store.info(key)["priority"] == 7
        assert same(value, store.get(key))
    assert store.info("b6")["pinned"] is True
    kit.check_invariants()


def test_graceful_stop_spills_volatile_blocks(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "d", make_settings(spill_on_stop=True))
    kit.store.put("hot", rand(5000, 3))
    kit.store.pin("hot")
    store = kit.reopen()
    assert store.locate("hot") == "L5"
    assert store.info("hot")["pinned"] is True
    assert store.get("hot") == rand(5000, 3)


def test_restart_drops_rows_of_missing_files_and_quarantines_strays(kit: StoreKit) -> None:
    store = kit.store
    store.put("lost", rand(100, 1))
    store.put("kept", rand(100, 2))
    store.demote("lost", "L6")
    store.demote("kept", "L5")
    next((kit.data_dir / "l6").glob("*.blk")).unlink()
    stray = kit.data_dir / "l5" / "0123456789abcdef-00000000.blk"
    stray.write_bytes(b"junk")
    temp = kit.data_dir / "l6" / ".x.blk.1234.tmp"
    temp.write_bytes(b"half")
    store = kit.reopen()
    assert "lost" not in store
    assert store.get("kept") == rand(100, 2)
    assert not stray.exists() and not temp.exists()
    assert (kit.data_dir / "l5" / "quarantine" / stray.name).read_bytes() == b"junk"
    assert "block_lost" in kit.kinds()


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "empty"])
@pytest.mark.parametrize("tier", ["L5", "L6"])
def test_a_damaged_file_fails_that_block_only(kit: StoreKit, tier: str, damage: str) -> None:
    store = kit.store
    store.put("bad", bytes(30_000) + rand(2000))
    store.put("good", rand(3000, 4))
    store.demote("bad", tier)
    store.demote("good", tier)
    assert store.info("bad")["compression"] != "none" or tier == "L5"
    files = sorted((kit.data_dir / tier.lower()).glob("*.blk"), key=lambda p: -p.stat().st_size)
    path = files[0] if store.info("bad")["compression"] == "none" else _file_of(kit, "bad", tier)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-10] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "header":
        raw[0:4] = b"XXXX"
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptBlock) as err:
        store.get("bad")
    assert "'bad'" in err.value.message
    assert store.get("good") == rand(3000, 4)
    assert store.locate("bad") == tier  # a damaged block is not moved or dropped silently
    store.delete("bad")
    kit.check_invariants()


def _file_of(kit: StoreKit, block_id: str, tier: str) -> Path:
    import sqlite3

    with sqlite3.connect(kit.data_dir / "memory.sqlite") as db:
        (file,) = db.execute("SELECT file FROM blocks WHERE id = ?", (block_id,)).fetchone()
    return kit.data_dir / tier.lower() / file


def test_set_capacity_shrinks_without_losing_and_waits_for_pins(kit: StoreKit) -> None:
    store = kit.store
    values = {f"c{i}": rand(6 * KIB, i) for i in range(8)}
    for key, value in values.items():
        store.put(key, value)
    store.pin("c0")
    store.pin("c1")
    store.set_capacity("L4", 16 * KIB)
    l4 = store.stats()["tiers"][0]
    assert l4["used_bytes"] <= 16 * KIB
    assert store.capacity("L4") == 16 * KIB
    store.set_capacity("L4", 4 * KIB)  # two pinned 6 KiB blocks stay: effective 12 KiB
    assert store.capacity("L4") == 12 * KIB
    assert store.stats()["tiers"][0]["target_capacity_bytes"] == 4 * KIB
    assert {store.locate("c0"), store.locate("c1")} == {"L4"}
    store.unpin("c0")
    store.evict_cycle()
    assert store.capacity("L4") == 6 * KIB
    store.unpin("c1")
    store.evict_cycle()
    assert store.capacity("L4") == 4 * KIB
    for key, value in values.items():
        assert store.get(key) == value
    store.set_capacity("L4", 64 * KIB)
    assert store.capacity("L4") == 64 * KIB
    with pytest.raises(NotFound):
        store.set_capacity("L1", 10)
    with pytest.raises(InvalidInput):
        store.set_capacity("L4", -1)
    assert "tier_capacity_changed" in kit.kinds()
    kit.check_invariants()


def test_forced_eviction(kit: StoreKit) -> None:
    store = kit.store
    for i in range(6):
        store.put(f"e{i}", rand(8 * KIB, i))
    report = store.evict("L4", 10 * KIB)
    assert report["bytes"] >= 10 * KIB and report["moved"] == 2
    report = store.evict()
    assert store.stats()["tiers"][0]["used_bytes"] <= 0.75 * 64 * KIB
    with pytest.raises(InvalidInput):
        store.evict(None, 5)
    kit.check_invariants()


def test_explicit_promote_and_demote(kit: StoreKit) -> None:
    store = kit.store
    store.put("p", rand(1000))
    assert store.demote("p") == "L5"
    assert store.demote("p") == "L6"
    assert store.demote("p") == "L6"  # bottom: stays
    assert store.promote("p") == "L4"
    assert store.promote("p") == "L4"
    with pytest.raises(InvalidInput):
        store.promote("p", "L6")
    with pytest.raises(NotFound):
        store.promote("nope")
    events = kit.kinds()
    assert events.count("block_demoted") == 2 and events.count("block_promoted") == 1


def test_prefetch_hint_and_sequential_reads_promote_ahead(kit: StoreKit) -> None:
    store = kit.store
    for i in range(8):
        store.put(f"seq/{i}", rand(2000, i))
        store.demote(f"seq/{i}", "L6")
    assert store.prefetch(["seq/6", "seq/7", "unknown"]) == 2
    assert store.locate("seq/6") == "L4" and store.locate("seq/7") == "L4"
    for i in range(4):
        assert store.get(f"seq/{i}") == rand(2000, i)
        kit.clock.advance(0.01)
    store.run_pending()
    assert store.locate("seq/4") != "L6"  # predicted next block of the stream, moved ahead


def test_warmup_promotes_hot_blocks_where_there_is_room(kit: StoreKit) -> None:
    store = kit.store
    store.put("hot", rand(3000, 1))
    store.put("cold", rand(3000, 2))
    store.demote("hot", "L6")
    store.demote("cold", "L6")
    store.set_capacity("L5", 0)
    store.set_capacity("L4", 0)
    for _ in range(3):
        store.get("hot")  # no room above: stays in L6, but gets hot
    assert store.locate("hot") == "L6"
    store.set_capacity("L4", 64 * KIB)
    store.set_capacity("L5", 256 * KIB)
    assert store.warmup() == 1
    assert store.locate("hot") == "L4"
    assert store.locate("cold") == "L6"


def test_compress_cold_moves_cold_l4_blocks_to_l5(tmp_path: Path) -> None:
    # min_bytes_per_s=1: the choice rests on the ratio alone, not on this machine's speed
    manager = AdaptiveCompression(CompressionSettings(min_bytes_per_s=1))
    kit = StoreKit(tmp_path / "d", compression=manager)
    store = kit.store
    for i in range(4):
        store.put(f"z{i}", bytes(10_000))
    kit.clock.advance(600)
    store.get("z0")
    assert store.compress_cold(max_blocks=2) == 2
    assert store.compress_cold() == 1
    assert store.locate("z0") == "L4"
    moved = [f"z{i}" for i in range(1, 4)]
    assert {store.locate(k) for k in moved} == {"L5"}
    assert all(store.info(k)["compression"] != "none" for k in moved)
    assert store.get("z3") == bytes(10_000)


def test_metrics_follow_the_tiers(kit: StoreKit) -> None:
    store = kit.store
    for i in range(10):
        store.put(f"m{i}", rand(8 * KIB, i))
    store.get("m0")
    text = kit.metrics.render().decode()
    stats = {t["name"]: t for t in store.stats()["tiers"]}
    used = metric_value(text, "vramancer_memory_tier_used_bytes", tier="L4")
    assert used == stats["L4"]["used_bytes"]
    assert metric_value(text, "vramancer_memory_blocks", tier="L5") == stats["L5"]["blocks"]
    assert metric_value(text, "vramancer_memory_tier_capacity_bytes", tier="L6") is not None
    assert metric_value(text, "vramancer_memory_evictions_total", tier="L4") is not None
    assert metric_value(text, "vramancer_memory_bytes_moved_total", tier="L5") is not None
    assert metric_value(text, "vramancer_memory_compression_ratio", tier="L5") is not None


def test_not_open_is_shutting_down(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "d")
    kit.store.close()
    with pytest.raises(ShuttingDown):
        kit.store.put("a", b"x")


def test_threads_put_get_delete_evict_concurrently(kit: StoreKit) -> None:
    store = kit.store
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker(n: int) -> None:
        rng = np.random.default_rng(n)
        model: dict[str, bytes] = {}
        try:
            for step in range(150):
                key = f"w{n}/{int(rng.integers(0, 12))}"
                action = rng.integers(0, 4)
                if action == 0 or key not in model:
                    value = rng.integers(0, 256, int(rng.integers(1, 9000)), dtype=np.uint8)
                    store.put(key, value.tobytes())
                    model[key] = value.tobytes()
                elif action == 1:
                    store.delete(key)
                    del model[key]
                else:
                    assert store.get(key) == model[key], (key, step)
            for key, value in model.items():
                assert store.get(key) == value
        except BaseException as exc:
            errors.append(exc)

    def evictor() -> None:
        caps = [16 * KIB, 64 * KIB, 32 * KIB]
        i = 0
        while not stop.is_set():
            store.evict_cycle()
            store.set_capacity("L4", caps[i % 3])
            i += 1
            time.sleep(0.001)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    chaos = threading.Thread(target=evictor)
    chaos.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    chaos.join(10)
    assert not errors, errors
    kit.check_invariants()


async def test_start_runs_the_maintenance_loop_and_stop_spills(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "d", make_settings(spill_on_stop=True, eviction_interval_s=0.05))
    store = kit.store
    await store.start()  # open() already ran; start() keeps it and adds the loop
    for i in range(8):
        store.put(f"s{i}", rand(8 * KIB, i))  # passes the high mark: the loop is woken
    for _ in range(200):
        if store.stats()["tiers"][0]["used_bytes"] <= 0.75 * 64 * KIB:
            break
        await _sleep(0.02)
    assert store.stats()["tiers"][0]["used_bytes"] <= 0.75 * 64 * KIB
    await store.stop()
    reopened = kit.new_store()
    assert all(reopened.locate(f"s{i}") in ("L5", "L6") for i in range(8))
    assert reopened.get("s7") == rand(8 * KIB, 7)


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def test_fsync_mode_round_trip(tmp_path: Path) -> None:
    kit = StoreKit(tmp_path / "d", make_settings(fsync=True))
    kit.store.put("f", rand(1000))
    kit.store.demote("f", "L6")
    assert kit.reopen().get("f") == rand(1000)
    assert os.path.exists(kit.data_dir / "memory.sqlite")
