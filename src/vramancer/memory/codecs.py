"""Fallback codecs for the store when no adaptive compression manager is available.

The adaptive, dtype-aware manager lives in ``memory/compression.py``; the store uses it when it
is there. This module keeps the store working without it: :class:`ZstdCompression` compresses
with zstandard (what L6, which always compresses, needs), and decodes every codec name the
block files may carry (``none``, ``zstd``, ``lz4``, ``gzip``).
"""

from __future__ import annotations

import gzip

import lz4.frame
import zstandard

from vramancer.memory.compression import Compressed, CorruptBlock

#: Bytes sampled to decide whether compression pays when not forced.
SAMPLE_BYTES = 256 * 1024
#: Smallest ratio (raw / compressed) that is worth the CPU time when not forced.
MIN_RATIO = 1.1


class ZstdCompression:
    """zstd at ``level``; unforced, only when a sample compresses by at least ``min_ratio``."""

    def __init__(self, level: int = 1, *, min_ratio: float = MIN_RATIO, threads: int = 0) -> None:
        self.level = level
        self.min_ratio = min_ratio
        self._compressor = zstandard.ZstdCompressor(level=level, threads=threads)
        self._sampler = zstandard.ZstdCompressor(level=level)
        self._decompressor = zstandard.ZstdDecompressor()

    def compress(
        self,
        data: bytes | bytearray | memoryview,
        hint: str | None = None,
        *,
        itemsize: int = 1,
        force: bool = False,
        target: str | None = None,
    ) -> Compressed:
        view = memoryview(data).cast("B")
        raw_size = view.nbytes
        if not force and target != "archive":
            sample = view[:SAMPLE_BYTES]
            packed = self._sampler.compress(sample)
            if sample.nbytes < len(packed) * self.min_ratio:
                # bytes in, bytes out: no 16 MiB copy just to say "stored as is"
                raw = data if isinstance(data, bytes) else bytes(view)
                return Compressed("none", raw, raw_size)
        return Compressed("zstd", self._compressor.compress(view), raw_size)

    def decompress(self, block: Compressed, *, what: str = "block") -> bytes:
        try:
            return decode(block, self._decompressor)
        except CorruptBlock as exc:
            raise CorruptBlock(f"{what}: {exc.message}") from None


def decode(block: Compressed, zstd: zstandard.ZstdDecompressor | None = None) -> bytes:
    """Decode ``block`` by its codec name; a damaged payload raises ``CorruptBlock``."""
    if block.itemsize != 1:
        raise CorruptBlock(
            f"block was byte-shuffled (itemsize {block.itemsize}); "
            "decoding it needs the adaptive compression manager"
        )
    try:
        if block.codec == "none":
            return block.payload
        if block.codec == "zstd":
            dec = zstd or zstandard.ZstdDecompressor()
            return bytes(dec.decompress(block.payload, max_output_size=block.raw_size))
        if block.codec == "lz4":
            return bytes(lz4.frame.decompress(block.payload))
        if block.codec == "gzip":
            return gzip.decompress(block.payload)
    except (zstandard.ZstdError, RuntimeError, OSError, EOFError) as exc:
        raise CorruptBlock(f"{block.codec} payload cannot be decoded: {exc}") from None
    raise CorruptBlock(f"unknown codec {block.codec!r}")
