"""Refusals of the task service that the library's generic errors do not word precisely."""

from __future__ import annotations

from vramancer.errors import Conflict, InvalidInput, VramancerError


class PayloadTooLarge(InvalidInput):
    """A task body over ``[tasks] max_payload_bytes``."""

    code = "payload_too_large"
    http_status = 413


class IdempotencyKeyTaken(Conflict):
    """The idempotency key belongs to another caller's task (it is never handed out)."""

    code = "idempotency_key_taken"


class TaskIdTaken(Conflict):
    """The task id belongs to another caller's task (it is never handed out)."""

    code = "task_id_taken"


class QuotaExceeded(VramancerError):
    """A viewer already has ``[tasks] viewer_max_queued`` maintenance tasks waiting."""

    code = "quota_exceeded"
    http_status = 429


class AmbiguousTaskId(Conflict):
    """A shortened task id that is the start of more than one task's id; ``candidates`` lists
    some of them."""

    code = "ambiguous_task_id"
