"""The messages of the pool's subjects, as data: a task handed to a node (``vrm.work.NODE``)
and the control requests a node answers (``vrm.ctl.NODE``: a task's logs)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

#: Largest control request or dispatch message read (bytes); anything longer is poison.
MAX_MESSAGE_BYTES = 64 * 1024


class BadMessage(ValueError):
    """A message that is not what its subject carries (poison: terminated, never retried)."""


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Run ``task_id`` under lease ``lease_token`` on GPU ``index`` of the receiving node."""

    task_id: str
    lease_token: int
    device: str

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @property
    def msg_id(self) -> str:
        """``Nats-Msg-Id``: one message per lease (a resend is de-duplicated by JetStream)."""
        return f"{self.task_id}.{self.lease_token}"

    @classmethod
    def decode(cls, data: bytes) -> Dispatch:
        body = _object(data)
        task_id, token, device = body.get("task_id"), body.get("lease_token"), body.get("device")
        if not isinstance(task_id, str) or not task_id or len(task_id) > 128:
            raise BadMessage("task_id: a task id")
        if not isinstance(token, int) or isinstance(token, bool) or token < 0:
            raise BadMessage("lease_token: a non-negative integer")
        if not isinstance(device, str) or len(device) > 200:
            raise BadMessage("device: NODE/gpu:N")
        return cls(task_id, token, device)


def _object(data: bytes) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE_BYTES:
        raise BadMessage(f"{len(data)} bytes; at most {MAX_MESSAGE_BYTES}")
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise BadMessage(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadMessage("not a JSON object")
    return body


@dataclass(frozen=True, slots=True)
class LogsRequest:
    """``TaskService.logs`` arguments, asked of the node that ran the attempt."""

    task_id: str
    max_bytes: int | None = None
    stdout_offset: int = 0
    stderr_offset: int = 0
    attempt: int | None = None

    def encode(self) -> bytes:
        return json.dumps({"op": "logs", **asdict(self)}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> LogsRequest:
        body = _object(data)
        if body.get("op") != "logs" or not isinstance(body.get("task_id"), str):
            raise BadMessage("expected a logs request")
        ints = {}
        for name in ("max_bytes", "stdout_offset", "stderr_offset", "attempt"):
            value = body.get(name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise BadMessage(f"{name}: an integer")
            ints[name] = value
        return cls(
            body["task_id"],
            ints["max_bytes"],
            ints["stdout_offset"] or 0,
            ints["stderr_offset"] or 0,
            ints["attempt"],
        )
