"""``<data_dir>/daemon.json``: the ``vramancer serve`` that holds a data directory (its process
id and the address it answers on).

The daemon writes it once it listens, while it holds the directory's lock, and removes it as it
stops. A second daemon started on the same directory is refused by the lock; it reads this file
to say which daemon to stop. A file left by a daemon that died is ignored (its process is gone).
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from vramancer.files import open_private

NAME = "daemon.json"


@dataclass(frozen=True, slots=True)
class DaemonRecord:
    pid: int
    url: str
    started_at: float


def write(data_dir: Path, record: DaemonRecord) -> None:
    """Write the record (0600), replacing the file at once: a reader never sees half of it."""
    tmp = data_dir / f".{NAME}.{record.pid}"
    with os.fdopen(open_private(tmp), "w") as fh:
        json.dump(asdict(record), fh)
    os.replace(tmp, data_dir / NAME)


def read(data_dir: Path) -> DaemonRecord | None:
    """The record of a daemon that is still running, else None (no file, a damaged one, or
    one whose process is gone)."""
    try:
        raw = json.loads((data_dir / NAME).read_text())
        record = DaemonRecord(int(raw["pid"]), str(raw["url"]), float(raw["started_at"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if _alive(record.pid) else None


def remove(data_dir: Path, pid: int) -> None:
    """Remove the record if it is ``pid``'s (a newer daemon's record stays)."""
    path = data_dir / NAME
    try:
        if int(json.loads(path.read_text())["pid"]) != pid:
            return
    except (OSError, ValueError, KeyError, TypeError):
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
