"""Block compression: the store's ``CompressionManager`` (``compress(data, hint)``,
``decompress(block)``) and its default, :class:`AdaptiveCompression`.

The store compresses a block when it moves to L5 (block files on SSD) or L6 (the cold
archive); the result goes into a block file (``memory/blockfile.py``, xxh3-checked). Three
facts shape it, each in its own module:

* Dense fp16/bf16/fp32 weights barely compress as they are (about 1.1–1.3× with zstd -1), but
  their exponent bytes are very regular: splitting the bytes of each element into planes before
  the codec (a byte-plane *shuffle*, as blosc does, ``byteplanes.py``) lifts bf16 from about
  1.28× to about 1.46×. The element size comes from the caller (``itemsize``) or from a hint
  such as ``dtype=bf16``.
* One core compresses at about 0.5 GB/s, slower than an NVMe drive writes, so large blocks are
  split into chunks compressed in a thread pool here (zstandard, lz4 and zlib release the GIL;
  the codecs are ``codec.py``'s). A chunked (or shuffled) payload carries its own chunk table
  (``chunks.py``, :data:`CHUNK_MAGIC`), so it needs no field beyond :class:`Compressed`'s four
  and any container (the store's block files) holds it; chunks are decompressed in parallel too.
* Compression is a cost: a sample of the block is tried with each candidate and the choice
  (``codec_choice.py``) weighs ratio against CPU time (compressing, and decompressing
  ``expected_reads`` times) — stored raw on the fast tier (L5) unless it pays, the best ratio
  for the archive (L6). Where python-blosc2 is installed its codecs are candidates too
  (``blosc2_codec.py``): its SIMD un-shuffle decodes 16-bit blocks faster than ours.

The choice is remembered per hint (and element size and target; blocks without a hint share
one), and re-evaluated every ``reevaluate_every`` uses, or at once when a block compressed with
it did not pay. For the archive, a remembered "nothing shrinks" is not trusted: the block is
tried with the first candidate anyway.

Damaged stored data (bad checksum, truncated frame, codec error, wrong length) raises
:class:`CorruptBlock` naming the block, so one bad archive file costs that block only.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from vramancer.errors import ConfigError, InvalidInput
from vramancer.memory import blosc2_codec
from vramancer.memory.byteplanes import (
    DTYPE_ITEMSIZES,
    MAX_SHUFFLE_ITEMSIZE,
    itemsize_from_hint,
    plane_lengths,
    shuffle,
    unshuffle,
    unshuffle_into,
)
from vramancer.memory.chunks import (
    CHUNK_MAGIC,
    ChunkSpan,
    chunk_layout,
    decompress_block,
    pack_chunks,
)
from vramancer.memory.codec import (
    Codec,
    CodecUnavailable,
    Compressed,
    CorruptBlock,
    codec_compress,
    codec_decompress,
    zstd_compressor,
)
from vramancer.memory.codec_choice import (
    Candidate,
    Decision,
    Target,
    Trial,
    candidates,
    choose,
    resolve_target,
)
from vramancer.units import MIB, Size

_T = TypeVar("_T")
_R = TypeVar("_R")

#: Slices a block's sample is taken from.
SAMPLE_SLICES = 16


class CompressionSettings(BaseModel):
    """``[memory.compression]``: codecs, levels and the "is it worth it" thresholds."""

    model_config = ConfigDict(extra="forbid")

    #: Off: every block is stored raw, on every tier.
    enabled: bool = True
    #: Codecs tried, in this order (the order breaks ties); blosc2's (``b2…``) only where
    #: python-blosc2 can be imported.
    codecs: list[Codec] = Field(
        default_factory=lambda: [
            Codec.ZSTD,
            Codec.LZ4,
            Codec.GZIP,
            Codec.B2_ZSTD,
            Codec.B2_LZ4,
            Codec.B2_ZSTD_BITSHUFFLE,
        ],
        min_length=1,
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
    #: the payload (xxh3), and it costs 10–15 % of zstd's speed. blosc2 chunks have none.
    checksum: bool = False
    #: A remembered choice is re-tried on a sample after this many uses.
    reevaluate_every: int = Field(default=64, ge=1)
    #: Decompressions expected per stored block: the ranking counts a candidate's CPU time to
    #: compress the sample plus this many times its time to decompress it (a block moved down
    #: is read back about once). 0: compression alone (the sample is not decoded).
    expected_reads: float = Field(default=1.0, ge=0.0, le=1000.0)


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
        listed = [c for c in self.settings.codecs if c is not Codec.NONE]
        if listed and not any(c.available for c in listed):
            raise ConfigError(
                "memory.compression.codecs: "
                + ", ".join(c.value for c in listed)
                + f" need the python package {blosc2_codec.PACKAGE!r}, which cannot be imported"
                f" ({blosc2_codec.INSTALL}); list zstd, lz4 or gzip too"
            )

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
            return decompress_block(block, what=what, map_fn=self._pool_map, threads=self.threads)
        return decompress_block(block, what=what, threads=self.threads)

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
            listed = candidates(self.settings, mode, shuffle_size)
            candidate = listed[0] if listed else None
        if candidate is None:
            return Compressed(Codec.NONE.value, _raw_bytes(view), raw_size)
        if whole is not None:
            block = Compressed(candidate.codec.value, whole, raw_size, _stored_itemsize(candidate))
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
        reads = self.settings.expected_reads
        for candidate in candidates(self.settings, mode, size):
            if candidate.codec is Codec.ZSTD:  # this thread's context: made before the clock
                zstd_compressor(candidate.level, self._checksum)
            started = self._cpu_timer()
            frames = self._compress_piece(sample, candidate, threads=1)
            elapsed = self._cpu_timer() - started
            outputs[candidate] = frames
            decode_s = self._decode_time(sample, candidate, frames) if reads else 0.0
            stored = sum(map(len, frames))
            trials.append(Trial(candidate, len(sample), stored, elapsed, decode_s, reads))
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

    def _decode_time(self, sample: memoryview, candidate: Candidate, frames: list[bytes]) -> float:
        """CPU-seconds to decode ``frames`` (the sample compressed with ``candidate``) on one
        thread, as a read of the block would (the payload is assembled before the clock)."""
        raw = len(sample)
        payload = frames[0] if len(frames) == 1 else pack_chunks(raw, frames)
        block = Compressed(candidate.codec.value, payload, raw, _stored_itemsize(candidate))
        started = self._cpu_timer()
        decompress_block(block, what="sample")
        return self._cpu_timer() - started

    def _compress_piece(
        self, piece: memoryview, candidate: Candidate, *, threads: int = 1
    ) -> list[bytes]:
        """One codec frame, or one per byte plane when shuffled (blosc2: one chunk, its own
        shuffle inside, on ``threads`` of its own)."""
        if candidate.codec.is_blosc2:
            return [
                codec_compress(
                    candidate.codec,
                    piece,
                    candidate.level,
                    typesize=candidate.itemsize,
                    threads=threads,
                )
            ]
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
        if candidate.codec.is_blosc2:
            return self._encode_blosc2(view, candidate)
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

    def _encode_blosc2(self, view: memoryview, candidate: Candidate) -> Compressed:
        """Chunks one after another (blosc2 holds the GIL), each on blosc2's own threads."""
        frames = [
            frame
            for offset in range(0, len(view), self.chunk_size)
            for frame in self._compress_piece(
                view[offset : offset + self.chunk_size], candidate, threads=self.threads
            )
        ]
        return Compressed(candidate.codec.value, self._payload(frames), len(view))

    def _pool_map(self, fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.threads, thread_name_prefix="vrm-compress"
                )
            pool = self._pool
        return list(pool.map(fn, items))


def _stored_itemsize(candidate: Candidate) -> int:
    """The element size a block records: blosc2 chunks carry their own (1 here)."""
    return 1 if candidate.codec.is_blosc2 else candidate.itemsize


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
    "CodecUnavailable",
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
