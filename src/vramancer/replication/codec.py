"""Compression of delta payloads: zstd when installed, else lz4, else gzip; raw when it does not
pay (tiny or incompressible payloads).

Decompression is bounded: ``decompress`` never produces more than ``max_bytes`` (a small
record cannot expand into gigabytes of memory).
"""

from __future__ import annotations

import importlib.util
import threading
import zlib
from enum import IntEnum
from typing import Any

#: Payloads shorter than this are stored raw (a frame header costs more than it saves).
MIN_COMPRESS_BYTES = 128
#: A compressed payload is kept only if it is at most this share of the raw one.
KEEP_RATIO = 0.95
#: zstd level 1: on small JSON deltas it shrinks about as much as level 3, faster.
ZSTD_LEVEL = 1
GZIP_LEVEL = 6


class Codec(IntEnum):
    """How a payload is stored; the value is the byte written in the record."""

    RAW = 0
    GZIP = 1
    LZ4 = 2
    ZSTD = 3


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


_HAVE_ZSTD = _installed("zstandard")
_HAVE_LZ4 = _installed("lz4")


def available() -> list[Codec]:
    """The codecs this process can read and write."""
    found = [Codec.RAW, Codec.GZIP]
    if _HAVE_LZ4:
        found.append(Codec.LZ4)
    if _HAVE_ZSTD:
        found.append(Codec.ZSTD)
    return found


def best_codec() -> Codec:
    """zstd if importable, else lz4, else gzip."""
    if _HAVE_ZSTD:
        return Codec.ZSTD
    if _HAVE_LZ4:
        return Codec.LZ4
    return Codec.GZIP


class CodecUnavailable(ValueError):
    """A record names a codec this process cannot decode (its library is not installed)."""


class TooLarge(ValueError):
    """Decompressed data would pass the bound it was given."""


def _zstd() -> Any:
    if not _HAVE_ZSTD:
        raise CodecUnavailable("codec: zstd (python package zstandard) is not installed")
    import zstandard

    return zstandard


def _lz4() -> Any:
    if not _HAVE_LZ4:
        raise CodecUnavailable("codec: lz4 (python package lz4) is not installed")
    import lz4.frame

    return lz4.frame


_local = threading.local()


def _zstd_compressor() -> Any:
    """This thread's zstd compressor (a context costs more to build than a small delta to
    compress; contexts are not shared between threads)."""
    found = getattr(_local, "zstd", None)
    if found is None:
        found = _local.zstd = _zstd().ZstdCompressor(level=ZSTD_LEVEL)
    return found


def _compress_with(codec: Codec, payload: bytes) -> bytes:
    if codec is Codec.ZSTD:
        return bytes(_zstd_compressor().compress(payload))
    if codec is Codec.LZ4:
        return bytes(_lz4().compress(payload, store_size=True))
    if codec is Codec.GZIP:
        packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)
        return packer.compress(payload) + packer.flush()
    return payload


def compress(payload: bytes, codec: Codec | None = None) -> tuple[Codec, bytes]:
    """``payload`` compressed with ``codec`` (default: ``best_codec()``), or ``(RAW, payload)``
    when it is shorter than ``MIN_COMPRESS_BYTES`` or does not shrink by at least 5 %."""
    chosen = best_codec() if codec is None else Codec(codec)
    if chosen is Codec.RAW or len(payload) < MIN_COMPRESS_BYTES:
        return Codec.RAW, bytes(payload)
    packed = _compress_with(chosen, payload)
    if len(packed) > len(payload) * KEEP_RATIO:
        return Codec.RAW, bytes(payload)
    return chosen, packed


def _bounded_zstd(data: bytes, max_bytes: int) -> bytes:
    zstandard = _zstd()
    declared = zstandard.frame_content_size(data)
    if declared > max_bytes:
        raise TooLarge(f"zstd frame declares {declared} bytes, more than {max_bytes}")
    # A frame that does not declare its size gets a buffer of the bound and no more.
    limit = declared if declared >= 0 else max_bytes
    return bytes(zstandard.ZstdDecompressor().decompress(data, max_output_size=limit))


def _bounded_lz4(data: bytes, max_bytes: int) -> bytes:
    reader = _lz4().LZ4FrameDecompressor()
    out = reader.decompress(data, max_length=max_bytes + 1)
    if len(out) > max_bytes:
        raise TooLarge(f"lz4 data expands past {max_bytes} bytes")
    if not reader.eof:
        raise ValueError("lz4 frame is incomplete")
    return bytes(out)


def _bounded_gzip(data: bytes, max_bytes: int) -> bytes:
    reader = zlib.decompressobj(31)
    out = reader.decompress(data, max_bytes + 1)
    if len(out) > max_bytes:
        raise TooLarge(f"gzip data expands past {max_bytes} bytes")
    if not reader.eof or reader.unused_data:
        raise ValueError("gzip stream is incomplete or followed by other bytes")
    return out


def decompress(codec: Codec, data: bytes, *, max_bytes: int) -> bytes:
    """The payload ``data`` holds; ``TooLarge`` rather than more than ``max_bytes`` of output,
    ``ValueError`` for data the codec cannot read."""
    codec = Codec(codec)
    if codec is Codec.RAW:
        if len(data) > max_bytes:
            raise TooLarge(f"raw payload is longer than {max_bytes} bytes")
        return bytes(data)
    try:
        if codec is Codec.ZSTD:
            return _bounded_zstd(data, max_bytes)
        if codec is Codec.LZ4:
            return _bounded_lz4(data, max_bytes)
        return _bounded_gzip(data, max_bytes)
    except (TooLarge, CodecUnavailable):
        raise
    except Exception as exc:  # each library raises its own error type for damaged input
        raise ValueError(f"{codec.name.lower()} data cannot be decoded: {exc}") from exc
