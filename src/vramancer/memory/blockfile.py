"""Block files of L5 and L6: a small header, then the (possibly compressed) payload.

The payload is checked with xxh3-64 (about 20 GB/s), not zlib's CRC32: that runs at about
1.2 GB/s on a typical server core, slower than reading a file from the page cache (6+ GB/s) —
a 16 MiB block would spend more time in the checksum than in the read. Block files keep the
payload at a fixed offset (so an uncompressed L5 file is memory-mappable as it is), and are
written header-then-payload without concatenating them; a payload of ``CHECKSUM_ASIDE_FROM``
bytes or more is checksummed by a helper thread while it is written, its header written last.
A damaged file raises :class:`~vramancer.memory.compression.CorruptBlock` naming the block, so
only that block is affected.

Format, version 2 (little-endian)::

    magic "VRMF" | version u8 | codec 8 bytes NUL-padded | itemsize u8 | raw size u64
    | payload size u64 | payload xxh3-64 u64 | record size u32 | record xxh3-64 u64
    payload
    record: UTF-8 JSON object describing the block (id, size, kind, dtype, shape, itemsize,
            priority, hint, written, created)

The record lets the catalog be rebuilt from the block files alone (a lost, corrupt or moved
``memory.sqlite``, a copied data directory). Version 1 files (the same header without the two
record fields, no record) are still read; they cannot be rebuilt without their catalog row.
Version 3 is version 2 with the payload at offset 4096 (zeros in between), written for
payloads of 64 KiB or more so that the payload is page-aligned; version 2 is still written for
smaller payloads and read as before.
Files are created ``0600``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from vramancer.files import FILE_MODE, fsync_dir, start_writeback
from vramancer.memory.compression import CorruptBlock

_MAGIC = b"VRMF"
_VERSION = 2
#: Version 3: version 2's header, zeros up to ``PAYLOAD_ALIGN``, then the payload (written for
#: payloads of ``ALIGN_FROM`` bytes or more: a page-aligned payload is written and read at
#: page-cache speed; one at offset 50 costs about a quarter more to write).
_ALIGNED = 3
PAYLOAD_ALIGN = 4096
ALIGN_FROM = 64 * 1024
#: magic, version, codec (8 bytes, NUL padded), itemsize, raw size, payload size, xxh3-64
_HEADER_V1 = struct.Struct("<4sB8sBQQQ")
#: version 2 adds the record's size and xxh3-64
_HEADER = struct.Struct("<4sB8sBQQQIQ")
HEADER_SIZE = _HEADER.size
V1_HEADER_SIZE = _HEADER_V1.size
#: Largest record accepted when reading (a record is a few hundred bytes).
MAX_RECORD = 64 * 1024


@dataclass(frozen=True, slots=True)
class BlockFile:
    """What a block file holds, as read back and verified."""

    codec: str
    itemsize: int
    raw_size: int
    payload: bytes | bytearray


@dataclass(frozen=True, slots=True)
class BlockHeader:
    """A block file's header and record, read without its payload (for rebuilding a catalog).

    ``record`` is None for a version 1 file."""

    version: int
    codec: str
    itemsize: int
    raw_size: int
    payload_size: int
    file_size: int
    record: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class PayloadRegion:
    """Where a block file's payload lies, from its header (not verified: a reader checks the
    bytes against ``checksum``)."""

    offset: int
    length: int
    codec: str
    itemsize: int
    raw_size: int
    checksum: int


def payload_region(fd: int, what: str) -> PayloadRegion:
    """The payload's place in the open block file ``fd``; ``CorruptBlock`` for a bad header."""
    head = os.pread(fd, HEADER_SIZE, 0)
    if len(head) < V1_HEADER_SIZE or head[:4] != _MAGIC:
        raise CorruptBlock(f"{what}: not a VRAMancer block file")
    if head[4] == 1:
        _, _, codec, itemsize, raw, length, digest = _HEADER_V1.unpack(head[:V1_HEADER_SIZE])
        offset = V1_HEADER_SIZE
    elif head[4] in (_VERSION, _ALIGNED) and len(head) == HEADER_SIZE:
        _, _, codec, itemsize, raw, length, digest, _, _ = _HEADER.unpack(head)
        offset = HEADER_SIZE if head[4] == _VERSION else PAYLOAD_ALIGN
    else:
        raise CorruptBlock(f"{what}: not a VRAMancer block file")
    return PayloadRegion(offset, length, _codec(codec), itemsize, raw, digest)


def checksum(data: bytes | bytearray | memoryview) -> int:
    """xxh3-64 of ``data``."""
    return int(xxhash.xxh3_64_intdigest(data))


def write_block_file(
    path: Path,
    payload: bytes | bytearray | memoryview,
    *,
    codec: str,
    raw_size: int,
    itemsize: int = 1,
    fsync: bool = True,
    atomic: bool = False,
    record: Mapping[str, Any] | None = None,
    sync_dir: bool = False,
    deferred: bool = False,
) -> int:
    """Write a block file at ``path`` (which must not exist); returns its size in bytes.

    ``atomic``: write a temporary file beside it, fsync, rename over ``path``, fsync the
    directory — a reader (or a restart) sees the whole old file or the whole new one.
    ``record``: what the file says about its block (JSON), so a catalog can be rebuilt from it.
    ``sync_dir``: also fsync the directory of a non-atomic file (its name is then durable).
    ``deferred``: the caller makes the file durable later, with the other files of a batch
    (:func:`sync_file` for each, then one fsync of the directory): no directory fsync here and,
    for a non-atomic file, no fdatasync either, writeback of the whole file is only started (an
    atomic file is still fsynced before its rename).
    Any failure (a full disk included) removes what was written and raises.
    """
    view = memoryview(payload).cast("B")
    tail = json.dumps(dict(record or {}), separators=(",", ":")).encode() if record else b""
    aligned = view.nbytes >= ALIGN_FROM
    offset = PAYLOAD_ALIGN if aligned else HEADER_SIZE
    fields = (codec, itemsize, raw_size, view.nbytes, tail)
    # A large payload is checksummed by another thread while this one writes it (the hash
    # holds the GIL, the writes do not); the header goes in last, at offset 0.
    aside = _checksum_aside(view)
    target = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp") if atomic else path
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            if aside is None:
                _write_all(fd, memoryview(_header(aligned, checksum(view), *fields, offset)))
            else:
                os.lseek(fd, offset, os.SEEK_SET)
            _write_payload(fd, view, offset, fsync)
            if tail:
                _write_all(fd, memoryview(tail))
            if aside is not None:
                _pwrite_all(fd, memoryview(_header(aligned, aside.result(), *fields, offset)))
            if fsync and deferred and not atomic:
                start_writeback(fd, 0, 0)  # to the end of the file; fdatasync'd by the batch
            elif fsync:
                _sync(fd)
        finally:
            os.close(fd)
        if atomic:
            os.replace(target, path)
        if fsync and (atomic or sync_dir) and not deferred:
            fsync_dir(path.parent)
    except BaseException:
        if aside is not None and not aside.cancel():
            concurrent.futures.wait([aside])  # nothing of ours reads the payload after this
        with contextlib.suppress(OSError):
            target.unlink()
        raise
    return offset + view.nbytes + len(tail)


def _header(
    aligned: bool,
    digest: int,
    codec: str,
    itemsize: int,
    raw_size: int,
    nbytes: int,
    tail: bytes,
    offset: int,
) -> bytes:
    """The header of a block file, zero-padded to ``offset`` (where its payload starts)."""
    return _HEADER.pack(
        _MAGIC,
        _ALIGNED if aligned else _VERSION,
        codec.encode().ljust(8, b"\0"),
        itemsize,
        raw_size,
        nbytes,
        digest,
        len(tail),
        checksum(tail),
    ).ljust(offset, b"\0")


#: Payloads of this size or more are checksummed by a helper thread while they are written.
CHECKSUM_ASIDE_FROM = 1024 * 1024
#: The checksum thread by process id (a forked child starts its own).
_hashers: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def _checksum_aside(view: memoryview) -> concurrent.futures.Future[int] | None:
    """The payload's checksum, computed by the checksum thread; None for a small payload, or
    when no thread can start (the interpreter is exiting): the caller checksums it inline."""
    if view.nbytes < CHECKSUM_ASIDE_FROM:
        return None
    try:
        return _hasher().submit(checksum, view)
    except RuntimeError:
        return None


def _hasher() -> concurrent.futures.ThreadPoolExecutor:
    pid = os.getpid()
    pool = _hashers.get(pid)
    if pool is None:
        _hashers.clear()
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vramancer-checksum")
        _hashers[pid] = pool
    return pool


#: Payloads are written in pieces of this size; with fsync, the kernel is told to start
#: writing each piece to the device once the next one is written (``sync_file_range``), so
#: the device works while the later pieces are copied, and the final fdatasync waits for
#: little more than the last piece.
WRITE_PIECE = 4 * 1024 * 1024


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:
        done = os.write(fd, data)
        data = data[done:]


def _pwrite_all(fd: int, data: memoryview, offset: int = 0) -> None:
    while data.nbytes:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done


def _write_payload(fd: int, view: memoryview, offset: int, fsync: bool) -> None:
    """Write ``view`` (after the header, at ``offset``) piece by piece.

    With ``fsync``, writeback of what is written so far starts before each new piece, never
    for the last piece: the record goes right after it, and writing into a page under
    writeback would wait for the device.
    """
    if view.nbytes <= WRITE_PIECE:
        _write_all(fd, view)
        return
    flushed = offset  # writeback started for the file's bytes from here to this offset
    end = offset
    for start in range(0, view.nbytes, WRITE_PIECE):
        if fsync and start > 0:
            start_writeback(fd, flushed, end - flushed)
            flushed = end
        piece = view[start : start + WRITE_PIECE]
        _write_all(fd, piece)
        end += piece.nbytes


def read_block_header(path: Path) -> BlockHeader:
    """The header and record of a block file, checked (magic, sizes, record checksum) without
    reading the payload. Raises ``CorruptBlock`` for a file that is not a whole block file."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(HEADER_SIZE)
        if len(head) < V1_HEADER_SIZE or head[:4] != _MAGIC:
            raise CorruptBlock(f"{path.name}: not a VRAMancer block file")
        version = head[4]
        if version == 1:
            _, _, codec, itemsize, raw, length, _ = _HEADER_V1.unpack(head[:V1_HEADER_SIZE])
            if size != V1_HEADER_SIZE + length:
                raise CorruptBlock(f"{path.name}: truncated or padded")
            return BlockHeader(1, _codec(codec), itemsize, raw, length, size, None)
        if version not in (_VERSION, _ALIGNED) or len(head) < HEADER_SIZE:
            raise CorruptBlock(f"{path.name}: unknown block file version {version}")
        _, _, codec, itemsize, raw, length, _, rlen, rsum = _HEADER.unpack(head)
        start = HEADER_SIZE if version == _VERSION else PAYLOAD_ALIGN
        if rlen > MAX_RECORD or size != start + length + rlen:
            raise CorruptBlock(f"{path.name}: truncated or padded")
        fh.seek(start + length)
        tail = fh.read(rlen)
    if checksum(tail) != rsum:
        raise CorruptBlock(f"{path.name}: its record fails its checksum")
    try:
        record = json.loads(tail) if tail else None
    except ValueError:
        raise CorruptBlock(f"{path.name}: its record is not JSON") from None
    if record is not None and not isinstance(record, dict):
        raise CorruptBlock(f"{path.name}: its record is not a JSON object")
    return BlockHeader(version, _codec(codec), itemsize, raw, length, size, record)


def _codec(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode(errors="replace")


def read_block_file(path: Path, what: str, *, writable: bool = False) -> BlockFile:
    """Read and verify a block file; raise ``CorruptBlock`` naming ``what``.

    The payload is read with one ``pread`` into the object returned (one copy from the page
    cache, as a plain read of the file makes; a map of the file costed more than the copy it
    saves), then its checksum is verified. ``writable``: a ``bytearray`` (torch wants a
    writable buffer).
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CorruptBlock(f"{what}: its file {path.name} is missing") from None
    try:
        size = os.fstat(fd).st_size
        if size < V1_HEADER_SIZE:
            raise CorruptBlock(f"{what}: stored data is truncated (no header)")
        head = _pread_exact(fd, min(size, HEADER_SIZE), 0, what)
        start, codec, itemsize, raw, length, digest, tail, tail_sum = _unpack(head, size, what)
        if size - start - tail != length:
            raise CorruptBlock(
                f"{what}: stored data is truncated or padded "
                f"({max(0, size - start - tail)} of {length} bytes)"
            )
        if tail and checksum(_pread_exact(fd, tail, start + length, what)) != tail_sum:
            raise CorruptBlock(f"{what}: its record fails its checksum, the file is corrupted")
        payload: bytes | bytearray
        if writable:
            payload = bytearray(length)
            _preadinto_exact(fd, payload, start, what)
        else:
            payload = _pread_exact(fd, length, start, what)
    finally:
        os.close(fd)
    if checksum(payload) != digest:
        raise CorruptBlock(f"{what}: checksum mismatch, the stored data is corrupted")
    return BlockFile(_codec(codec), itemsize, raw, payload)


def _pread_exact(fd: int, n: int, offset: int, what: str) -> bytes:
    """``n`` bytes at ``offset`` (one ``pread`` unless the kernel returns fewer)."""
    data = os.pread(fd, n, offset)
    if len(data) == n:
        return data
    buffer = bytearray(n)
    _preadinto_exact(fd, buffer, offset, what)
    return bytes(buffer)


def _preadinto_exact(fd: int, buffer: bytearray, offset: int, what: str) -> None:
    """Fill ``buffer`` from ``offset``; ``CorruptBlock`` naming ``what`` if the file ends
    first."""
    with memoryview(buffer) as view:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise CorruptBlock(f"{what}: stored data is truncated (the file ended early)")
            done += got


def _unpack(head: bytes, size: int, what: str) -> tuple[int, bytes, int, int, int, int, int, int]:
    """(payload offset, codec, itemsize, raw size, payload size, checksum, record size, record
    checksum) from the first ``HEADER_SIZE`` bytes of a file of ``size`` bytes."""
    if head[:4] != _MAGIC:
        raise CorruptBlock(f"{what}: not a VRAMancer block file")
    version = head[4]
    if version == 1:
        _, _, codec, itemsize, raw, length, digest = _HEADER_V1.unpack(head[:V1_HEADER_SIZE])
        return V1_HEADER_SIZE, codec, itemsize, raw, length, digest, 0, 0
    if version not in (_VERSION, _ALIGNED) or size < HEADER_SIZE:
        raise CorruptBlock(f"{what}: not a VRAMancer block file")
    _, _, codec, itemsize, raw, length, digest, tail, tail_sum = _HEADER.unpack(head[:HEADER_SIZE])
    start = HEADER_SIZE if version == _VERSION else PAYLOAD_ALIGN
    return start, codec, itemsize, raw, length, digest, tail, tail_sum


def sync_file(path: Path) -> None:
    """fdatasync the file at ``path`` (any descriptor of a file flushes all its data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        _sync(fd)
    finally:
        os.close(fd)


def _sync(fd: int) -> None:
    """fdatasync where the OS has it (the data and the size; not the access times)."""
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - macOS, Windows
        os.fsync(fd)
