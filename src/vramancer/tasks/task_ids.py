"""Task ids written in short: any unique start (prefix) of at least ``MIN_PREFIX`` characters
names a task, wherever a task id is taken (status, cancel, logs, and the CLI that uses them).
The dashboard shows the first 12 characters of each id; those work as they are.

A prefix that starts more than one id is refused with ``AmbiguousTaskId`` (409
``ambiguous_task_id``) listing up to ``MAX_CANDIDATES`` of them; one that starts none is
``NotFound``. The queue answers with one bounded query (``TaskQueue.ids_with_prefix``).
"""

from __future__ import annotations

import re

from vramancer.errors import NotFound
from vramancer.tasks.errors import AmbiguousTaskId
from vramancer.tasks.model import TASK_ID_PATTERN, TaskRecord
from vramancer.tasks.queue import TaskQueue

#: The fewest characters a shortened task id may have.
MIN_PREFIX = 4
#: How many matching ids an ``ambiguous_task_id`` error lists.
MAX_CANDIDATES = 10

_ID = re.compile(TASK_ID_PATTERN)


def prefix_bounds(prefix: str) -> tuple[str, str]:
    """``(low, high)``: the ids that start with ``prefix`` are exactly those with
    ``low <= id < high`` (task ids are ASCII, compared byte by byte)."""
    return prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)


async def find(queue: TaskQueue, task_id: str) -> TaskRecord:
    """The task whose id is ``task_id``, else the only one whose id starts with it."""
    record = await queue.get(task_id)
    if record is not None:
        return record
    if len(task_id) < MIN_PREFIX or not _ID.fullmatch(task_id):
        short = len(task_id) < MIN_PREFIX
        hint = f" (a shortened id needs at least {MIN_PREFIX} characters)" if short else ""
        raise NotFound(f"no task {task_id!r}{hint}")
    ids = await queue.ids_with_prefix(task_id, limit=MAX_CANDIDATES + 1)
    if len(ids) > 1:
        shown = ", ".join(ids[:MAX_CANDIDATES]) + (", ..." if len(ids) > MAX_CANDIDATES else "")
        raise AmbiguousTaskId(
            f"task id {task_id!r} is the start of more than one task's id ({shown}); "
            "give more of it",
            candidates=ids[:MAX_CANDIDATES],
        )
    record = await queue.get(ids[0]) if ids else None
    if record is None:
        raise NotFound(f"no task {task_id!r}")
    return record
