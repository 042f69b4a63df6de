"""HA journal append rate beside a plain append of the same bytes, run side by side.

``python -m bench.ha_journal [--runs 5] [--n 500] [--dir DIR] [--json]``

For each payload size (256 B, 4 KiB, 64 KiB of JSON state changes, generated with a fixed
random seed: ids, states, numbers, a text field), the same payloads are appended four ways:

* ``plain_fsync``: ``os.write`` of the payload to one open file, then ``os.fsync`` — the least a
  durable journal does (no framing, no signature, no compression);
* ``journal_fsync``: ``Journal.append`` with ``fsync=True`` — frame, compress (zstd, or raw when it
  does not pay), HMAC-SHA256 under the hour key, write, fsync;
* ``plain`` / ``journal``: the same without fsync, to show the CPU cost alone.

Each round opens every way on a fresh directory and feeds them the same payloads in batches of
25, the ways taking turns batch by batch (order rotated), so a busy moment of the machine falls
on all alike; figures are medians over every batch of ``--runs`` rounds. ``us_per_append`` is
the time per append, ``appends_per_s`` its inverse, ``disk_bytes_per_append`` what one append
leaves on disk. The directory (default: a scratch directory in the current one, not ``/tmp``,
which may be a tmpfs where fsync costs nothing) and its file system are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from vramancer.clock import SystemClock
from vramancer.replication.journal import Journal
from vramancer.replication.keys import KeyRing

SIZES = {"256B": 256, "4KiB": 4096, "64KiB": 65536}
WAYS = ("plain_fsync", "journal_fsync", "plain", "journal")
STATES = ("queued", "running", "succeeded", "failed", "cancelled")
SECRET = b"bench-secret-bench-secret-bench!"
#: Appends per timed batch; the ways alternate batch by batch.
BATCH = 25


def payloads(size: int, count: int, seed: int = 0) -> list[bytes]:
    """``count`` JSON state changes of about ``size`` bytes each."""
    rng = random.Random(seed)
    out = []
    words = ["model", "block", "tier", "evict", "load", "gpu", "host", "token", "layer", "cache"]
    for i in range(count):
        record: dict[str, Any] = {
            "op": "task.updated",
            "id": f"t-{rng.getrandbits(64):016x}",
            "seq": i,
            "state": rng.choice(STATES),
            "node": f"node-{rng.randrange(8)}",
            "device": f"gpu:{rng.randrange(4)}",
            "bytes": rng.randrange(1 << 34),
            "at": 1_765_000_000 + i * 0.013,
        }
        base = len(json.dumps({**record, "log": ""}))
        text: list[str] = []
        length = 0
        while base + length < size:
            word = f"{rng.choice(words)}={rng.randrange(10_000)}"
            text.append(word)
            length += len(word) + 1
        record["log"] = " ".join(text)
        out.append(json.dumps(record).encode()[:size])
    return out


class Plain:
    """``os.write`` of each payload to one open file (``fsync`` after each when asked)."""

    def __init__(self, directory: Path, fsync: bool) -> None:
        self.path = directory / "plain.log"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.fsync = fsync

    def append(self, payload: bytes) -> None:
        os.write(self.fd, payload)
        if self.fsync:
            os.fsync(self.fd)

    def close(self) -> int:
        os.close(self.fd)
        return self.path.stat().st_size


class Journaled:
    """``Journal.append`` of each payload (``fsync=True`` or not)."""

    def __init__(self, directory: Path, fsync: bool) -> None:
        self.journal = Journal(
            directory / "journal",
            KeyRing(SECRET),
            segment_max_bytes=64 * 1024 * 1024,
            fsync=fsync,
            clock=SystemClock(),
        )
        self.journal.open()

    def append(self, payload: bytes) -> None:
        self.journal.append("task.updated", payload)

    def close(self) -> int:
        size = self.journal.size_bytes
        self.journal.close()
        return size


def open_way(way: str, directory: Path) -> Plain | Journaled:
    fsync = way.endswith("_fsync")
    return Journaled(directory, fsync) if way.startswith("journal") else Plain(directory, fsync)


def measure(size: int, n: int, runs: int, root: Path) -> dict[str, Any]:
    """Per round: every way on its own fresh directory, fed the same payloads in batches of
    ``BATCH``, the ways alternating batch by batch (rotated order), so a busy moment of the
    machine falls on all of them alike. Medians over every batch of every round."""
    data = payloads(size, n)
    per_batch: dict[str, list[float]] = {way: [] for way in WAYS}
    disk: dict[str, list[int]] = {way: [] for way in WAYS}
    for _ in range(runs):
        directory = Path(tempfile.mkdtemp(dir=root))
        ways = {way: open_way(way, Path(tempfile.mkdtemp(dir=directory))) for way in WAYS}
        try:
            for b, first in enumerate(range(0, n, BATCH)):
                batch = data[first : first + BATCH]
                order = WAYS[b % len(WAYS) :] + WAYS[: b % len(WAYS)]
                for way in order:
                    start = time.perf_counter()
                    for payload in batch:
                        ways[way].append(payload)
                    per_batch[way].append((time.perf_counter() - start) / len(batch))
        finally:
            for way, appender in ways.items():
                disk[way].append(appender.close())
            shutil.rmtree(directory)
    row: dict[str, Any] = {"payload_bytes": size, "appends": n}
    for way in WAYS:
        us = statistics.median(per_batch[way]) * 1e6
        row[way] = {
            "us_per_append": round(us, 1),
            "appends_per_s": round(1e6 / us),
            "payload_mb_s": round(size / us, 2),
            "disk_bytes_per_append": round(statistics.median(disk[way]) / n, 1),
        }
    row["journal_over_plain_fsync"] = round(
        row["journal_fsync"]["us_per_append"] / row["plain_fsync"]["us_per_append"], 2
    )
    row["journal_over_plain"] = round(
        row["journal"]["us_per_append"] / row["plain"]["us_per_append"], 2
    )
    return row


def filesystem(path: Path) -> str:
    try:
        done = subprocess.run(
            ["df", "-T", str(path)], capture_output=True, text=True, timeout=10, check=True
        )
        return done.stdout.splitlines()[-1].split()[1]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--n", type=int, default=500, help="Appends per way and round.")
    parser.add_argument("--dir", type=Path, default=Path.cwd(), help="Where to write.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ha-journal-", dir=args.dir))
    try:
        result = {
            "directory": str(args.dir),
            "filesystem": filesystem(root),
            "runs": args.runs,
            "sizes": {
                label: measure(size, args.n, args.runs, root) for label, size in SIZES.items()
            },
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{result['filesystem']} at {result['directory']}, medians of {args.runs} rounds")
    print(f"{'payload':>8} {'way':>14} {'µs/append':>10} {'appends/s':>10} {'disk B/append':>14}")
    for label, row in result["sizes"].items():
        for way in WAYS:
            r = row[way]
            print(
                f"{label:>8} {way:>14} {r['us_per_append']:>10} {r['appends_per_s']:>10} "
                f"{r['disk_bytes_per_append']:>14}"
            )


if __name__ == "__main__":
    main()
