"""Block files of L5 and L6: a small header, then the (possibly compressed) payload.

The payload is checked with xxh3-64 (about 20 GB/s), not zlib's CRC32: that runs at about
1.2 GB/s on a typical server core, slower than reading a file from the page cache (6+ GB/s) —
a 16 MiB block would spend more time in the checksum than in the read. Block files keep the
payload at a fixed offset (so an uncompressed L5 file is memory-mappable as it is), and are
written header-then-payload without concatenating them. A damaged file raises
:class:`~vramancer.memory.compression.CorruptBlock` naming the block, so only that block is
affected.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path

import xxhash

from vramancer.memory.compression import CorruptBlock

_MAGIC = b"VRMF"
_VERSION = 1
#: magic, version, codec (8 bytes, NUL padded), itemsize, raw size, payload size, xxh3-64
_HEADER = struct.Struct("<4sB8sBQQQ")
HEADER_SIZE = _HEADER.size


@dataclass(frozen=True, slots=True)
class BlockFile:
    """What a block file holds, as read back and verified."""

    codec: str
    itemsize: int
    raw_size: int
    payload: bytes | bytearray


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
) -> int:
    """Write a block file at ``path``; returns its size in bytes.

    ``atomic``: write a temporary file beside it, fsync, rename over ``path``, fsync the
    directory — a reader (or a restart) sees the whole old file or the whole new one.
    """
    view = memoryview(payload).cast("B")
    header = _HEADER.pack(
        _MAGIC,
        _VERSION,
        codec.encode().ljust(8, b"\0"),
        itemsize,
        raw_size,
        view.nbytes,
        checksum(view),
    )
    target = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp") if atomic else path
    try:
        with open(target, "wb") as fh:
            fh.write(header)
            fh.write(view)
            fh.flush()
            if fsync:
                _sync(fh.fileno())
        if atomic:
            os.replace(target, path)
            if fsync:
                _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            target.unlink()
        raise
    return HEADER_SIZE + view.nbytes


def read_block_file(path: Path, what: str, *, writable: bool = False) -> BlockFile:
    """Read and verify a block file (memory-mapped); raise ``CorruptBlock`` naming ``what``.

    ``writable``: return the payload as a ``bytearray`` (torch wants a writable buffer).
    """
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed below, after the map
    except FileNotFoundError:
        raise CorruptBlock(f"{what}: its file {path.name} is missing") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size < HEADER_SIZE:
            raise CorruptBlock(f"{what}: stored data is truncated (no header)")
        with _map(fh.fileno()) as mm:
            magic, version, codec, itemsize, raw, length, digest = _HEADER.unpack(mm[:HEADER_SIZE])
            if magic != _MAGIC or version != _VERSION:
                raise CorruptBlock(f"{what}: not a VRAMancer block file")
            if size - HEADER_SIZE != length:
                raise CorruptBlock(
                    f"{what}: stored data is truncated or padded "
                    f"({size - HEADER_SIZE} of {length} bytes)"
                )
            payload: bytes | bytearray
            if writable:
                payload = bytearray(length)
                with memoryview(mm) as whole, whole[HEADER_SIZE:] as body:
                    payload[:] = body
            else:
                payload = mm[HEADER_SIZE:]
    if checksum(payload) != digest:
        raise CorruptBlock(f"{what}: checksum mismatch, the stored data is corrupted")
    return BlockFile(codec.rstrip(b"\0").decode(errors="replace"), itemsize, raw, payload)


#: Pre-fault the whole mapping in one call (Linux): a 16 MiB block is read at page-cache speed
#: instead of taking 4096 page faults one by one.
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _map(fd: int) -> mmap.mmap:
    if _POPULATE and hasattr(mmap, "MAP_SHARED"):
        return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
    return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)


def _sync(fd: int) -> None:
    """fdatasync where the OS has it (the data and the size; not the access times)."""
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # pragma: no cover - macOS, Windows
        os.fsync(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
