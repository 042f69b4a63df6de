"""The kinds of deltas the node side writes, and their JSON payloads.

Every delta carries the *current* state of one thing (a full row), never an operation: applying
it twice, or applying an older and then a newer one, ends in the same state. A thing that is
gone travels as its ``*_delete`` kind. ``snapshot`` carries the whole replicated state at once
(a peer behind the oldest kept segment gets one first).
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

#: The largest payload a delta may carry once decoded (a block's bytes are the big ones).
MAX_PAYLOAD_BYTES = 512 * 1024 * 1024


class DeltaKind(StrEnum):
    """What a delta's payload describes."""

    #: ``{"row": {column: value}}``: a task's full SQLite row after a queue mutation.
    TASK = "task"
    #: ``{"id": task_id}``: a task the retention purge (or a delete) removed.
    TASK_DELETE = "task_delete"
    #: ``{"block": {...}, "data": base64 | null}``: a memory block's catalog entry (and its
    #: bytes when ``[ha] replicate_data`` is on and it lives on a disk tier).
    BLOCK = "block"
    #: ``{"id": block_id}``
    BLOCK_DELETE = "block_delete"
    #: ``{"name": profile, "last_switch": report | null}``: the profile in force.
    PROFILE = "profile"
    #: ``{"allocation": {...}}``: an allocation made through ``POST /v1/allocations``.
    ALLOCATION = "allocation"
    #: ``{"id": allocation_id}``
    ALLOCATION_DELETE = "allocation_delete"
    #: ``{"tasks": [row...], "blocks": [...], "profile": {...}, "allocations": [...]}``
    SNAPSHOT = "snapshot"


def encode(payload: dict[str, Any]) -> bytes:
    """A payload as compact JSON bytes."""
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def decode(raw: bytes | str | dict[str, Any]) -> dict[str, Any]:
    """A payload back from JSON; a payload that is not an object raises ``ValueError``."""
    if isinstance(raw, dict):
        return raw
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("payload: a JSON object was expected")
    return value


def pack(payload: dict[str, Any], data: bytes | None = None) -> bytes:
    """A payload and, optionally, raw bytes after it: ``JSON`` or ``JSON \\n bytes`` (compact
    JSON never holds a raw newline, so the first one ends it)."""
    head = encode(payload)
    return head if data is None else head + b"\n" + data


def unpack(raw: bytes) -> tuple[dict[str, Any], bytes | None]:
    """``pack`` undone: the JSON object and the raw bytes after it (None when there are none)."""
    head, sep, data = raw.partition(b"\n")
    return decode(head), (data if sep else None)
