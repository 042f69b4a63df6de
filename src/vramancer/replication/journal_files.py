"""The journal's files, read without changing them: segment names, scans, ``verify`` and
``stats``. ``Journal`` (``journal.py``) writes; ``vramancer journal`` reads through this module
alone, so it never cuts or deletes anything.

A journal directory holds segments ``<first seq, 20 digits>.seg`` (records concatenated, see
``delta.py``) and ``journal.json`` (the epoch, and the first seqs of segments started by a
snapshot install, where a jump in the sequence is expected).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vramancer.replication.codec import Codec
from vramancer.replication.delta import (
    Corrupt,
    DeltaError,
    Frame,
    Truncated,
    delta_of,
    iter_frames,
    signature_ok,
)
from vramancer.replication.keys import KeyRing

SEGMENT_SUFFIX = ".seg"
STATE_FILE = "journal.json"
_SEGMENT_NAME = re.compile(r"(\d{20})\.seg")
#: Epoch of a journal that never had one set (the first primary's).
FIRST_EPOCH = 1


def journal_dir(data_dir: Path) -> Path:
    """Where a node keeps its journal: ``<data_dir>/ha/journal``."""
    return data_dir / "ha" / "journal"


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def segment_paths(directory: Path) -> list[tuple[int, Path]]:
    """(first seq, path) of every segment, oldest first; other files are left out."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _SEGMENT_NAME.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


@dataclass(frozen=True, slots=True)
class JournalState:
    """``journal.json``: the epoch, and where snapshot installs restarted the sequence."""

    epoch: int = FIRST_EPOCH
    resets: tuple[int, ...] = ()

    def as_json(self) -> bytes:
        return json.dumps({"epoch": self.epoch, "resets": list(self.resets)}).encode()


def read_state(directory: Path) -> JournalState:
    """The state file, or the defaults when there is none; ``ValueError`` when unreadable."""
    path = directory / STATE_FILE
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        return JournalState()
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} cannot be read: {exc}") from exc
    epoch, resets = raw.get("epoch"), raw.get("resets", [])
    if not isinstance(epoch, int) or not all(isinstance(r, int) for r in resets):
        raise ValueError(f"{path}: epoch must be an integer and resets a list of integers")
    return JournalState(epoch, tuple(resets))


@dataclass(slots=True)
class Scan:
    """The records of one segment as far as they frame, and where framing stopped."""

    frames: list[tuple[int, Frame]]
    size: int
    #: Offset just past the last whole record.
    good_end: int
    error: Corrupt | None = None
    zero_tail: bool = False

    @property
    def torn_tail(self) -> bool:
        """The bytes after ``good_end`` look like a write cut short (a crash mid-append): a
        record whose end is missing, or nothing but zeros."""
        return isinstance(self.error, Truncated) or self.zero_tail


def scan(data: bytes | memoryview) -> Scan:
    """Frame every record of a segment's bytes (signatures are not checked)."""
    frames: list[tuple[int, Frame]] = []
    good_end = 0
    try:
        for offset, frame in iter_frames(data):
            frames.append((offset, frame))
            good_end = offset + frame.length
    except Corrupt as exc:
        tail = bytes(data[good_end:])
        return Scan(frames, len(data), good_end, exc, zero_tail=not tail.strip(b"\0"))
    return Scan(frames, len(data), good_end)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a journal: in which segment, at which byte, which record."""

    segment: str
    offset: int
    seq: int | None
    reason: str
    message: str


@dataclass(slots=True)
class VerifyReport:
    segments: int = 0
    records: int = 0
    bytes: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


@dataclass(slots=True)
class _Walk:
    """What ``verify`` carries from one record to the next."""

    report: VerifyReport
    resets: frozenset[int]
    expected: int | None = None
    epoch: int = 0


def verify_directory(directory: Path, keyring: KeyRing) -> VerifyReport:
    """Check every record of the journal in ``directory``: its frame, its signature (under the
    key of its own hour, however old), that its payload decodes, and the sequence (no gap but
    at a snapshot install, no repeat, epochs never decrease)."""
    try:
        state = read_state(directory)
    except ValueError as exc:
        report = VerifyReport()
        report.problems.append(Problem(STATE_FILE, 0, None, "corrupt", str(exc)))
        return report
    walk = _Walk(VerifyReport(), frozenset(state.resets))
    for first_seq, path in segment_paths(directory):
        _verify_segment(walk, first_seq, path, keyring)
    return walk.report


def _verify_segment(walk: _Walk, first_seq: int, path: Path, keyring: KeyRing) -> None:
    report = walk.report
    data = path.read_bytes()
    report.segments += 1
    report.bytes += len(data)
    if walk.expected is not None and first_seq != walk.expected and first_seq not in walk.resets:
        reason = "gap" if first_seq > walk.expected else "repeat"
        report.problems.append(
            Problem(
                path.name,
                0,
                first_seq,
                reason,
                f"segment starts at {first_seq}, {walk.expected} expected",
            )
        )
    walk.expected = first_seq
    found = scan(data)
    for offset, frame in found.frames:
        _verify_record(walk, path.name, data, offset, frame, keyring)
    if found.error is not None:
        reason = "truncated" if found.torn_tail else "corrupt"
        report.problems.append(
            Problem(path.name, found.good_end, None, reason, found.error.message)
        )


def _verify_record(
    walk: _Walk, segment: str, data: bytes, offset: int, frame: Frame, keyring: KeyRing
) -> None:
    report = walk.report
    report.records += 1
    if report.first_seq is None:
        report.first_seq = frame.seq
    report.last_seq = frame.seq

    def problem(reason: str, message: str) -> None:
        report.problems.append(Problem(segment, offset, frame.seq, reason, message))

    if not signature_ok(data, frame, keyring.key(frame.hour), offset):
        problem("bad_signature", "signature does not match")
    else:
        try:
            delta_of(data, frame, offset)
        except DeltaError as exc:
            problem("corrupt", exc.message)
    expected = walk.expected
    if expected is not None and frame.seq != expected:
        kind = "gap" if frame.seq > expected else "repeat"
        problem(kind, f"seq {frame.seq} where {expected} was expected")
    if frame.epoch < walk.epoch:
        problem("epoch_decreased", f"epoch {frame.epoch} after epoch {walk.epoch}")
    walk.epoch = max(walk.epoch, frame.epoch)
    walk.expected = frame.seq + 1


def iter_records(directory: Path, after_seq: int = 0) -> Iterator[tuple[Path, int, bytes]]:
    """(segment, offset, record) of every whole record with seq > ``after_seq``, oldest first,
    unverified; framing errors end a segment's records (``verify`` names them)."""
    paths = segment_paths(directory)
    for index, (_first_seq, path) in enumerate(paths):
        following = paths[index + 1][0] if index + 1 < len(paths) else None
        if following is not None and following <= after_seq + 1:
            continue
        data = path.read_bytes()
        for offset, frame in scan(data).frames:
            if frame.seq > after_seq:
                yield path, offset, data[offset : offset + frame.length]


def stats_directory(directory: Path) -> dict[str, Any]:
    """Segments, records, bytes, counts per kind and per codec, first and last seq, epoch (from
    the frames; signatures are not checked)."""
    kinds: Counter[str] = Counter()
    codecs: Counter[str] = Counter()
    out: dict[str, Any] = {"segments": 0, "records": 0, "bytes": 0}
    first = last = None
    epoch = 0
    for _, path in segment_paths(directory):
        data = path.read_bytes()
        out["segments"] += 1
        out["bytes"] += len(data)
        for _, frame in scan(data).frames:
            out["records"] += 1
            kinds[frame.kind] += 1
            codecs[_codec_name(frame.codec)] += 1
            first = frame.seq if first is None else first
            last = frame.seq
            epoch = max(epoch, frame.epoch)
    with contextlib.suppress(ValueError):
        epoch = max(epoch, read_state(directory).epoch)
    return {
        **out,
        "kinds": dict(kinds),
        "codecs": dict(codecs),
        "first_seq": first,
        "last_seq": last,
        "epoch": epoch or FIRST_EPOCH,
    }


def _codec_name(codec_id: int) -> str:
    try:
        return Codec(codec_id).name.lower()
    except ValueError:
        return f"unknown-{codec_id}"
