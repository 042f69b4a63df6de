"""Which codec a block gets, from trials on a sample: pure functions over measured
:class:`Trial` s (no compression here; ``AdaptiveCompression`` runs the trials and remembers the
choice per hint).

For the fast tier (``Target.FAST``, L5) the block is stored raw unless some codec reaches
``min_ratio`` at ``min_bytes_per_s``; among those that do, the one that saves most bytes per
CPU-second wins (the CPU-seconds of compressing the block and of the ``expected_reads``
decompressions: blosc2 decodes shuffled 16-bit blocks faster than ours, and a block moved down
is read back on the critical path). For the archive (``Target.ARCHIVE``, L6, or
``force=True``) the best ratio wins, always (ratios within ``archive_ratio_slack`` count as
equal, and the same score decides among them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from vramancer.errors import InvalidInput
from vramancer.memory.codec import Codec

if TYPE_CHECKING:
    from vramancer.memory.compression import CompressionSettings


class Target(StrEnum):
    """Where a compressed block is going, which decides how hard compression tries."""

    #: L5 and other fast tiers: compress only when the sampled ratio and speed pay for it.
    FAST = "fast"
    #: L6 cold archive: always compress, with the codec of best ratio.
    ARCHIVE = "archive"


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
        kind = "bitshuffle" if self.codec is Codec.B2_ZSTD_BITSHUFFLE else "shuffle"
        shuffled = f"+{kind}{self.itemsize}" if self.itemsize > 1 else ""
        return f"{self.codec.value}{level}{shuffled}"


@dataclass(frozen=True, slots=True)
class Trial:
    """What one candidate did to a sample: sizes and the CPU time it took (shuffle included)
    to compress it, and to decompress it (``decode_cpu_s``, counted ``reads`` times)."""

    candidate: Candidate
    raw_bytes: int
    stored_bytes: int
    cpu_s: float
    decode_cpu_s: float = 0.0
    #: Decompressions expected per stored block (``expected_reads``): 0 ranks compression alone.
    reads: float = 0.0

    @property
    def ratio(self) -> float:
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def bytes_per_s(self) -> float:
        """Raw bytes compressed per CPU-second (one core)."""
        return self.raw_bytes / max(self.cpu_s, 1e-9)

    @property
    def saved_bytes_per_s(self) -> float:
        """Bytes saved per CPU-second of compressing and the expected reads,
        ``(raw − stored) / (cpu_s + reads × decode_cpu_s)``: the ranking score."""
        cpu_s = self.cpu_s + self.reads * self.decode_cpu_s
        return (self.raw_bytes - self.stored_bytes) / max(cpu_s, 1e-9)

    @property
    def saved_bytes_per_compress_s(self) -> float:
        """Bytes saved per CPU-second of compressing alone (against a device's write speed)."""
        return (self.raw_bytes - self.stored_bytes) / max(self.cpu_s, 1e-9)


#: blosc2's levels (its own ``clevel`` scale, the same for both targets): clevel 3 gives
#: zstd-3's ratio at a third to two thirds of its speed, so the archive does not try it.
BLOSC2_LEVELS = {Codec.B2_ZSTD: 1, Codec.B2_LZ4: 5, Codec.B2_ZSTD_BITSHUFFLE: 1}


def candidates(settings: CompressionSettings, target: Target, itemsize: int) -> list[Candidate]:
    """Every candidate, in trial order: per codec, each level (the archive also tries its own
    levels after the fast ones), each shuffled first (when an element size is known), then
    plain. Codecs whose library is missing (blosc2's) are left out; blosc2's bit shuffle is
    tried only shuffled."""
    archive = target is Target.ARCHIVE
    levels = {
        Codec.ZSTD: [settings.zstd_level] + ([settings.archive_zstd_level] if archive else []),
        Codec.GZIP: [settings.gzip_level] + ([settings.archive_gzip_level] if archive else []),
        Codec.LZ4: [0],
    } | {codec: [level] for codec, level in BLOSC2_LEVELS.items()}
    shuffles = [itemsize, 1] if settings.shuffle and itemsize > 1 else [1]
    result: list[Candidate] = []
    for codec in dict.fromkeys(settings.codecs):
        if codec is Codec.NONE or not codec.available:
            continue
        sizes = shuffles[:-1] if codec is Codec.B2_ZSTD_BITSHUFFLE else shuffles
        for level in dict.fromkeys(levels[codec]):
            result.extend(Candidate(codec, level, size) for size in sizes)
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
    saved per CPU-second (compression and expected reads). Ties go to the earlier trial.
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
            or t.saved_bytes_per_compress_s * threads >= settings.device_write_bytes_per_s
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
