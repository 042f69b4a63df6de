"""``vramancer journal verify|replay|stats``, run as the real console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.replication.conftest import SECRET
from vramancer.clock import ManualClock
from vramancer.replication.journal import Journal
from vramancer.replication.journal_files import journal_dir
from vramancer.replication.keys import KeyRing

PAYLOAD = b'{"task": "t-1", "state": "running"}' * 6


def vramancer() -> str:
    found = shutil.which("vramancer", path=str(Path(sys.executable).parent))
    assert found, "the vramancer console script is not installed beside this Python"
    return found


def run(
    data_dir: Path, *args: str, secret: bytes | None = SECRET
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VRM_")}
    env["VRM_CONFIG"] = ""
    env["COLUMNS"] = "200"  # help text on one line
    if secret is not None:
        env["VRM_HA_SECRET"] = secret.decode()
    return subprocess.run(
        [vramancer(), "journal", *args, "--data-dir", str(data_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data directory whose journal holds 5 deltas over two segments, the first two of an
    earlier hour."""
    clock = ManualClock()
    journal = Journal(
        journal_dir(tmp_path),
        KeyRing(SECRET),
        segment_max_bytes=300,
        fsync=False,
        clock=clock,
    )
    journal.open()
    for i in range(5):
        journal.append("task.created" if i % 2 else "memory.put", PAYLOAD + bytes([i]))
        clock.advance(1800)
    assert len(journal.segments()) >= 2
    journal.close()
    return tmp_path


def test_verify_a_good_journal(data_dir: Path) -> None:
    done = run(data_dir, "verify")
    assert done.returncode == 0, done.stderr
    assert "5 records" in done.stdout and "ok" in done.stdout
    report = json.loads(run(data_dir, "verify", "--json").stdout)
    assert (report["ok"], report["records"], report["last_seq"]) == (True, 5, 5)


def test_verify_a_damaged_journal_names_the_problem(data_dir: Path) -> None:
    segment = sorted(journal_dir(data_dir).glob("*.seg"))[0]
    data = bytearray(segment.read_bytes())
    data[-10] ^= 0xFF  # inside the MAC of the segment's last record
    segment.write_bytes(bytes(data))
    done = run(data_dir, "verify")
    assert done.returncode == 1
    assert f"{segment.name} byte" in done.stdout and "bad_signature" in done.stdout
    report = json.loads(run(data_dir, "verify", "--json").stdout)
    assert [p["reason"] for p in report["problems"]] == ["bad_signature"]


def test_verify_needs_the_secret(data_dir: Path) -> None:
    done = run(data_dir, "verify", secret=None)
    assert done.returncode == 2 and "VRM_HA_SECRET" in done.stderr
    done = run(data_dir, "verify", secret=b"short")
    assert done.returncode == 2 and "at least 32 bytes" in done.stderr
    wrong = run(data_dir, "verify", secret=b"w" * 32)
    assert wrong.returncode == 1 and wrong.stdout.count("bad_signature") == 5


def test_replay_prints_each_delta_and_stats_counts(data_dir: Path) -> None:
    done = run(data_dir, "replay", "--json", "--from", "3")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["seq"] for r in rows] == [3, 4, 5]
    assert rows[0] == {
        "seq": 3,
        "epoch": 1,
        "hour": rows[0]["hour"],
        "kind": "memory.put",
        "payload_bytes": len(PAYLOAD) + 1,
    }
    assert rows[-1]["hour"] == rows[0]["hour"] + 1
    people = run(data_dir, "replay")
    assert people.returncode == 0 and len(people.stdout.splitlines()) == 5
    assert "nothing is applied" in run(data_dir, "replay", "--help").stdout
    stats = json.loads(run(data_dir, "stats", "--json", secret=None).stdout)
    assert stats["records"] == 5 and stats["kinds"] == {"memory.put": 3, "task.created": 2}


def test_no_journal_is_a_clear_error(tmp_path: Path) -> None:
    done = run(tmp_path, "stats")
    assert done.returncode == 2 and "no journal at" in done.stderr
