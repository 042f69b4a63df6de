"""Block compression (seed 000 ``CompressionManager.compress(data, hint)``).

INTERFACE SKELETON — the adaptive, dtype-aware, multi-threaded manager is issue 3's work.
The store uses exactly this surface: ``compress``/``decompress`` and the framed file format
``encode_frame``/``decode_frame`` (header + checksum, so a corrupted archive file is reported
as corrupted for that block only).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Protocol

from vramancer.errors import VramancerError


class CorruptBlock(VramancerError):
    """Stored bytes of a block fail their checksum or cannot be decoded."""

    code = "corrupt_block"
    http_status = 500


@dataclass(frozen=True, slots=True)
class Compressed:
    codec: str  # "none" | "zstd" | "lz4" | "gzip"
    payload: bytes
    raw_size: int
    #: Byte-plane shuffle applied before the codec, with this element size (1: none).
    itemsize: int = 1


class CompressionManager(Protocol):
    def compress(
        self,
        data: bytes | memoryview,
        hint: str | None = None,
        *,
        itemsize: int = 1,
        force: bool = False,
    ) -> Compressed: ...

    def decompress(self, block: Compressed) -> bytes: ...


class NoCompression:
    """Stores bytes as they are."""

    def compress(
        self,
        data: bytes | memoryview,
        hint: str | None = None,
        *,
        itemsize: int = 1,
        force: bool = False,
    ) -> Compressed:
        raw = bytes(data)
        return Compressed("none", raw, len(raw))

    def decompress(self, block: Compressed) -> bytes:
        return block.payload


_MAGIC = b"VRMB"
_HEADER = struct.Struct("<4sB8sBQQI")  # magic, version, codec, itemsize, raw, payload, crc32


def encode_frame(block: Compressed) -> bytes:
    """Serialise ``block`` with a header and a CRC32 of the payload."""
    header = _HEADER.pack(
        _MAGIC,
        1,
        block.codec.encode().ljust(8, b"\0"),
        block.itemsize,
        block.raw_size,
        len(block.payload),
        zlib.crc32(block.payload),
    )
    return header + block.payload


def decode_frame(data: bytes | memoryview, what: str = "block") -> Compressed:
    """Parse a frame; raise :class:`CorruptBlock` naming ``what`` if it is damaged."""
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise CorruptBlock(f"{what}: stored data is truncated (no header)")
    magic, version, codec, itemsize, raw, length, crc = _HEADER.unpack(view[: _HEADER.size])
    if magic != _MAGIC or version != 1:
        raise CorruptBlock(f"{what}: not a VRAMancer block file")
    payload = bytes(view[_HEADER.size :])
    if len(payload) != length:
        raise CorruptBlock(f"{what}: stored data is truncated ({len(payload)} of {length} bytes)")
    if zlib.crc32(payload) != crc:
        raise CorruptBlock(f"{what}: checksum mismatch, the stored data is corrupted")
    return Compressed(codec.rstrip(b"\0").decode(), payload, raw, itemsize)
