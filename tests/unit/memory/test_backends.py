"""Block files, data layouts, file backends and the local fastpath."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.promtext import metric_value
from vramancer.errors import InvalidInput, NotFound
from vramancer.memory import blockfile
from vramancer.memory.backends import (
    ANY_BYTES,
    DataKind,
    FileBackend,
    HostBackend,
    LayoutTable,
    describe,
    from_raw,
    raw_view,
)
from vramancer.memory.blockfile import HEADER_SIZE, read_block_file, write_block_file
from vramancer.memory.compression import CorruptBlock, NoCompression
from vramancer.memory.fastpath import FastInterface, LocalCopyInterface
from vramancer.observability.metrics import Metrics


@pytest.mark.parametrize("atomic", [False, True])
def test_block_file_round_trip(tmp_path: Path, atomic: bool) -> None:
    path = tmp_path / "a.blk"
    size = write_block_file(path, b"hello world", codec="none", raw_size=11, atomic=atomic)
    assert size == HEADER_SIZE + 11 == path.stat().st_size
    block = read_block_file(path, "block 'a'")
    assert (block.codec, block.raw_size, block.itemsize, block.payload) == (
        "none",
        11,
        1,
        b"hello world",
    )
    assert read_block_file(path, "x", writable=True).payload == bytearray(b"hello world")
    assert [p.name for p in tmp_path.iterdir()] == ["a.blk"]  # no temporary file left


@pytest.mark.parametrize("aside", [False, True], ids=["checksum-inline", "checksum-aside"])
def test_a_large_payload_is_written_in_pieces_with_early_writeback_and_reads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, aside: bool
) -> None:
    """Over ``WRITE_PIECE`` the payload is written piece by piece, the writeback of the
    payload written so far started before each new piece (never for the last one, which the
    record follows); the file is the same as a write without fsync, and the same whether the
    payload is checksummed before it is written or by the checksum thread while it is (the
    header then written last)."""
    monkeypatch.setattr(blockfile, "CHECKSUM_ASIDE_FROM", 0 if aside else 1 << 40)
    started: list[tuple[int, int]] = []
    real = blockfile.start_writeback

    def spy(fd: int, offset: int, length: int) -> None:
        started.append((offset, length))
        real(fd, offset, length)

    monkeypatch.setattr(blockfile, "WRITE_PIECE", 64 * 1024)
    monkeypatch.setattr(blockfile, "start_writeback", spy)
    payload = np.random.default_rng(3).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    path = tmp_path / "big.blk"
    size = write_block_file(
        path, payload, codec="none", raw_size=len(payload), record={"id": "big"}
    )
    assert size == path.stat().st_size
    assert read_block_file(path, "block 'big'").payload == payload
    piece, at = 64 * 1024, blockfile.PAYLOAD_ALIGN  # a large payload starts on a page
    assert path.read_bytes()[4] == 3 and size == at + len(payload) + len(b'{"id":"big"}')
    assert started == [(at, piece), (at + piece, piece), (at + 2 * piece, piece)]
    # without fsync nothing is pushed to the device early, and the file is the same
    started.clear()
    again = tmp_path / "again.blk"
    write_block_file(
        again, payload, codec="none", raw_size=len(payload), record={"id": "big"}, fsync=False
    )
    assert started == [] and again.read_bytes() == path.read_bytes()
    monkeypatch.setattr(blockfile, "CHECKSUM_ASIDE_FROM", 1 << 40 if aside else 0)
    other = tmp_path / "other.blk"
    write_block_file(other, payload, codec="none", raw_size=len(payload), record={"id": "big"})
    assert other.read_bytes() == path.read_bytes()
    # a damaged piece is caught by the header's checksum
    data = bytearray(path.read_bytes())
    data[at + 150_000] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlock, match="checksum mismatch"):
        read_block_file(path, "block 'big'")


def test_block_files_of_the_unaligned_format_still_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files written before payloads were page-aligned (version 2: payload right after the
    header, whatever its size) read as before; small payloads are still written that way."""
    payload = bytes(range(256)) * 1024  # 256 KiB
    monkeypatch.setattr(blockfile, "ALIGN_FROM", 1 << 40)  # how every file was written before
    old = tmp_path / "old.blk"
    size = write_block_file(old, payload, codec="none", raw_size=len(payload), record={"id": "o"})
    assert old.read_bytes()[4] == 2 and size == HEADER_SIZE + len(payload) + len(b'{"id":"o"}')
    monkeypatch.undo()
    assert read_block_file(old, "block 'o'").payload == payload
    header = blockfile.read_block_header(old)
    assert (header.version, header.payload_size, header.record) == (2, len(payload), {"id": "o"})
    new = tmp_path / "new.blk"
    write_block_file(new, payload, codec="none", raw_size=len(payload), record={"id": "o"})
    header = blockfile.read_block_header(new)
    assert (header.version, header.payload_size, header.record) == (3, len(payload), {"id": "o"})
    assert new.read_bytes()[blockfile.PAYLOAD_ALIGN :][: len(payload)] == payload
    small = tmp_path / "small.blk"
    write_block_file(small, b"x" * 1000, codec="none", raw_size=1000)
    assert small.read_bytes()[4] == 2 and small.stat().st_size == HEADER_SIZE + 1000


def test_block_file_damage_is_reported_by_name(tmp_path: Path) -> None:
    path = tmp_path / "b.blk"
    write_block_file(path, bytes(range(200)), codec="zstd", raw_size=500, itemsize=2)
    data = path.read_bytes()
    cases = [
        ("truncated (no header)", data[:10]),
        ("truncated or padded", data[:-1]),
        ("truncated or padded", data + b"\0"),
        ("not a VRAMancer block file", b"NOPE" + data[4:]),
        ("not a VRAMancer block file", data[:4] + bytes([9]) + data[5:]),  # version 9
        ("checksum mismatch", data[:-1] + bytes([data[-1] ^ 1])),
    ]
    for message, damaged in cases:
        path.write_bytes(damaged)
        with pytest.raises(CorruptBlock, match=re.escape(message)) as err:
            read_block_file(path, "block 'b'")
        assert err.value.message.startswith("block 'b'")
    path.unlink()
    with pytest.raises(CorruptBlock, match="missing"):
        read_block_file(path, "block 'b'")


def test_describe_layouts_and_rebuild() -> None:
    layout, value = describe(bytearray(b"abc"))
    assert (layout.kind, layout.nbytes, value) == (DataKind.BYTES, 3, b"abc")
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    layout, _ = describe(arr)
    assert (layout.kind, layout.dtype, layout.shape, layout.itemsize) == (
        DataKind.NUMPY,
        ">i4",
        (2, 3),
        4,
    )
    back = from_raw(layout, bytes(raw_view(layout, arr)))
    assert back.dtype == arr.dtype and (back == arr).all() and not back.flags.writeable
    t = torch.arange(12, dtype=torch.float16).reshape(3, 4)
    layout, _ = describe(t)
    assert (layout.kind, layout.dtype, layout.nbytes) == (DataKind.TORCH, "float16", 24)
    assert torch.equal(from_raw(layout, bytes(raw_view(layout, t))), t)
    with pytest.raises(CorruptBlock, match="expected 24"):
        from_raw(layout, b"short")
    with pytest.raises(InvalidInput):
        describe("text")
    with pytest.raises(InvalidInput):
        describe(np.zeros(2, dtype=[("a", "i4"), ("b", "f4")]))


def test_host_backend_copies_what_it_does_not_own() -> None:
    backend = HostBackend()
    arr = np.ones(4)
    layout, _ = describe(arr)
    stored = backend.write("a", layout, arr, owned=False, hint=None)
    arr[0] = 7
    assert stored[0] == 1 and not stored.flags.writeable
    t = torch.ones(3)
    tl, _ = describe(t)
    kept = backend.write("t", tl, t, owned=False, hint=None)
    t[0] = 5
    assert kept[0] == 1
    assert backend.stored_bytes(kept) == 12 and backend.codec(kept) == "none"


def test_file_backend_stores_raw_without_compression(tmp_path: Path) -> None:
    backend = FileBackend(
        tmp_path,
        compression=NoCompression(),
        decoder=NoCompression(),
        always_compress=False,
        atomic=False,
        fsync=False,
    )
    layout, value = describe(bytes(50_000))
    handle = backend.write("z", layout, value, owned=False, hint=None)
    assert handle.codec == "none" and handle.stored_size == HEADER_SIZE + 50_000
    assert backend.read(handle, layout, "z") == bytes(50_000)
    backend.free(handle)
    backend.free(handle)  # idempotent
    assert not handle.path.exists()


def test_local_fastpath_copies_and_measures() -> None:
    metrics = Metrics(node="t")
    link = LocalCopyInterface(metrics)
    assert isinstance(link, FastInterface)
    buf = bytearray(b"payload")
    assert link.send("blk", buf) == 7
    buf[0] = 0
    assert link.recv("blk") == b"payload"
    with pytest.raises(NotFound):
        link.recv("blk")
    text = metrics.render().decode()
    name = "vramancer_fastpath_interface_latency_seconds_count"
    assert metric_value(text, name, interface="local") == 2


def test_layout_table_shares_one_layout_per_shape_and_one_for_all_bytes() -> None:
    table = LayoutTable(max_entries=3)
    a, _ = describe(np.zeros((4, 5), dtype=np.float32))
    b, _ = describe(np.ones((4, 5), dtype=np.float32))
    assert a is not b and a == b
    assert table.share(a) is a and table.share(b) is a
    assert table.share(describe(np.zeros(20, dtype=np.float32))[0]) is not a  # other shape
    short, _ = describe(b"abc")
    assert table.share(short) is ANY_BYTES and table.share(describe(bytes(9))[0]) is ANY_BYTES
    assert table.full(ANY_BYTES, 3) == short
    assert table.full(a, 80) is a
    assert len(table) == 2
    for n in range(3, 6):  # past max_entries it starts over: bounded, still correct
        table.share(describe(np.zeros(n, dtype=np.int8))[0])
    assert len(table) <= 3
    assert table.share(b) == a


def test_a_large_payload_is_checksummed_inline_when_no_thread_can_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At interpreter exit (a store closed from an ``atexit`` handler) no thread starts: the
    file is written all the same, checksummed before its payload."""

    class Exiting:
        def submit(self, *_: object) -> None:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    monkeypatch.setattr(blockfile, "CHECKSUM_ASIDE_FROM", 0)
    monkeypatch.setattr(blockfile, "_hasher", Exiting)
    payload = np.random.default_rng(5).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    path = tmp_path / "late.blk"
    write_block_file(path, payload, codec="none", raw_size=len(payload), record={"id": "late"})
    assert read_block_file(path, "block 'late'").payload == payload
