"""Task logs: where each attempt's output lies, who may read it, reading it from offsets.

Each attempt has its own files, ``<data_dir>/task-logs/<id[:2]>/<id>.<attempt>.stdout`` (and
``.stderr``), so a retry does not hide why the previous attempt failed. A file holds at most
``[tasks] max_output_bytes`` and a note of what was dropped. An attempt that wrote no file (a
maintenance task, no output) shows the tail kept in the database, which belongs to the last
attempt that ended. The logs of a task are its owner's and admins': a task's output may hold
what its command printed of its secrets.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vramancer.errors import Forbidden, InvalidInput
from vramancer.tasks.model import LEASED_STATES, TaskRecord
from vramancer.tasks.queue import Purged

#: Largest byte offset accepted when reading a task's logs.
MAX_LOG_OFFSET = 2**53
#: Room for the "dropped" note a log file may end with, beyond ``max_output_bytes``.
_NOTE_BYTES = 256


def log_paths(data_dir: Path, task_id: str, attempt: int) -> tuple[Path, Path]:
    """``<data_dir>/task-logs/<id[:2]>/<id>.<attempt>.stdout`` (and ``.stderr``)."""
    stem = os.path.join(data_dir, "task-logs", task_id[:2], f"{task_id}.{attempt}")
    return Path(f"{stem}.stdout"), Path(f"{stem}.stderr")


def check_query(max_bytes: int | None, stdout_offset: int, stderr_offset: int) -> None:
    for name, offset in (("stdout_offset", stdout_offset), ("stderr_offset", stderr_offset)):
        if not 0 <= offset <= MAX_LOG_OFFSET:
            raise InvalidInput(
                f"{name} must be between 0 and {MAX_LOG_OFFSET} (got {offset})", field=name
            )
    if max_bytes is not None and max_bytes < 1:
        raise InvalidInput(f"max_bytes must be at least 1 (got {max_bytes})", field="max_bytes")


def check_reader(record: TaskRecord, reader: str | None) -> None:
    """``reader``: the owner id of a caller who may read only its own tasks' logs (None: an
    admin, any task's). Another owner's task is ``Forbidden`` (403)."""
    if reader is not None and record.owner != reader:
        raise Forbidden(
            f"the logs of task {record.task_id} are its owner's: only the caller that "
            "submitted it and admins may read them"
        )


def attempt_of(record: TaskRecord, attempt: int | None) -> int:
    """The attempt asked for (default: the latest), checked."""
    latest = max(record.attempts, 1)
    number = latest if attempt is None else attempt
    if not 1 <= number <= latest:
        raise InvalidInput(
            f"attempt must be between 1 and {latest} for task {record.task_id} (got {number})",
            field="attempt",
        )
    return number


async def read_logs(
    data_dir: Path,
    record: TaskRecord,
    *,
    max_output_bytes: int,
    max_bytes: int | None,
    stdout_offset: int,
    stderr_offset: int,
    attempt: int | None,
) -> dict[str, Any]:
    """The logs body of the API: stdout and stderr of one attempt from byte offsets, at most
    ``max_bytes`` each; ``stdout_next``/``stderr_next`` continue (to follow a running task)."""
    number = attempt_of(record, attempt)
    ended = number == record.attempts and record.state not in LEASED_STATES
    tails = (record.stdout_tail, record.stderr_tail) if ended else ("", "")
    cap = max_output_bytes + _NOTE_BYTES
    limit = cap if max_bytes is None else min(max_bytes, cap)
    out_path, err_path = log_paths(data_dir, record.task_id, number)
    (out, out_cut, out_next), (err, err_cut, err_next) = await asyncio.to_thread(
        lambda: (
            read_log(out_path, stdout_offset, limit, tails[0]),
            read_log(err_path, stderr_offset, limit, tails[1]),
        )
    )
    return {
        "task_id": record.task_id,
        "state": record.state.value,
        "attempts": record.attempts,
        "attempt": number,
        "stdout": out,
        "stderr": err,
        "truncated": out_cut or err_cut,
        "stdout_next": out_next,
        "stderr_next": err_next,
    }


def read_log(path: Path, offset: int, limit: int, tail: str) -> tuple[str, bool, int]:
    """Up to ``limit`` bytes of ``path`` from ``offset``: (text, cut short, next offset).
    No file: ``tail`` (the database's copy) from ``offset``."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(limit + 1)
    except FileNotFoundError:
        data = tail.encode()[offset : offset + limit + 1]
    kept = data[:limit]
    return kept.decode("utf-8", errors="replace"), len(data) > limit, offset + len(kept)


def remove_logs(data_dir: Path, purged: Sequence[Purged]) -> None:
    """Delete every attempt's log files of tasks the retention purge deleted."""
    for task in purged:
        for attempt in range(1, task.attempts + 1):
            for path in log_paths(data_dir, task.task_id, attempt):
                path.unlink(missing_ok=True)
