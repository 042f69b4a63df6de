"""Block compression (seed 000 ``CompressionManager.compress(data, hint)``).

The store compresses a block when it moves to L5 (memory-mapped SSD files) or L6 (the cold
archive); the result goes into a block file (``memory/blockfile.py``, xxh3-checked). Three
facts shape this module:

* Dense fp16/bf16/fp32 weights barely compress as they are (about 1.1–1.3× with zstd -1), but
  their exponent bytes are very regular: splitting the bytes of each element into planes before
  the codec (a byte-plane *shuffle*, as blosc does) lifts bf16 from about 1.28× to about 1.46×.
  The element size comes from the caller (``itemsize``) or from a hint such as ``dtype=bf16``.
* One core compresses at about 0.5 GB/s, slower than an NVMe drive writes, so large blocks are
  split into chunks compressed in a thread pool (zstandard, lz4 and zlib release the GIL). A
  chunked (or shuffled) payload carries its own chunk table (:data:`CHUNK_MAGIC`), so it needs
  no field beyond :class:`Compressed`'s four and any container (the store's block files)
  holds it; chunks are decompressed in parallel too.
* Compression is a cost: for the fast tier (``Target.FAST``, L5) a sample of the block is tried
  with each codec and the block is stored raw unless some codec reaches ``min_ratio`` at
  ``min_bytes_per_s``; among those that do, the one that saves most bytes per CPU-second wins.
  For the archive (``Target.ARCHIVE``, L6, or ``force=True``) the best ratio wins, always.

The choice is remembered per hint (and element size and target; blocks without a hint share
one), and re-evaluated every ``reevaluate_every`` uses, or at once when a block compressed with
it did not pay. For the archive, a remembered "nothing shrinks" is not trusted: the block is
tried with the first candidate anyway.

Damaged stored data (bad checksum, truncated frame, codec error, wrong length) raises
:class:`CorruptBlock` naming the block, so one bad archive file costs that block only.
"""

from __future__ import annotations

import math
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, TypeVar

import lz4.frame
import numpy as np
import zstandard
from pydantic import BaseModel, ConfigDict, Field

from vramancer.errors import InvalidInput, VramancerError
from vramancer.units import MIB, Size

#: What the byte-plane helpers accept: any contiguous buffer numpy can view as bytes.
_Bytes = bytes | bytearray | memoryview | np.ndarray[Any, Any]
_T = TypeVar("_T")
_R = TypeVar("_R")

#: Largest element size the byte-plane shuffle splits (wider elements are stored unshuffled;
#: the common ones are 2, 4 and 8, and 3 for RGB pixels or 16 for complex128 also work).
MAX_SHUFFLE_ITEMSIZE = 64
#: Rows per step of the blocked transpose in :func:`shuffle` (fits the L2 cache).
_SHUFFLE_ROWS = 32_768
#: Slices a block's sample is taken from.
SAMPLE_SLICES = 16
#: Element size of the dtype names a hint may carry (``dtype=bf16``).
DTYPE_ITEMSIZES: dict[str, int] = {
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "f16": 2,
    "float16": 2,
    "half": 2,
    "int16": 2,
    "i16": 2,
    "uint16": 2,
    "fp32": 4,
    "f32": 4,
    "float32": 4,
    "float": 4,
    "int32": 4,
    "i32": 4,
    "uint32": 4,
    "fp64": 8,
    "f64": 8,
    "float64": 8,
    "double": 8,
    "int64": 8,
    "i64": 8,
    "uint64": 8,
    "fp8": 1,
    "int8": 1,
    "i8": 1,
    "uint8": 1,
    "u8": 1,
}
_DTYPE_RE = re.compile(r"(?:^|[\s;,&])dtype\s*[=:]\s*([A-Za-z0-9_.]+)")


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
    #: gzip (zlib, RFC 1952): slow; kept for ratio on some data and for interoperability.
    GZIP = "gzip"


class Target(StrEnum):
    """Where a compressed block is going, which decides how hard compression tries."""

    #: L5 and other fast tiers: compress only when the sampled ratio and speed pay for it.
    FAST = "fast"
    #: L6 cold archive: always compress, with the codec of best ratio.
    ARCHIVE = "archive"


class CompressionSettings(BaseModel):
    """``[memory.compression]``: codecs, levels and the "is it worth it" thresholds."""

    model_config = ConfigDict(extra="forbid")

    #: Off: every block is stored raw, on every tier.
    enabled: bool = True
    #: Codecs tried, in this order (the order breaks ties).
    codecs: list[Codec] = Field(
        default_factory=lambda: [Codec.ZSTD, Codec.LZ4, Codec.GZIP], min_length=1
    )
    #: Byte-plane shuffle when the element size is known (itemsize 2, 4 or 8).
    shuffle: bool = True
    zstd_level: int = Field(default=1, ge=-7, le=22)
    gzip_level: int = Field(default=1, ge=1, le=9)
    #: Levels used for the archive (L6), where ratio matters more than speed.
    archive_zstd_level: int = Field(default=3, ge=-7, le=22)
    archive_gzip_level: int = Field(default=6, ge=1, le=9)
    #: Archive: ratios within this fraction of the best count as equal (the faster one wins).
    archive_ratio_slack: float = Field(default=0.03, ge=0.0, lt=1.0)
    #: Fast tier: a codec must shrink the sample at least this much (raw / compressed).
    min_ratio: float = Field(default=1.1, ge=1.0)
    #: Fast tier: a codec must compress at least this many bytes per CPU-second (one core).
    min_bytes_per_s: Size = 100_000_000
    #: Fast tier, optional: the device's write speed; when set, compressing must also save more
    #: bytes per second (over all threads) than the device writes, or it would slow writes down.
    device_write_bytes_per_s: Size | None = None
    #: Bytes of each block tried with every candidate (16 slices spread over the block).
    sample_size: Size = Field(default=256 * 1024, ge=4096)
    #: Fast tier: blocks smaller than this are stored raw.
    min_block_size: Size = 4096
    #: Blocks larger than this are split into chunks of this size (a multiple of 8 bytes).
    chunk_size: Size = Field(default=2 * MIB, ge=64 * 1024)
    #: Threads compressing the chunks of one large block; 0: min(4, CPU count).
    threads: int = Field(default=0, ge=0, le=64)
    #: Write a content checksum in every zstd / lz4 frame, so that ``decompress`` alone catches
    #: damage (gzip always has one). Off by default: the store's block files already checksum
    #: the payload (xxh3), and it costs 10–15 % of zstd's speed.
    checksum: bool = False
    #: A remembered choice is re-tried on a sample after this many uses.
    reevaluate_every: int = Field(default=64, ge=1)


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


class CompressionManager(Protocol):
    def compress(
        self,
        data: bytes | bytearray | memoryview,
        hint: str | None = None,
        *,
        itemsize: int = 1,
        force: bool = False,
        target: Target | str | None = None,
    ) -> Compressed: ...

    def decompress(self, block: Compressed, *, what: str = "block") -> bytes: ...


class NoCompression:
    """Stores bytes as they are (and still reads blocks another manager compressed)."""

    def compress(
        self,
        data: bytes | bytearray | memoryview,
        hint: str | None = None,
        *,
        itemsize: int = 1,
        force: bool = False,
        target: Target | str | None = None,
    ) -> Compressed:
        raw = bytes(data)
        return Compressed("none", raw, len(raw))

    def decompress(self, block: Compressed, *, what: str = "block") -> bytes:
        return decompress_block(block, what=what)


# --------------------------------------------------------------------------- byte planes


def shuffle(data: _Bytes, itemsize: int) -> np.ndarray[Any, Any]:
    """Byte-plane shuffle: byte ``j`` of every element together, plane after plane.

    A tail shorter than one element stays at the end as it is. Returns a new uint8 array
    (a buffer the codecs accept without another copy).
    """
    src = np.frombuffer(data, dtype=np.uint8)
    if itemsize == 1:
        return src.copy()
    whole = len(src) - len(src) % itemsize
    rows = whole // itemsize
    out = np.empty(len(src), dtype=np.uint8)
    elements = src[:whole].reshape(rows, itemsize)
    planes = out[:whole].reshape(itemsize, rows)
    for start in range(0, rows, _SHUFFLE_ROWS):  # blocked: twice as fast as one big .T copy
        planes[:, start : start + _SHUFFLE_ROWS] = elements[start : start + _SHUFFLE_ROWS].T
    out[whole:] = src[whole:]
    return out


def unshuffle_into(planes_data: _Bytes, itemsize: int, out: np.ndarray[Any, Any]) -> None:
    """Inverse of :func:`shuffle`, written into ``out`` (a uint8 array of the same length)."""
    src = np.frombuffer(planes_data, dtype=np.uint8)
    if itemsize == 1:
        out[:] = src
        return
    whole = len(src) - len(src) % itemsize
    rows = whole // itemsize
    planes = src[:whole].reshape(itemsize, rows)
    elements = out[:whole].reshape(rows, itemsize)
    for plane in range(itemsize):
        elements[:, plane] = planes[plane]
    out[whole:] = src[whole:]


def unshuffle(planes_data: _Bytes, itemsize: int) -> bytes:
    """Inverse of :func:`shuffle`, as bytes."""
    out = np.empty(len(planes_data), dtype=np.uint8)
    unshuffle_into(planes_data, itemsize, out)
    return out.tobytes()


def itemsize_from_hint(hint: str | None) -> int:
    """The element size a hint names (``dtype=bf16`` → 2, ``dtype=fp32`` → 4), else 1."""
    if not hint:
        return 1
    match = _DTYPE_RE.search(hint)
    if match is None:
        return 1
    name = match.group(1).lower().removeprefix("torch.").removeprefix("np.")
    return DTYPE_ITEMSIZES.get(name, 1)


# --------------------------------------------------------------------------- codecs

_local = threading.local()


def _zstd_compressor(level: int, checksum: bool) -> zstandard.ZstdCompressor:
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
        return bytes(_zstd_compressor(level, checksum).compress(data))
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


_CODEC_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    zlib.error,
    zstandard.ZstdError,
    RuntimeError,  # lz4.frame's error type
    KeyError,
)


def _serial_map(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
    return [fn(item) for item in items]


def plane_lengths(raw_length: int, itemsize: int) -> list[int]:
    """Lengths of the byte planes of ``raw_length`` shuffled bytes; the last plane carries the
    tail shorter than one element."""
    if itemsize == 1:
        return [raw_length]
    rows = raw_length // itemsize
    return [rows] * (itemsize - 1) + [raw_length - rows * (itemsize - 1)]


def decompress_block(
    block: Compressed,
    *,
    what: str = "block",
    map_fn: Callable[[Callable[[int], bytes], Sequence[int]], Iterable[bytes]] = _serial_map,
) -> bytes:
    """Decode ``block`` (any codec, shuffled or not, chunked or not) back to its raw bytes.

    ``map_fn`` runs the per-chunk work (a thread pool's ``map`` decodes chunks in parallel).
    Raises :class:`CorruptBlock` naming ``what`` when anything does not add up.
    """
    try:
        codec = Codec(block.codec)
    except ValueError:
        raise CorruptBlock(f"{what}: unknown codec {block.codec!r}") from None
    if not 1 <= block.itemsize <= MAX_SHUFFLE_ITEMSIZE:
        raise CorruptBlock(f"{what}: invalid element size {block.itemsize}")
    if codec is Codec.NONE:
        return _decode_piece(codec, block.payload, block.raw_size, what)
    chunks = chunk_layout(block.payload, block.raw_size, block.itemsize, what)
    if chunks is None:
        return _decode_piece(codec, block.payload, block.raw_size, what)
    payload = memoryview(block.payload)
    if block.itemsize == 1:  # plain chunks: decode each, join once

        def decode_plain(index: int) -> bytes:
            ((start, length),) = chunks[index].frames
            raw_length = chunks[index].raw_length
            return _decode_piece(codec, payload[start : start + length], raw_length, what)

        return b"".join(map_fn(decode_plain, range(len(chunks))))
    out = np.empty(block.raw_size, dtype=np.uint8)

    def decode_planes(index: int) -> bytes:
        chunk = chunks[index]
        target = out[chunk.raw_start : chunk.raw_start + chunk.raw_length]
        rows = chunk.raw_length // block.itemsize
        elements = target[: rows * block.itemsize].reshape(rows, block.itemsize)
        sizes = plane_lengths(chunk.raw_length, block.itemsize)
        for plane, ((start, length), size) in enumerate(zip(chunk.frames, sizes, strict=True)):
            data = np.frombuffer(
                _decode_piece(codec, payload[start : start + length], size, what), dtype=np.uint8
            )
            elements[:, plane] = data[:rows]
            if plane == block.itemsize - 1:
                target[rows * block.itemsize :] = data[rows:]
        return b""

    for _ in map_fn(decode_planes, range(len(chunks))):
        pass
    return out.tobytes()


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


def _decode_piece(codec: Codec, payload: bytes | memoryview, raw_size: int, what: str) -> bytes:
    try:
        return codec_decompress(codec, payload, raw_size)
    except _CODEC_ERRORS as exc:
        raise CorruptBlock(f"{what}: {codec.value} data cannot be decoded ({exc})") from None


# --------------------------------------------------------------------------- the policy


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way to store a block: a codec at a level, shuffled with ``itemsize`` or not."""

    codec: Codec
    level: int = 0
    #: Element size of the byte-plane shuffle (1: none).
    itemsize: int = 1

    @property
    def label(self) -> str:
        level = f"-{self.level}" if self.codec in (Codec.ZSTD, Codec.GZIP) else ""
        shuffled = f"+shuffle{self.itemsize}" if self.itemsize > 1 else ""
        return f"{self.codec.value}{level}{shuffled}"


@dataclass(frozen=True, slots=True)
class Trial:
    """What one candidate did to a sample: sizes and the CPU time it took (shuffle included)."""

    candidate: Candidate
    raw_bytes: int
    stored_bytes: int
    cpu_s: float

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def bytes_per_s(self) -> float:
        """Raw bytes compressed per CPU-second (one core)."""
        return self.raw_bytes / max(self.cpu_s, 1e-9)

    @property
    def saved_bytes_per_s(self) -> float:
        """Bytes saved per CPU-second, ``(raw − stored) / cpu_s``: the ranking score."""
        return (self.raw_bytes - self.stored_bytes) / max(self.cpu_s, 1e-9)


def candidates(settings: CompressionSettings, target: Target, itemsize: int) -> list[Candidate]:
    """Every candidate, in trial order: per codec, each level (the archive also tries its own
    levels after the fast ones), each shuffled first (when an element size is known), then
    plain."""
    archive = target is Target.ARCHIVE
    levels = {
        Codec.ZSTD: [settings.zstd_level] + ([settings.archive_zstd_level] if archive else []),
        Codec.GZIP: [settings.gzip_level] + ([settings.archive_gzip_level] if archive else []),
        Codec.LZ4: [0],
    }
    shuffles = [itemsize, 1] if settings.shuffle and itemsize > 1 else [1]
    result: list[Candidate] = []
    for codec in dict.fromkeys(settings.codecs):
        if codec is Codec.NONE:
            continue
        for level in dict.fromkeys(levels[codec]):
            result.extend(Candidate(codec, level, size) for size in shuffles)
    return result


def choose(
    trials: Sequence[Trial], target: Target, settings: CompressionSettings, threads: int
) -> Trial | None:
    """Pure choice among sampled trials; ``None`` means "store it raw".

    Archive: the best ratio, if it shrinks the data at all; trials within
    ``archive_ratio_slack`` of it count as equal and the one saving most bytes per CPU-second
    wins (gzip is not worth 10× zstd's CPU for 2 % more; and a small sample favours gzip's
    32 KiB window over zstd, which gains more on whole chunks). Fast: among trials reaching
    ``min_ratio`` and ``min_bytes_per_s`` (and, when ``device_write_bytes_per_s`` is set,
    saving bytes faster than the device writes them, with ``threads`` cores), the most bytes
    saved per CPU-second. Ties go to the earlier trial.
    """
    if target is Target.ARCHIVE:
        shrinking = [t for t in trials if t.stored_bytes < t.raw_bytes]
        if not shrinking:
            return None
        best_ratio = max(t.ratio for t in shrinking)
        floor = best_ratio * (1.0 - settings.archive_ratio_slack)
        return _fastest_saver([t for t in shrinking if t.ratio >= floor])
    worthwhile = [
        t
        for t in trials
        if t.ratio >= settings.min_ratio
        and t.bytes_per_s >= settings.min_bytes_per_s
        and (
            settings.device_write_bytes_per_s is None
            or t.saved_bytes_per_s * threads >= settings.device_write_bytes_per_s
        )
    ]
    return _fastest_saver(worthwhile)


def _fastest_saver(trials: Sequence[Trial]) -> Trial | None:
    """The trial saving most bytes per CPU-second (the first of equals); ``None`` if empty."""
    best: Trial | None = None
    for trial in trials:
        if best is None or trial.saved_bytes_per_s > best.saved_bytes_per_s:
            best = trial
    return best


def resolve_target(target: Target | str | None, force: bool) -> Target:
    """``force`` or ``"L6"``/``"archive"`` → archive; ``None`` or another tier name → fast."""
    if force:
        return Target.ARCHIVE
    if target is None:
        return Target.FAST
    if isinstance(target, Target):
        return target
    name = target.strip()
    if name.upper() == "L6":
        return Target.ARCHIVE
    if name.upper() in ("L1", "L2", "L3", "L4", "L5"):
        return Target.FAST
    try:
        return Target(name.lower())
    except ValueError:
        raise InvalidInput(
            f"target: expected a tier name (L1–L6), 'fast' or 'archive', got {target!r}"
        ) from None


@dataclass(slots=True)
class Decision:
    """The remembered choice for one (hint, element size, target): ``None`` stores raw."""

    candidate: Candidate | None
    trials: tuple[Trial, ...] = ()
    uses: int = 0


@dataclass(frozen=True, slots=True)
class CodecStats:
    """Totals of blocks stored with one codec by one manager."""

    blocks: int
    raw_bytes: int
    stored_bytes: int


@dataclass(slots=True)
class _Totals:
    blocks: int = 0
    raw_bytes: int = 0
    stored_bytes: int = 0


@dataclass(slots=True)
class _Sampled:
    decision: Decision
    #: The chosen candidate's output when the sample was the whole block (no need to redo it).
    whole: bytes | None = None


_DecisionKey = tuple[str, int, Target]


def _raw_bytes(view: memoryview) -> bytes:
    """The bytes of ``view`` without a copy when it already spans a whole ``bytes`` object
    (a block stored raw must not cost a second copy of, say, 16 MiB)."""
    obj = view.obj
    if isinstance(obj, bytes) and view.nbytes == len(obj) and view.contiguous:
        return obj
    return bytes(view)


class AdaptiveCompression:
    """The default :class:`CompressionManager`: adaptive, dtype-aware, multi-threaded.

    Thread-safe: the store may compress blocks from several threads at once.
    """

    def __init__(
        self,
        settings: CompressionSettings | None = None,
        *,
        cpu_timer: Callable[[], float] = time.thread_time,
    ) -> None:
        self.settings = settings if settings is not None else CompressionSettings()
        self.threads = self.settings.threads or min(4, os.cpu_count() or 1)
        self.chunk_size = max(8, self.settings.chunk_size // 8 * 8)
        self._checksum = self.settings.checksum
        self._cpu_timer = cpu_timer
        self._lock = threading.Lock()
        self._decisions: dict[_DecisionKey, Decision] = {}
        self._totals: dict[str, _Totals] = {}
        self._pool: ThreadPoolExecutor | None = None

    # -- public API ----------------------------------------------------------------------

    def compress(
        self,
        data: bytes | bytearray | memoryview,
        hint: str | None = None,
        *,
        itemsize: int = 1,
        force: bool = False,
        target: Target | str | None = None,
    ) -> Compressed:
        """Compress ``data`` for ``target`` (``force=True`` means the archive, L6).

        ``itemsize`` (or ``dtype=…`` in ``hint``) turns on the byte-plane shuffle. The result
        is never larger than the data: a block that does not shrink is stored raw.
        """
        view = _byte_view(data)
        mode = resolve_target(target, force)
        size = self._itemsize(itemsize, hint)
        block = self._compress(view, hint, size, mode)
        with self._lock:
            totals = self._totals.setdefault(block.codec, _Totals())
            totals.blocks += 1
            totals.raw_bytes += block.raw_size
            totals.stored_bytes += block.stored_size
        return block

    def decompress(self, block: Compressed, *, what: str = "block") -> bytes:
        """The raw bytes of ``block``; :class:`CorruptBlock` naming ``what`` if damaged."""
        if self.threads > 1 and block.raw_size > self.chunk_size:
            return decompress_block(block, what=what, map_fn=self._pool_map)
        return decompress_block(block, what=what)

    def evaluate(
        self,
        data: bytes | bytearray | memoryview,
        hint: str | None = None,
        *,
        itemsize: int = 1,
        target: Target | str | None = None,
    ) -> Decision:
        """Sample ``data`` with every candidate and return the choice, remembering nothing."""
        view = _byte_view(data)
        size = self._itemsize(itemsize, hint)
        return self._sample_and_choose(view, size, resolve_target(target, False)).decision

    def decision_for(
        self, hint: str | None, *, itemsize: int = 1, target: Target | str | None = None
    ) -> Decision | None:
        """The choice remembered for ``hint`` (``None`` if none yet; blocks without a hint
        share one choice per element size and target)."""
        size = self._itemsize(itemsize, hint)
        key = (hint or "", size if self.settings.shuffle else 1, resolve_target(target, False))
        with self._lock:
            return self._decisions.get(key)

    def stats(self) -> dict[str, CodecStats]:
        """Blocks and bytes stored so far, per codec."""
        with self._lock:
            return {
                name: CodecStats(t.blocks, t.raw_bytes, t.stored_bytes)
                for name, t in self._totals.items()
            }

    def close(self) -> None:
        """Stop the worker threads (a later call starts new ones)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    # -- internals -----------------------------------------------------------------------

    def _itemsize(self, itemsize: int, hint: str | None) -> int:
        """The shuffle's element size: ``itemsize``, else the hint's dtype; 1 (no shuffle) for
        elements wider than :data:`MAX_SHUFFLE_ITEMSIZE`."""
        if isinstance(itemsize, bool) or not isinstance(itemsize, int) or itemsize < 1:
            raise InvalidInput(f"itemsize: expected a positive integer, got {itemsize!r}")
        size = itemsize if itemsize > 1 else itemsize_from_hint(hint)
        return size if size <= MAX_SHUFFLE_ITEMSIZE else 1

    def _compress(self, view: memoryview, hint: str | None, size: int, mode: Target) -> Compressed:
        raw_size = len(view)
        if (
            not self.settings.enabled
            or raw_size == 0
            or (mode is Target.FAST and raw_size < self.settings.min_block_size)
        ):
            return Compressed(Codec.NONE.value, _raw_bytes(view), raw_size)
        shuffle_size = size if self.settings.shuffle else 1
        key: _DecisionKey = (hint or "", shuffle_size, mode)
        candidate, whole, fresh = self._decide(view, key, shuffle_size, mode)
        remembered_none = candidate is None and not fresh
        if remembered_none and mode is Target.ARCHIVE:
            # the archive always compresses: a remembered "nothing shrinks" is not trusted, the
            # block is tried with the first candidate
            candidate = candidates(self.settings, mode, shuffle_size)[0]
        if candidate is None:
            return Compressed(Codec.NONE.value, _raw_bytes(view), raw_size)
        if whole is not None:
            block = Compressed(candidate.codec.value, whole, raw_size, candidate.itemsize)
        else:
            block = self.encode_with(view, candidate)
        too_small = mode is Target.FAST and block.ratio < self.settings.min_ratio
        failed = block.stored_size >= raw_size or too_small
        if failed != remembered_none:  # the choice was wrong for this block: sample next time
            with self._lock:
                self._decisions.pop(key, None)
        if failed:
            return Compressed(Codec.NONE.value, _raw_bytes(view), raw_size)
        return block

    def _decide(
        self, view: memoryview, key: _DecisionKey, size: int, mode: Target
    ) -> tuple[Candidate | None, bytes | None, bool]:
        """``(candidate, output if the sample was the whole block, freshly sampled?)``."""
        with self._lock:
            decision = self._decisions.get(key)
            if decision is not None and decision.uses < self.settings.reevaluate_every:
                decision.uses += 1
                return decision.candidate, None, False
        sampled = self._sample_and_choose(view, size, mode)
        sampled.decision.uses = 1
        with self._lock:
            self._decisions[key] = sampled.decision
        return sampled.decision.candidate, sampled.whole, True

    def _sample_and_choose(self, view: memoryview, size: int, mode: Target) -> _Sampled:
        sample, is_whole = self._sample(view, size)
        outputs: dict[Candidate, list[bytes]] = {}
        trials: list[Trial] = []
        for candidate in candidates(self.settings, mode, size):
            if candidate.codec is Codec.ZSTD:  # this thread's context: made before the clock
                _zstd_compressor(candidate.level, self._checksum)
            started = self._cpu_timer()
            frames = self._compress_piece(sample, candidate)
            elapsed = self._cpu_timer() - started
            outputs[candidate] = frames
            trials.append(Trial(candidate, len(sample), sum(map(len, frames)), elapsed))
        best = choose(trials, mode, self.settings, self.threads)
        chosen = best.candidate if best is not None else None
        whole = None
        if chosen is not None and is_whole and len(view) <= self.chunk_size:
            whole = self._payload(outputs[chosen])
        return _Sampled(Decision(chosen, tuple(trials)), whole)

    def _sample(self, view: memoryview, size: int) -> tuple[memoryview, bool]:
        """Up to ``sample_size`` bytes: the whole block if small, else ``SAMPLE_SLICES``
        element-aligned slices spread evenly from its start to its end. Many small slices: a
        weights file mixes very different tensors (MiniLM fp32, plain zstd -1: 1.092 over the
        file, 1.166 on 4 slices of 64 KiB, 1.091 on 16 of 16 KiB)."""
        total = len(view)
        budget = self.settings.sample_size
        if total <= budget:
            return view, True
        step = max(size, budget // SAMPLE_SLICES // size * size)
        last = (total - step) // size * size
        offsets = [last * i // (SAMPLE_SLICES - 1) // size * size for i in range(SAMPLE_SLICES)]
        return memoryview(b"".join(view[o : o + step] for o in offsets)), False

    def _compress_piece(self, piece: memoryview, candidate: Candidate) -> list[bytes]:
        """One codec frame, or one per byte plane when shuffled."""
        if candidate.itemsize == 1:
            return [codec_compress(candidate.codec, piece, candidate.level, self._checksum)]
        planes = shuffle(piece, candidate.itemsize)
        frames: list[bytes] = []
        offset = 0
        for length in plane_lengths(len(piece), candidate.itemsize):
            frames.append(
                codec_compress(
                    candidate.codec,
                    planes[offset : offset + length],
                    candidate.level,
                    self._checksum,
                )
            )
            offset += length
        return frames

    def _payload(self, frames: Sequence[bytes]) -> bytes:
        """A single frame as it is; several (chunks, planes) behind a chunk table."""
        return frames[0] if len(frames) == 1 else pack_chunks(self.chunk_size, frames)

    def encode_with(self, data: bytes | bytearray | memoryview, candidate: Candidate) -> Compressed:
        """Compress ``data`` with ``candidate`` (no sampling, no policy, no statistics): in
        chunks, compressed in parallel, when it is larger than one chunk (on one thread and
        without shuffle, one frame: chunking would only add a copy)."""
        view = _byte_view(data)
        raw_size = len(view)
        if not 1 <= candidate.itemsize <= MAX_SHUFFLE_ITEMSIZE:
            raise InvalidInput(f"itemsize: the shuffle takes 1 to {MAX_SHUFFLE_ITEMSIZE} bytes")
        if candidate.codec is Codec.NONE or raw_size == 0:
            return Compressed(Codec.NONE.value, _raw_bytes(view), raw_size)
        if self.threads == 1 and candidate.itemsize == 1:  # no parallelism: one frame, no join
            return Compressed(
                candidate.codec.value, self._compress_piece(view, candidate)[0], raw_size
            )
        pieces = [view[o : o + self.chunk_size] for o in range(0, raw_size, self.chunk_size)]
        if self.threads > 1 and len(pieces) > 1:
            per_piece = self._pool_map(lambda p: self._compress_piece(p, candidate), pieces)
        else:
            per_piece = [self._compress_piece(p, candidate) for p in pieces]
        frames = [frame for piece in per_piece for frame in piece]
        return Compressed(
            candidate.codec.value, self._payload(frames), raw_size, candidate.itemsize
        )

    def _pool_map(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.threads, thread_name_prefix="vrm-compress"
                )
            pool = self._pool
        return list(pool.map(fn, items))


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


__all__ = [
    "CHUNK_MAGIC",
    "DTYPE_ITEMSIZES",
    "MAX_SHUFFLE_ITEMSIZE",
    "SAMPLE_SLICES",
    "AdaptiveCompression",
    "Candidate",
    "ChunkSpan",
    "Codec",
    "CodecStats",
    "Compressed",
    "CompressionManager",
    "CompressionSettings",
    "CorruptBlock",
    "Decision",
    "NoCompression",
    "Target",
    "Trial",
    "candidates",
    "choose",
    "chunk_layout",
    "codec_compress",
    "codec_decompress",
    "decompress_block",
    "itemsize_from_hint",
    "pack_chunks",
    "plane_lengths",
    "resolve_target",
    "shuffle",
    "unshuffle",
    "unshuffle_into",
]
