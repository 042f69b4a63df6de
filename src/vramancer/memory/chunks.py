"""The chunked payload: a large or shuffled block stored as several codec frames behind a chunk
table (:data:`CHUNK_MAGIC`), so a block needs no field beyond :class:`Compressed`'s four and its
chunks can be compressed and decompressed in parallel; and decoding any stored block back to its
raw bytes (:func:`decompress_block`)."""

from __future__ import annotations

import math
import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from vramancer.memory.byteplanes import MAX_SHUFFLE_ITEMSIZE, plane_lengths
from vramancer.memory.codec import Codec, Compressed, CorruptBlock, decode_piece

_T = TypeVar("_T")
_R = TypeVar("_R")

#: A chunked or shuffled payload starts with this magic (no codec's own output does: zstd,
#: lz4-frame and gzip all start with their own). Layout: ``_CHUNKS`` (magic, version, frame
#: count, raw bytes per chunk), one ``<Q`` length per frame, a CRC32 of all that, the frames.
#: Each chunk is one codec frame, or, shuffled, one frame per byte plane (so every plane gets
#: its own entropy tables: a plane of random mantissa bytes would spoil a compressible one).
CHUNK_MAGIC = b"VRMC"
_CHUNKS = struct.Struct("<4sBIQ")
_CHUNK_LEN = struct.Struct("<Q")
_CRC = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    """Where one chunk's raw bytes go and where its frames lie in the payload."""

    raw_start: int
    raw_length: int
    #: ``(payload offset, length)`` of each frame: one, or one per byte plane.
    frames: tuple[tuple[int, int], ...]


def pack_chunks(chunk_size: int, frames: Sequence[bytes]) -> bytes:
    """The payload of a block stored as ``frames`` for chunks of ``chunk_size`` raw bytes."""
    table = _CHUNKS.pack(CHUNK_MAGIC, 1, len(frames), chunk_size) + b"".join(
        _CHUNK_LEN.pack(len(f)) for f in frames
    )
    return b"".join([table, _CRC.pack(zlib.crc32(table)), *frames])


def chunk_layout(
    payload: bytes | memoryview, raw_size: int, itemsize: int, what: str = "block"
) -> list[ChunkSpan] | None:
    """The chunks of a chunked payload; ``None`` if ``payload`` is a single codec frame."""
    if bytes(payload[:4]) != CHUNK_MAGIC:
        if itemsize > 1:
            raise CorruptBlock(f"{what}: shuffled data without its chunk table")
        return None
    if len(payload) < _CHUNKS.size:
        raise CorruptBlock(f"{what}: chunk table is truncated")
    _, version, count, chunk_size = _CHUNKS.unpack_from(payload)
    table_end = _CHUNKS.size + count * _CHUNK_LEN.size
    chunks = math.ceil(raw_size / chunk_size) if chunk_size else -1
    if version != 1 or chunks < 1 or count != chunks * itemsize:
        raise CorruptBlock(f"{what}: chunk table does not match the block's size")
    if len(payload) < table_end + _CRC.size:
        raise CorruptBlock(f"{what}: chunk table is truncated")
    if zlib.crc32(payload[:table_end]) != _CRC.unpack_from(payload, table_end)[0]:
        raise CorruptBlock(f"{what}: chunk table checksum mismatch, the data is corrupted")
    frames: list[tuple[int, int]] = []
    offset = table_end + _CRC.size
    for index in range(count):
        (length,) = _CHUNK_LEN.unpack_from(payload, _CHUNKS.size + index * _CHUNK_LEN.size)
        frames.append((offset, length))
        offset += length
    if offset != len(payload):
        raise CorruptBlock(f"{what}: chunked data is truncated ({len(payload)} of {offset} bytes)")
    return [
        ChunkSpan(
            c * chunk_size,
            min(chunk_size, raw_size - c * chunk_size),
            tuple(frames[c * itemsize : (c + 1) * itemsize]),
        )
        for c in range(chunks)
    ]


#: Byte planes of 16-bit elements are put back together as words (plane 0 is the low byte).
_LITTLE = sys.byteorder == "little"


def _serial_map(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    return [fn(item) for item in items]


def decompress_block(
    block: Compressed,
    *,
    what: str = "block",
    map_fn: Callable[[Callable[[int], bytes], Sequence[int]], Iterable[bytes]] = _serial_map,
    threads: int = 1,
) -> bytes:
    """Decode ``block`` (any codec, shuffled or not, chunked or not) back to its raw bytes.

    ``map_fn`` runs the per-chunk work (a thread pool's ``map`` decodes chunks in parallel);
    blosc2 chunks, which hold the GIL, are decoded one after another on blosc2's own
    ``threads`` instead. Raises :class:`CorruptBlock` naming ``what`` when anything does not add
    up (:class:`~vramancer.memory.codec.CodecUnavailable` when the codec's library is missing).
    """
    try:
        codec = Codec(block.codec)
    except ValueError:
        raise CorruptBlock(f"{what}: unknown codec {block.codec!r}") from None
    if not 1 <= block.itemsize <= MAX_SHUFFLE_ITEMSIZE or (codec.is_blosc2 and block.itemsize != 1):
        raise CorruptBlock(f"{what}: invalid element size {block.itemsize}")
    if codec is Codec.NONE:
        return decode_piece(codec, block.payload, block.raw_size, what)
    chunks = chunk_layout(block.payload, block.raw_size, block.itemsize, what)
    piece_threads = threads if codec.is_blosc2 else 1
    if chunks is None:
        return decode_piece(codec, block.payload, block.raw_size, what, threads=piece_threads)
    payload = memoryview(block.payload)
    if block.itemsize == 1:  # plain chunks: decode each, join once

        def decode_plain(index: int) -> bytes:
            ((start, length),) = chunks[index].frames
            raw_length = chunks[index].raw_length
            frame = payload[start : start + length]
            return decode_piece(codec, frame, raw_length, what, threads=piece_threads)

        if codec.is_blosc2:
            return b"".join(map(decode_plain, range(len(chunks))))

        return b"".join(map_fn(decode_plain, range(len(chunks))))
    out = np.empty(block.raw_size, dtype=np.uint8)

    def decode_planes(index: int) -> bytes:
        chunk = chunks[index]
        target = out[chunk.raw_start : chunk.raw_start + chunk.raw_length]
        rows = chunk.raw_length // block.itemsize
        elements = target[: rows * block.itemsize].reshape(rows, block.itemsize)
        sizes = plane_lengths(chunk.raw_length, block.itemsize)
        planes = [
            np.frombuffer(
                decode_piece(codec, payload[start : start + length], size, what), np.uint8
            )
            for (start, length), size in zip(chunk.frames, sizes, strict=True)
        ]
        if block.itemsize == 2 and _LITTLE:  # whole 16-bit words, not two strided byte passes
            words = elements.view(np.uint16).reshape(rows)
            np.left_shift(planes[1][:rows], 8, out=words, dtype=np.uint16)
            words |= planes[0]
        else:
            for plane, data in enumerate(planes):
                elements[:, plane] = data[:rows]
        target[rows * block.itemsize :] = planes[-1][rows:]
        return b""

    for _ in map_fn(decode_planes, range(len(chunks))):
        pass
    return out.tobytes()
