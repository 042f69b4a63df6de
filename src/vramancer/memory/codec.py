"""Codecs: one piece of bytes in, one frame out (zstd, lz4, gzip), and back, with its size checked.

Also the stored form of a block (:class:`Compressed`) and the error for damaged stored data
(:class:`CorruptBlock`). Chunking and the byte-plane shuffle are ``chunks.py``'s and
``byteplanes.py``'s; which codec a block gets is ``codec_choice.py``'s.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import lz4.frame
import zstandard

from vramancer.errors import VramancerError


class CorruptBlock(VramancerError):
    """Stored bytes of a block fail their checksum or cannot be decoded.

    Over HTTP: ``409 corrupt_block`` for that block only. Not the client's doing, but the
    remedy is the client's: the block stays listed until it is replaced (``PUT``) or deleted,
    and asking again gives the same answer (a 5xx would invite retries, and the API keeps
    5xx for the server being unavailable). Every other block is unaffected.
    """

    code = "corrupt_block"
    http_status = 409


class Codec(StrEnum):
    """A compression codec; the value is what :class:`Compressed` and frames store."""

    #: Stored as is.
    NONE = "none"
    #: Zstandard (python-zstandard): the best ratio per CPU-second on most data.
    ZSTD = "zstd"
    #: LZ4 block format: very fast, lower ratio.
    LZ4 = "lz4"
    #: gzip (zlib with the gzip header and CRC): slow; kept for ratio on some data and for
    #: interoperability.
    GZIP = "gzip"


@dataclass(frozen=True, slots=True)
class Compressed:
    codec: str  # "none" | "zstd" | "lz4" | "gzip"
    payload: bytes
    raw_size: int
    #: Byte-plane shuffle applied before the codec, with this element size (1: none).
    itemsize: int = 1

    @property
    def stored_size(self) -> int:
        return len(self.payload)

    @property
    def ratio(self) -> float:
        """Raw size over stored size (1.0 for an empty block)."""
        return self.raw_size / len(self.payload) if self.payload else 1.0


_local = threading.local()


def zstd_compressor(level: int, checksum: bool) -> zstandard.ZstdCompressor:
    """One compressor per thread, level and checksum flag (a ZstdCompressor is not
    thread-safe)."""
    cache: dict[tuple[int, bool], zstandard.ZstdCompressor] | None = getattr(_local, "zstd", None)
    if cache is None:
        cache = {}
        _local.zstd = cache
    compressor = cache.get((level, checksum))
    if compressor is None:
        compressor = zstandard.ZstdCompressor(level=level, write_checksum=checksum)
        cache[(level, checksum)] = compressor
    return compressor


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    decompressor: zstandard.ZstdDecompressor | None = getattr(_local, "unzstd", None)
    if decompressor is None:
        decompressor = _local.unzstd = zstandard.ZstdDecompressor()
    return decompressor


def codec_compress(codec: Codec, data: Any, level: int, checksum: bool = False) -> bytes:
    """Compress one piece (``data`` is any contiguous buffer) with ``codec`` at ``level``."""
    if codec is Codec.ZSTD:
        return bytes(zstd_compressor(level, checksum).compress(data))
    if codec is Codec.LZ4:
        return bytes(lz4.frame.compress(data, store_size=True, content_checksum=checksum))
    if codec is Codec.GZIP:
        return zlib.compress(data, level, wbits=31)
    return bytes(data)


def codec_decompress(codec: Codec, payload: bytes | memoryview, raw_size: int) -> bytes:
    """Decompress one piece that must expand to exactly ``raw_size`` bytes.

    Raises ``ValueError`` (or the codec's own error) when the data is damaged; the size is
    checked before any large allocation, so a damaged header cannot ask for gigabytes.
    """
    if codec is Codec.NONE:
        out = payload
    elif codec is Codec.ZSTD:
        declared = zstandard.frame_content_size(payload)
        if declared != raw_size:
            raise ValueError(f"zstd frame declares {declared} bytes, expected {raw_size}")
        out = _zstd_decompressor().decompress(payload, max_output_size=raw_size)
    elif codec is Codec.LZ4:
        declared = lz4.frame.get_frame_info(payload)["content_size"]
        if declared != raw_size:
            raise ValueError(f"lz4 frame declares {declared} bytes, expected {raw_size}")
        out = lz4.frame.decompress(payload)
    else:
        inflater = zlib.decompressobj(wbits=31)
        out = inflater.decompress(payload, raw_size)
        if not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
            raise ValueError("gzip stream is truncated or has trailing data")
    if len(out) != raw_size:
        raise ValueError(f"decoded {len(out)} bytes, expected {raw_size}")
    return bytes(out)


CODEC_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    zlib.error,
    zstandard.ZstdError,
    RuntimeError,  # lz4.frame's error type
    KeyError,
)


def decode_piece(codec: Codec, payload: bytes | memoryview, raw_size: int, what: str) -> bytes:
    """:func:`codec_decompress`, any decoding error as :class:`CorruptBlock` naming ``what``."""
    try:
        return codec_decompress(codec, payload, raw_size)
    except CODEC_ERRORS as exc:
        raise CorruptBlock(f"{what}: {codec.value} data cannot be decoded ({exc})") from None
