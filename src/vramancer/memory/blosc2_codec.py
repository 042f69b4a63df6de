"""The optional blosc2 codecs: the one module that imports python-blosc2 (extra ``blosc2``).

Why a second compression library: blosc2 puts shuffled 16-bit elements back together with SIMD
inside its own blocks, so it decodes bf16 / fp16 blocks 1.2–2.1× faster than our numpy
un-shuffle, and its bit-shuffle + zstd compresses bf16 1.8× faster than ours (at a lower ratio);
ours compresses as fast or faster at the same or a better ratio (docs/benchmarks.md,
"Compression: blosc2 beside ours"). So both are kept, and the adaptive choice
(``codec_choice.py``) takes whichever pays on each block, the blosc2 codecs only when ``blosc2``
can be imported.

One piece is one blosc2 chunk (``compress2``): its own header names the codec, the filter and the
element size, so a block keeps ``itemsize`` 1 in :class:`~vramancer.memory.codec.Compressed` and
a large block is still split by ``chunks.py``. blosc2 holds the GIL while it works: pieces are
compressed one after another, each on blosc2's own ``threads``.
"""

from __future__ import annotations

from typing import Any

#: The package that provides the blosc2 codecs (and that an error asks to install).
PACKAGE = "blosc2"
#: What installs it.
INSTALL = "pip install 'vramancer[blosc2]'"
#: Size of a blosc2 chunk's header: anything shorter is not a chunk.
MIN_CHUNK = 16


def library() -> Any:
    """The ``blosc2`` module (untyped); ``ImportError`` when it is not installed. Imported on
    first use (the first sample or blosc2 block), not with the store."""
    import blosc2

    return blosc2


def available() -> bool:
    """Whether the blosc2 codecs can be used in this process."""
    try:
        library()
    except ImportError:
        return False
    return True


def compress(
    data: Any, *, compressor: str, level: int, typesize: int, bitshuffle: bool, threads: int = 1
) -> bytes:
    """One blosc2 chunk of ``data`` (a contiguous buffer, under 2 GiB): ``compressor``
    (``"zstd"`` or ``"lz4"``) at blosc2's ``level``, after its byte shuffle (``typesize`` > 1)
    or its bit shuffle (``bitshuffle``)."""
    blosc2 = library()
    if bitshuffle:
        filt = blosc2.Filter.BITSHUFFLE
    else:
        filt = blosc2.Filter.SHUFFLE if typesize > 1 else blosc2.Filter.NOFILTER
    return bytes(
        blosc2.compress2(
            data,
            codec=blosc2.Codec[compressor.upper()],
            clevel=level,
            typesize=typesize,
            filters=[filt],
            filters_meta=[0],
            nthreads=threads,
        )
    )


def decompress(payload: bytes | memoryview, raw_size: int, *, threads: int = 1) -> bytes:
    """The bytes of one blosc2 chunk, which must expand to exactly ``raw_size`` bytes.

    ``ValueError`` when the chunk is damaged; its sizes are checked before anything is
    allocated (blosc2 has no checksum of its own: the store's block files carry one)."""
    blosc2 = library()
    if len(payload) < MIN_CHUNK:
        raise ValueError(f"a blosc2 chunk is at least {MIN_CHUNK} bytes, got {len(payload)}")
    declared, stored, _ = blosc2.get_cbuffer_sizes(payload)
    if declared != raw_size:
        raise ValueError(f"blosc2 chunk declares {declared} bytes, expected {raw_size}")
    if stored != len(payload):
        raise ValueError(f"blosc2 chunk declares {stored} stored bytes, found {len(payload)}")
    return bytes(blosc2.decompress2(payload, nthreads=threads))
