"""Codecs: one piece of bytes in, one frame out (zstd, lz4, gzip; blosc2's when it is installed),
and back, with its size checked.

Also the stored form of a block (:class:`Compressed`) and the error for damaged stored data
(:class:`CorruptBlock`, and :class:`CodecUnavailable` for a block whose codec's library is
missing). The blosc2 codecs are ``blosc2_codec.py``'s, the only module importing blosc2.
Chunking and the byte-plane shuffle are ``chunks.py``'s and ``byteplanes.py``'s; which codec a
block gets is ``codec_choice.py``'s.
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
from vramancer.memory import blosc2_codec


class CorruptBlock(VramancerError):
    """Stored bytes of a block fail their checksum or cannot be decoded.

    Over HTTP: ``409 corrupt_block`` for that block only. Not the client's doing, but the
    remedy is the client's: the block stays listed until it is replaced (``PUT``) or deleted,
    and asking again gives the same answer (a 5xx would invite retries, and the API keeps
    5xx for the server being unavailable). Every other block is unaffected.
    """

    code = "corrupt_block"
    http_status = 409


class CodecUnavailable(CorruptBlock):
    """A stored block's codec needs a library this process cannot import (a block written with
    a blosc2 codec, read where python-blosc2 is not installed). The bytes are intact: install
    the package the message names and read again. Handled as a corrupt block otherwise (the
    block stays where it is)."""

    code = "codec_unavailable"


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
    # blosc2 (optional, ``blosc2_codec.py``); names fit the block file's 8-byte codec field.
    #: blosc2 chunk, zstd (clevel 1), its SIMD byte shuffle when the element size is known.
    B2_ZSTD = "b2zstd"
    #: blosc2 chunk, lz4 (clevel 5), its SIMD byte shuffle when the element size is known.
    B2_LZ4 = "b2lz4"
    #: blosc2 chunk, zstd (clevel 1) after its bit shuffle: faster, lower ratio on bf16.
    B2_ZSTD_BITSHUFFLE = "b2zstdbs"

    @property
    def is_blosc2(self) -> bool:
        """Whether this codec is one of blosc2's (its shuffle is inside its chunks)."""
        return self in _BLOSC2

    @property
    def available(self) -> bool:
        """Whether this process can compress with it (blosc2's need python-blosc2)."""
        return not self.is_blosc2 or blosc2_codec.available()


#: blosc2 codecs: (blosc2's compressor, bit shuffle).
_BLOSC2: dict[Codec, tuple[str, bool]] = {
    Codec.B2_ZSTD: ("zstd", False),
    Codec.B2_LZ4: ("lz4", False),
    Codec.B2_ZSTD_BITSHUFFLE: ("zstd", True),
}


@dataclass(frozen=True, slots=True)
class Compressed:
    codec: str  # a Codec value: "none", "zstd", "lz4", "gzip", "b2zstd", ...
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


def codec_compress(
    codec: Codec,
    data: Any,
    level: int,
    checksum: bool = False,
    *,
    typesize: int = 1,
    threads: int = 1,
) -> bytes:
    """Compress one piece (``data`` is any contiguous buffer) with ``codec`` at ``level``.

    ``typesize`` and ``threads`` are for the blosc2 codecs (their shuffle's element size, their
    own threads); ``ImportError`` if one is asked for without python-blosc2."""
    if codec.is_blosc2:
        compressor, bitshuffle = _BLOSC2[codec]
        return blosc2_codec.compress(
            data,
            compressor=compressor,
            level=level,
            typesize=typesize,
            bitshuffle=bitshuffle,
            threads=threads,
        )
    if codec is Codec.ZSTD:
        return bytes(zstd_compressor(level, checksum).compress(data))
    if codec is Codec.LZ4:
        return bytes(lz4.frame.compress(data, store_size=True, content_checksum=checksum))
    if codec is Codec.GZIP:
        return zlib.compress(data, level, wbits=31)
    return bytes(data)


def codec_decompress(
    codec: Codec, payload: bytes | memoryview, raw_size: int, *, threads: int = 1
) -> bytes:
    """Decompress one piece that must expand to exactly ``raw_size`` bytes.

    Raises ``ValueError`` (or the codec's own error) when the data is damaged; the size is
    checked before any large allocation, so a damaged header cannot ask for gigabytes.
    ``ImportError`` for a blosc2 codec without python-blosc2 (``threads``: blosc2's own).
    """
    if codec.is_blosc2:
        out: bytes | memoryview = blosc2_codec.decompress(payload, raw_size, threads=threads)
    elif codec is Codec.NONE:
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


def decode_piece(
    codec: Codec, payload: bytes | memoryview, raw_size: int, what: str, *, threads: int = 1
) -> bytes:
    """:func:`codec_decompress`, any decoding error as :class:`CorruptBlock` naming ``what``
    (:class:`CodecUnavailable` naming the package when the codec's library is missing)."""
    try:
        return codec_decompress(codec, payload, raw_size, threads=threads)
    except ImportError:
        raise CodecUnavailable(
            f"{what}: stored with the {codec.value} codec, which needs the python package "
            f"{blosc2_codec.PACKAGE!r}; it cannot be imported here ({blosc2_codec.INSTALL})",
            codec=codec.value,
            package=blosc2_codec.PACKAGE,
        ) from None
    except CODEC_ERRORS as exc:
        raise CorruptBlock(f"{what}: {codec.value} data cannot be decoded ({exc})") from None
