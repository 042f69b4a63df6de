"""The journal on real files: sequence across reopen, torn tails, rotation, release, Behind,
reset after a snapshot, a standby's records, verify, metrics, file modes."""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import pytest

from tests.unit.replication.conftest import HOUR, JournalFactory
from vramancer.clock import ManualClock
from vramancer.errors import InvalidInput, ShuttingDown
from vramancer.observability.metrics import Metrics
from vramancer.replication.delta import Delta, open_record, read_frame, seal
from vramancer.replication.journal import Behind, JournalCorrupt, OutOfSequence
from vramancer.replication.journal_files import verify_directory
from vramancer.replication.keys import KeyRing

PAYLOAD = b'{"task": "t-1", "state": "running", "node": "n1"}' * 4


def seqs(records: list[bytes], keyring: KeyRing) -> list[int]:
    return [open_record(r, keyring, now_hour=None).seq for r in records]


def test_append_then_reopen_continues_the_sequence(
    make_journal: JournalFactory, keyring: KeyRing, clock: ManualClock
) -> None:
    journal = make_journal()
    first = journal.append("task.created", PAYLOAD)
    assert (first.seq, first.epoch, first.hour) == (1, 1, HOUR)
    clock.advance(3600)
    second = journal.append("task.updated", b"x")
    assert (second.seq, second.hour) == (2, HOUR + 1) and second.nonce != first.nonce
    journal.close()
    again = make_journal()
    assert again.last_seq == 2 and again.oldest_seq == 1
    assert again.append("task.deleted", b"").seq == 3
    records = again.read_from(0, limit=10)
    assert [open_record(r, keyring, now_hour=None) for r in records[:2]] == [first, second]
    assert seqs(again.read_from(1, limit=1), keyring) == [2]


def test_files_are_private(make_journal: JournalFactory, tmp_path: Path) -> None:
    journal = make_journal()
    journal.append("k", PAYLOAD)
    journal.set_epoch(2)
    assert stat.S_IMODE(os.stat(journal.directory).st_mode) == 0o700
    for path in journal.directory.iterdir():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    assert [p.name for p in sorted(journal.directory.glob("*.seg"))] == ["00000000000000000001.seg"]


def test_torn_tail_is_cut_at_open_and_the_journal_goes_on(
    make_journal: JournalFactory, keyring: KeyRing
) -> None:
    journal = make_journal()
    for _ in range(3):
        journal.append("k", PAYLOAD)
    segment = journal.segments()[-1]
    record_len = len(journal.read_from(2, limit=1)[0])
    journal.close()
    whole = segment.path.stat().st_size
    os.truncate(segment.path, whole - record_len // 2)  # a crash in the middle of record 3
    again = make_journal()
    assert again.last_seq == 2
    assert segment.path.stat().st_size == whole - record_len
    assert again.append("k", b"after").seq == 3
    assert again.verify().ok
    assert seqs(again.read_from(0, limit=10), keyring) == [1, 2, 3]


def test_zeros_at_the_end_are_a_torn_tail(make_journal: JournalFactory) -> None:
    journal = make_journal()
    journal.append("k", PAYLOAD)
    path = journal.segments()[-1].path
    journal.close()
    with open(path, "ab") as fh:
        fh.write(bytes(300))
    assert make_journal().last_seq == 1


def test_damage_in_the_middle_is_refused(make_journal: JournalFactory) -> None:
    journal = make_journal()
    for _ in range(3):
        journal.append("k", PAYLOAD)
    path = journal.segments()[-1].path
    journal.close()
    data = bytearray(path.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 8] = b"garbage!"
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match="damaged at byte"):
        make_journal()


def test_a_cut_older_segment_is_refused(make_journal: JournalFactory) -> None:
    journal = make_journal(segment_max_bytes=600)
    for _ in range(6):
        journal.append("k", PAYLOAD)
    oldest = journal.segments()[0].path
    journal.close()
    os.truncate(oldest, oldest.stat().st_size - 5)
    with pytest.raises(JournalCorrupt, match=oldest.name):
        make_journal(segment_max_bytes=600)


def test_rotation_past_segment_max_bytes(make_journal: JournalFactory, keyring: KeyRing) -> None:
    metrics = Metrics(node="n1")
    journal = make_journal(segment_max_bytes=500, metrics=metrics)
    deltas = [journal.append("k", PAYLOAD + bytes([i])) for i in range(12)]
    infos = journal.segments()
    assert len(infos) > 2 and journal.rotations == len(infos) - 1
    assert all(i.size_bytes <= 500 for i in infos)
    assert [i.sealed for i in infos] == [True] * (len(infos) - 1) + [False]
    assert infos[0].first_seq == 1 and infos[-1].last_seq == 12
    for before, after in itertools.pairwise(infos):
        assert after.first_seq == before.last_seq + 1
        assert after.path.name == f"{after.first_seq:020d}.seg"
    assert journal.size_bytes == sum(i.size_bytes for i in infos)
    text = metrics.render().decode()
    assert f'vramancer_ha_journal_size_bytes{{node="n1"}} {float(journal.size_bytes)}' in text
    assert f'vramancer_ha_journal_rotations_total{{node="n1"}} {float(len(infos) - 1)}' in text
    records = journal.read_from(0, limit=100)
    assert [open_record(r, keyring, now_hour=None) for r in records] == deltas
    assert seqs(journal.read_from(3, limit=5), keyring) == [4, 5, 6, 7, 8]


def test_rotate_now_and_not_twice_when_empty(make_journal: JournalFactory) -> None:
    journal = make_journal()
    journal.rotate()
    assert journal.rotations == 0  # nothing to close
    journal.append("k", b"1")
    journal.rotate()
    journal.rotate()
    assert journal.rotations == 1
    assert [(i.first_seq, i.records) for i in journal.segments()] == [(1, 1), (2, 0)]
    assert journal.append("k", b"2").seq == 2


def test_release_keeps_unacked_and_current_segments(make_journal: JournalFactory) -> None:
    journal = make_journal(segment_max_bytes=600)
    for _ in range(9):
        journal.append("k", PAYLOAD)
    infos = journal.segments()
    assert len(infos) >= 3
    # Acked up to the middle of the second segment: only the first goes.
    gone = journal.release(infos[1].first_seq)
    assert gone == [infos[0].path] and not infos[0].path.exists()
    assert journal.oldest_seq == infos[1].first_seq
    # Everything acked: every sealed segment goes, the current one stays.
    gone = journal.release(journal.last_seq)
    assert infos[-1].path.exists() and infos[-1].path not in gone
    assert [i.path for i in journal.segments()] == [infos[-1].path]
    assert journal.release(10**9) == []


def test_read_from_after_release_raises_behind(
    make_journal: JournalFactory, keyring: KeyRing
) -> None:
    journal = make_journal(segment_max_bytes=600)
    for _ in range(9):
        journal.append("k", PAYLOAD)
    first_kept = journal.segments()[1].first_seq
    journal.release(first_kept - 1)
    assert journal.oldest_seq == first_kept
    with pytest.raises(Behind) as caught:
        journal.read_from(first_kept - 2, limit=10)
    assert caught.value.details["oldest_seq"] == first_kept
    assert seqs(journal.read_from(first_kept - 1, limit=1), keyring) == [first_kept]
    assert journal.read_from(journal.last_seq, limit=10) == []


def test_reset_after_a_snapshot_starts_a_new_segment(
    make_journal: JournalFactory, keyring: KeyRing
) -> None:
    journal = make_journal()
    for _ in range(3):
        journal.append("k", PAYLOAD)
    journal.reset(100, 2)
    assert (journal.last_seq, journal.epoch) == (100, 2)
    delta = journal.append("k", b"after")
    assert (delta.seq, delta.epoch) == (101, 2)
    with pytest.raises(Behind):  # 4..100 were never journaled here: a snapshot is needed
        journal.read_from(3, limit=10)
    assert seqs(journal.read_from(100, limit=10), keyring) == [101]
    assert journal.verify().ok  # the jump is where a snapshot was installed, not a gap
    journal.close()
    again = make_journal()
    assert (again.last_seq, again.epoch, again.oldest_seq) == (101, 2, 1)
    assert again.release(100) == [again.directory / f"{1:020d}.seg"]


def test_reset_behind_the_journal_drops_the_replaced_records(
    make_journal: JournalFactory, keyring: KeyRing
) -> None:
    journal = make_journal(segment_max_bytes=600)
    for _ in range(9):
        journal.append("k", PAYLOAD)
    journal.reset(4, 3)
    assert journal.last_seq == 4
    assert seqs(journal.read_from(0, limit=100), keyring) == [1, 2, 3, 4]
    assert journal.append("k", b"new").seq == 5
    assert journal.verify().ok


def test_a_standby_journals_the_primarys_records(
    make_journal: JournalFactory, keyring: KeyRing, tmp_path: Path, clock: ManualClock
) -> None:
    standby = make_journal()
    primary_deltas = [Delta(seq, 3, HOUR, os.urandom(16), "k", PAYLOAD) for seq in (1, 2)]
    for delta in primary_deltas:
        standby.append_record(seal(delta, keyring.key(HOUR)), delta)
    assert (standby.last_seq, standby.epoch) == (2, 3)
    with pytest.raises(OutOfSequence, match="seq: 5"):
        late = Delta(5, 3, HOUR, os.urandom(16), "k", b"")
        standby.append_record(seal(late, keyring.key(HOUR)), late)
    with pytest.raises(OutOfSequence, match="epoch"):
        old = Delta(3, 2, HOUR, os.urandom(16), "k", b"")
        standby.append_record(seal(old, keyring.key(HOUR)), old)
    records = standby.read_from(0, limit=10)
    assert [read_frame(r).nonce for r in records] == [d.nonce for d in primary_deltas]


def test_epoch_is_persisted_and_never_lowered(make_journal: JournalFactory) -> None:
    journal = make_journal()
    journal.set_epoch(4)
    journal.close()
    again = make_journal()
    assert again.epoch == 4 and again.append("k", b"").epoch == 4
    with pytest.raises(OutOfSequence):
        again.set_epoch(3)


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_verify_finds_a_flipped_byte(make_journal: JournalFactory) -> None:
    journal = make_journal()
    for _ in range(4):
        journal.append("k", PAYLOAD)
    assert journal.verify().ok
    path = journal.segments()[0].path
    second = len(journal.read_from(0, limit=1)[0])  # record 2 starts where record 1 ends
    _flip(path, second + 100)  # inside record 2's payload
    report = journal.verify()
    assert not report.ok and report.records == 4
    assert [(p.segment, p.offset, p.seq, p.reason) for p in report.problems] == [
        (path.name, second, 2, "bad_signature")
    ]


def test_verify_finds_a_gap_and_a_lower_epoch(
    make_journal: JournalFactory, keyring: KeyRing
) -> None:
    journal = make_journal()
    journal.set_epoch(2)
    for _ in range(3):
        journal.append("k", PAYLOAD)
    path = journal.segments()[0].path
    journal.close()
    forged = [
        Delta(5, 2, HOUR, os.urandom(16), "k", b"skips 4"),
        Delta(6, 1, HOUR, os.urandom(16), "k", b"older epoch"),
    ]
    with open(path, "ab") as fh:
        for delta in forged:
            fh.write(seal(delta, keyring.key(HOUR)))
    report = verify_directory(path.parent, keyring)
    assert [(p.seq, p.reason) for p in report.problems] == [(5, "gap"), (6, "epoch_decreased")]
    assert (report.first_seq, report.last_seq) == (1, 6)
    with pytest.raises(JournalCorrupt, match="seq 5"):
        make_journal()  # open refuses a sequence with a hole in a segment


def test_stats(make_journal: JournalFactory) -> None:
    journal = make_journal()
    journal.append("task.created", PAYLOAD)
    journal.append("task.created", b"tiny")
    journal.append("memory.put", os.urandom(500))
    stats = journal.stats()
    assert stats["records"] == 3 and stats["segments"] == 1
    assert stats["kinds"] == {"task.created": 2, "memory.put": 1}
    assert stats["codecs"] == {"zstd": 1, "raw": 2}
    assert (stats["first_seq"], stats["last_seq"], stats["epoch"]) == (1, 3, 1)
    assert stats["bytes"] == journal.size_bytes


def test_bad_kind_or_payload_is_invalid_input(make_journal: JournalFactory) -> None:
    journal = make_journal()
    with pytest.raises(InvalidInput, match="kind"):
        journal.append("has space", b"")
    assert journal.last_seq == 0


def test_a_closed_journal_refuses_writes(make_journal: JournalFactory) -> None:
    journal = make_journal()
    journal.close()
    with pytest.raises(ShuttingDown, match="not open"):
        journal.append("k", b"")


def test_read_from_stops_at_a_snapshot_jump(make_journal: JournalFactory, keyring: KeyRing) -> None:
    journal = make_journal()
    for _ in range(3):
        journal.append("k", PAYLOAD)
    journal.reset(100, 1)
    journal.append("k", b"after")
    assert seqs(journal.read_from(1, limit=10), keyring) == [2, 3]  # not 101: 4..100 missing
    with pytest.raises(Behind):
        journal.read_from(3, limit=10)


def test_verify_finds_a_repeated_seq(make_journal: JournalFactory, keyring: KeyRing) -> None:
    journal = make_journal()
    journal.append("k", PAYLOAD)
    path = journal.segments()[0].path
    journal.close()
    with open(path, "ab") as fh:
        fh.write(seal(Delta(1, 1, HOUR, os.urandom(16), "k", b"again"), keyring.key(HOUR)))
    report = verify_directory(path.parent, keyring)
    assert [(p.offset > 0, p.seq, p.reason) for p in report.problems] == [(True, 1, "repeat")]
