"""What the store accepts from callers (block ids, priorities, hints, sizes) and what a put
answers."""

from __future__ import annotations

import re
from dataclasses import dataclass

from vramancer.blockids import BLOCK_ID_RE
from vramancer.errors import InvalidInput
from vramancer.units import format_size

#: Allowed block ids: letters, digits and ``. _ : / -``, 1 to 256 characters.
#: Allowed hints: printable ASCII without control characters, at most 128 characters.
HINT_RE = re.compile(r"[\x20-\x7e]{1,128}")
MAX_PRIORITY = 1000
#: Largest offset (and limit) ``list_blocks`` accepts; the HTTP API's bound on offsets too.
MAX_LIST_OFFSET = 2**53


class BlockTooLarge(InvalidInput):
    """A block over ``memory.max_block_size``."""

    code = "payload_too_large"
    http_status = 413


@dataclass(frozen=True, slots=True)
class PutReceipt:
    """Where a put landed, and whether the block survives a crash from now on (it is in L5/L6,
    its file, directory and catalog row fsynced)."""

    tier: str
    durable: bool


def check_block_id(block_id: object) -> str:
    """``block_id`` if allowed, else ``InvalidInput`` naming the allowed form."""
    if not isinstance(block_id, str) or not BLOCK_ID_RE.fullmatch(block_id):
        raise InvalidInput(
            "block id must be 1 to 256 characters of letters, digits and . _ : / - "
            f"(got {block_id!r:.80})",
            field="id",
        )
    return block_id


def check_priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidInput(f"priority must be an integer (got {priority!r})", field="priority")
    if not 0 <= priority <= MAX_PRIORITY:
        raise InvalidInput(
            f"priority must be between 0 and {MAX_PRIORITY} (got {priority})", field="priority"
        )
    return priority


def check_hint(hint: object) -> str | None:
    if hint is None:
        return None
    if not isinstance(hint, str) or not HINT_RE.fullmatch(hint):
        raise InvalidInput("hint must be 1 to 128 printable ASCII characters", field="hint")
    return hint


def check_page(limit: object, offset: object) -> None:
    """``list_blocks``'s ``limit`` and ``offset``: integers from 0 to ``MAX_LIST_OFFSET``."""
    for name, value in (("limit", limit), ("offset", offset)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidInput(f"{name} must be an integer (got {value!r:.40})", field=name)
        if not 0 <= value <= MAX_LIST_OFFSET:
            raise InvalidInput(
                f"{name} must be from 0 to {MAX_LIST_OFFSET} (got {value})", field=name
            )


def check_capacity(capacity_bytes: object) -> int:
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
        raise InvalidInput("capacity_bytes must be an integer", field="capacity_bytes")
    if capacity_bytes < 0:
        raise InvalidInput("capacity_bytes must not be negative", field="capacity_bytes")
    return capacity_bytes


def check_size(nbytes: int, max_block_size: int) -> None:
    """A block's size: not empty, not over ``memory.max_block_size`` (:class:`BlockTooLarge`)."""
    if nbytes == 0:
        raise InvalidInput("a block cannot be empty", field="data")
    if nbytes > max_block_size:
        raise BlockTooLarge(
            f"block of {format_size(nbytes)} is over memory.max_block_size "
            f"({format_size(max_block_size)})",
            requested_bytes=nbytes,
            max_bytes=max_block_size,
        )
