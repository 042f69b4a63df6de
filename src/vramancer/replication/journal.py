"""The replication journal: every delta a node acknowledged (or applied, on a standby), sealed
and appended to segment files that rotate, read back by sequence for shipping, and released
once every peer holds them.

Files (0700 directory, 0600 files): ``<first seq, 20 digits>.seg`` segments and
``journal.json`` (epoch, snapshot restarts; written atomically). Within a segment the sequence
has no gap, so a segment's in-memory index is its first seq and the offset of each record.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import threading
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from vramancer.clock import Clock
from vramancer.errors import ConfigError, Conflict, InvalidInput, ShuttingDown
from vramancer.files import fsync_dir, open_private, private_dir
from vramancer.observability.metrics import Metrics
from vramancer.replication.delta import Delta, new_nonce, read_frame, seal
from vramancer.replication.journal_files import (
    STATE_FILE,
    JournalState,
    VerifyReport,
    read_state,
    scan,
    segment_name,
    segment_paths,
    stats_directory,
    verify_directory,
)
from vramancer.replication.keys import KeyRing, hour_of

log = logging.getLogger(__name__)


class JournalCorrupt(ConfigError):
    """The journal cannot be opened: damage that is not a torn tail (the message says where)."""

    code = "journal_corrupt"


class Behind(Conflict):
    """The records asked for were released (or skipped by a snapshot install): the peer needs
    a snapshot. ``details["oldest_seq"]`` is the oldest record held."""

    code = "behind"


class OutOfSequence(Conflict):
    """A record whose seq is not the next one, or whose epoch is older than the journal's."""

    code = "out_of_sequence"


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    path: Path
    first_seq: int
    #: ``first_seq - 1`` for a segment without records.
    last_seq: int
    size_bytes: int
    records: int
    #: No longer written to (every segment but the current one).
    sealed: bool


@dataclass(slots=True)
class _Segment:
    path: Path
    first_seq: int
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    size: int = 0

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.offsets) - 1

    def span(self, seq: int) -> tuple[int, int]:
        """Byte range of record ``seq`` (held by this segment)."""
        i = seq - self.first_seq
        end = self.offsets[i + 1] if i + 1 < len(self.offsets) else self.size
        return self.offsets[i], end


class Journal:
    """Append-only, rotating, signed journal of deltas (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        keyring: KeyRing,
        *,
        segment_max_bytes: int,
        fsync: bool,
        clock: Clock,
        metrics: Metrics | None = None,
    ) -> None:
        if segment_max_bytes < 1:
            raise InvalidInput(f"segment_max_bytes: must be positive, got {segment_max_bytes}")
        self.directory = directory
        self.keyring = keyring
        self.segment_max_bytes = segment_max_bytes
        self.fsync = fsync
        self.clock = clock
        self.last_seq = 0
        self.epoch = JournalState().epoch
        self.rotations = 0
        self._resets: tuple[int, ...] = ()
        self._segments: list[_Segment] = []
        self._fd: int | None = None
        self._lock = threading.RLock()
        self._size_gauge: Gauge | None = None
        self._rotations_counter: Counter | None = None
        if metrics is not None:
            self._size_gauge = metrics.gauge(
                "vramancer_ha_journal_size_bytes", "Bytes held by the HA replication journal."
            )
            self._rotations_counter = metrics.counter(
                "vramancer_ha_journal_rotations_total", "Journal segments started by rotation."
            )

    # ------------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Create or load the journal; cut a torn tail of the newest segment; ``JournalCorrupt``
        for any other damage."""
        with self._lock:
            private_dir(self.directory)
            try:
                state = read_state(self.directory)
            except ValueError as exc:
                raise JournalCorrupt(f"journal state: {exc}") from None
            self._resets = state.resets
            paths = segment_paths(self.directory)
            self._segments = []
            epoch = state.epoch
            for index, (first_seq, path) in enumerate(paths):
                segment, last_epoch = self._load(first_seq, path, newest=index == len(paths) - 1)
                self._check_order(segment)
                self._segments.append(segment)
                epoch = max(epoch, last_epoch)
            self.epoch = epoch
            if not self._segments:
                self._segments.append(self._create(1))
            self.last_seq = self._segments[-1].last_seq
            self._fd = open_private(self._segments[-1].path, append=True)
            self._publish()

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _load(self, first_seq: int, path: Path, *, newest: bool) -> tuple[_Segment, int]:
        data = path.read_bytes()
        found = scan(data)
        if found.error is not None:
            if not (newest and found.torn_tail):
                raise JournalCorrupt(
                    f"journal segment {path} is damaged at byte {found.good_end}: "
                    f"{found.error.message}; `vramancer journal verify` lists the damage"
                )
            log.warning(
                "journal segment %s: cutting a torn tail of %d bytes at byte %d",
                path,
                found.size - found.good_end,
                found.good_end,
            )
            os.truncate(path, found.good_end)
            if self.fsync:
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        segment = _Segment(
            path, first_seq, array("Q", (o for o, _ in found.frames)), found.good_end
        )
        epoch = 0
        for i, (offset, frame) in enumerate(found.frames):
            if frame.seq != first_seq + i:
                raise JournalCorrupt(
                    f"journal segment {path}: seq {frame.seq} at byte {offset} where "
                    f"{first_seq + i} was expected; `vramancer journal verify` lists the damage"
                )
            epoch = frame.epoch
        return segment, epoch

    def _check_open(self) -> None:
        if self._fd is None:
            raise ShuttingDown("the HA journal is not open")

    def _check_order(self, segment: _Segment) -> None:
        if self._segments and segment.first_seq <= self._segments[-1].last_seq:
            raise JournalCorrupt(
                f"journal segment {segment.path} starts at seq {segment.first_seq}, which the "
                f"segment before it already holds"
            )

    # ------------------------------------------------------------------ properties

    @property
    def oldest_seq(self) -> int:
        """Seq of the oldest record held (``last_seq + 1`` when none is)."""
        with self._lock:
            return self._segments[0].first_seq if self._segments else self.last_seq + 1

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(s.size for s in self._segments)

    # ------------------------------------------------------------------ writing

    def set_epoch(self, epoch: int) -> None:
        """Raise the epoch (a promotion, or a newer primary's); persisted before returning."""
        with self._lock:
            self._check_open()
            if epoch < self.epoch:
                raise OutOfSequence(f"epoch: {epoch} is older than the journal's {self.epoch}")
            if epoch != self.epoch:
                self.epoch = epoch
                self._save_state()

    def append(self, kind: str, payload: bytes) -> Delta:
        """Journal a new delta: the next seq, this epoch, this hour, a fresh nonce."""
        return self.append_many([(kind, payload)])[0]

    def append_many(self, items: Sequence[tuple[str, bytes]]) -> list[Delta]:
        """Journal several deltas in order, durable together: one fsync for the batch (with
        ``fsync``) once every record is written, so a batch costs one disk flush, not one
        per delta."""
        with self._lock:
            self._check_open()
            out = []
            for kind, payload in items:
                hour = hour_of(self.clock.time())
                delta = Delta(self.last_seq + 1, self.epoch, hour, new_nonce(), kind, payload)
                try:
                    record = seal(delta, self.keyring.key(hour))
                except ValueError as exc:
                    raise InvalidInput(str(exc)) from None
                self._write(record, sync=False)
                out.append(delta)
            if out and self.fsync and self._fd is not None:
                os.fsync(self._fd)
            return out

    def append_record(self, record: bytes, delta: Delta) -> None:
        """Journal a record sealed elsewhere (a standby keeps the primary's seq and epoch)."""
        self.append_records([(record, delta)])

    def append_records(self, items: Sequence[tuple[bytes, Delta]]) -> None:
        """``append_record`` for a batch received in order: one fsync for all of it (with
        ``fsync``), as ``append_many`` on a primary."""
        with self._lock:
            self._check_open()
            for record, delta in items:
                self._check_next(record, delta)
                if delta.epoch > self.epoch:
                    self.set_epoch(delta.epoch)
                self._write(record, sync=False)
            if items and self.fsync and self._fd is not None:
                os.fsync(self._fd)

    def _check_next(self, record: bytes, delta: Delta) -> None:
        if delta.seq != self.last_seq + 1:
            raise OutOfSequence(
                f"seq: {delta.seq} is not the next one ({self.last_seq + 1})",
                last_seq=self.last_seq,
            )
        if delta.epoch < self.epoch:
            raise OutOfSequence(f"epoch: {delta.epoch} is older than the journal's {self.epoch}")
        frame = read_frame(record)
        if (frame.length, frame.seq, frame.epoch) != (len(record), delta.seq, delta.epoch):
            raise InvalidInput("record: does not hold the delta given with it")

    def _write(self, record: bytes, *, sync: bool = True) -> None:
        current = self._segments[-1]
        if current.size and current.size + len(record) > self.segment_max_bytes:
            self._rotate()
            current = self._segments[-1]
        assert self._fd is not None
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(self._fd, view) :]
            if self.fsync and sync:
                os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, current.size)
            raise
        current.offsets.append(current.size)
        current.size += len(record)
        self.last_seq += 1
        self._publish()

    def rotate(self) -> None:
        """Start a new segment now (nothing happens when the current one is empty)."""
        with self._lock:
            self._check_open()
            if self._segments[-1].offsets:
                self._rotate()

    def _rotate(self) -> None:
        self._start_segment(self.last_seq + 1)
        self.rotations += 1
        if self._rotations_counter is not None:
            self._rotations_counter.inc()

    def _start_segment(self, first_seq: int) -> None:
        if self._fd is not None:
            if self.fsync:
                os.fsync(self._fd)  # a batch may have written into it without a flush yet
            os.close(self._fd)
            self._fd = None
        current = self._segments[-1] if self._segments else None
        if current is not None and not current.offsets:
            current.path.unlink(missing_ok=True)  # an empty segment is replaced, not kept
            self._segments.pop()
        self._segments.append(self._create(first_seq))
        self._fd = open_private(self._segments[-1].path, append=True)

    def _create(self, first_seq: int) -> _Segment:
        path = self.directory / segment_name(first_seq)
        os.close(open_private(path))
        if self.fsync:
            fsync_dir(self.directory)
        return _Segment(path, first_seq)

    def reset(self, last_seq: int, epoch: int) -> None:
        """After a snapshot install: the next record is ``last_seq + 1`` in a new segment.
        Records after ``last_seq`` (a history the snapshot replaces) are dropped; older
        segments stay until released."""
        with self._lock:
            self._check_open()
            if last_seq < 0:
                raise InvalidInput(f"last_seq: must be >= 0, got {last_seq}")
            if epoch < self.epoch:
                raise OutOfSequence(f"epoch: {epoch} is older than the journal's {self.epoch}")
            self._drop_after(last_seq)
            self._start_segment(last_seq + 1)
            self.last_seq = last_seq
            self.epoch = epoch
            self._resets = (*(r for r in self._resets if r <= last_seq), last_seq + 1)
            self._save_state()
            self._publish()

    def _drop_after(self, last_seq: int) -> None:
        while self._segments and self._segments[-1].first_seq > last_seq + 1:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._segments.pop().path.unlink(missing_ok=True)
        segment = self._segments[-1] if self._segments else None
        if segment is not None and segment.last_seq > last_seq:
            keep = last_seq - segment.first_seq + 1
            segment.size = segment.offsets[keep] if keep < len(segment.offsets) else segment.size
            del segment.offsets[keep:]
            os.truncate(segment.path, segment.size)

    def release(self, acked_seq: int) -> list[Path]:
        """Delete the oldest segments whose every record has seq <= ``acked_seq`` (never the
        current one); the deleted paths."""
        with self._lock:
            self._check_open()
            gone: list[Path] = []
            while len(self._segments) > 1 and self._segments[0].last_seq <= acked_seq:
                segment = self._segments.pop(0)
                segment.path.unlink(missing_ok=True)
                gone.append(segment.path)
            if gone:
                oldest = self._segments[0].first_seq
                self._resets = tuple(r for r in self._resets if r > oldest)
                self._save_state()
                self._publish()
            return gone

    def _save_state(self) -> None:
        """Write ``journal.json`` atomically (a temporary file renamed over it)."""
        state = JournalState(self.epoch, self._resets)
        path = self.directory / STATE_FILE
        temporary = path.with_suffix(".tmp")
        fd = open_private(temporary)
        try:
            os.write(fd, state.as_json())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
        fsync_dir(self.directory)

    def _publish(self) -> None:
        if self._size_gauge is not None:
            self._size_gauge.set(sum(s.size for s in self._segments))

    # ------------------------------------------------------------------ reading

    def read_from(self, after_seq: int, *, limit: int) -> list[bytes]:
        """Up to ``limit`` sealed records with seq > ``after_seq``, in order; ``Behind`` when
        some of them are no longer held."""
        with self._lock:
            self._check_open()
            if after_seq >= self.last_seq:
                return []
            index = self._check_held(after_seq)
            records: list[bytes] = []
            seq = after_seq + 1
            for segment in self._segments[index:]:
                # Stop at a jump in the sequence (a snapshot install): the next call says Behind.
                if len(records) >= limit or segment.first_seq > seq:
                    break
                count = min(limit - len(records), segment.last_seq - seq + 1)
                if count > 0:
                    records += _read(segment, seq, count)
                    seq += count
            return records

    def _check_held(self, after_seq: int) -> int:
        """Index of the segment that holds record ``after_seq + 1`` (``after_seq`` below
        ``last_seq``); ``Behind`` when it was released or skipped by a snapshot install."""
        firsts = [s.first_seq for s in self._segments]
        index = max(bisect.bisect_right(firsts, after_seq + 1) - 1, 0)
        segment = self._segments[index]
        held = segment.first_seq <= after_seq + 1 <= segment.last_seq
        if not held:
            raise Behind(
                f"records after seq {after_seq} are no longer held (oldest: {self.oldest_seq})",
                oldest_seq=self.oldest_seq,
            )
        return index

    def segments(self) -> list[SegmentInfo]:
        with self._lock:
            last = len(self._segments) - 1
            return [
                SegmentInfo(s.path, s.first_seq, s.last_seq, s.size, len(s.offsets), i != last)
                for i, s in enumerate(self._segments)
            ]

    def verify(self) -> VerifyReport:
        """Every signature (whatever its hour) and the sequence of the whole journal."""
        with self._lock:
            return verify_directory(self.directory, self.keyring)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            found = stats_directory(self.directory)
            return {**found, "epoch": self.epoch, "rotations": self.rotations}


def _read(segment: _Segment, seq: int, count: int) -> list[bytes]:
    """``count`` records from ``seq`` on, read from the segment file in one piece."""
    start, _ = segment.span(seq)
    _, end = segment.span(seq + count - 1)
    with open(segment.path, "rb") as fh:
        fh.seek(start)
        data = fh.read(end - start)
    bounds = [
        *(segment.offsets[seq - segment.first_seq + i] - start for i in range(count)),
        end - start,
    ]
    return [data[bounds[i] : bounds[i + 1]] for i in range(count)]


__all__ = [
    "Behind",
    "Journal",
    "JournalCorrupt",
    "OutOfSequence",
    "SegmentInfo",
    "VerifyReport",
]
