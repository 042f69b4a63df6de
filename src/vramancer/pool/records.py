"""The JetStream task queue's records as JSON: what one key of the ``vrm_tasks`` bucket holds.

* ``t.<task id>``: a task, every ``TaskRecord`` field plus what the queue needs besides (its
  lane, priority rank and expected run time in ms, the lease holder ``worker``,
  ``lease_expires``, ``pid_started``, ``updated_at``). ``seq`` is the revision of the write that
  created the key; the create itself cannot hold it (it is known once written), so a record
  without ``seq`` takes its revision.
* ``k.<sha256 of the idempotency key>``: the task id and owner an idempotency key belongs to.
* ``d.<sha256 of an estimate key>``: the learned run time of one kind of task (moving average).

Task ids allow characters a KV key does not (``:``) and dot sequences a subject does not
(``a..b``): an id that is not plain letters, digits, ``-`` and ``_`` is written as ``=`` and its
UTF-8 in hex (an id never starts with ``=``, so both forms never meet).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, replace
from typing import Any

from vramancer.arbiter.types import Priority
from vramancer.tasks.model import TaskRecord, TaskState, TaskType

#: Version of the record layout, written in every record.
FORMAT = 1
TASK_PREFIX = "t."
KEY_PREFIX = "k."
DURATION_PREFIX = "d."
_PLAIN_ID = re.compile(r"^[A-Za-z0-9_-]+$")

#: ``TaskRecord`` fields stored as they are (``seq``, ``estimate_s`` and the enums apart).
_PLAIN = (
    "task_id",
    "spec_json",
    "attempts",
    "max_retries",
    "timeout_s",
    "estimate_key",
    "gpu",
    "vram_bytes",
    "device",
    "lease_token",
    "exit_code",
    "error",
    "submitted_at",
    "scheduled_at",
    "started_at",
    "finished_at",
    "not_before",
    "cancel_requested",
    "pid",
    "stdout_tail",
    "stderr_tail",
    "idempotency_key",
    "lease_losses",
    "ready_at",
    "owner",
    "node",
)


class BadRecord(ValueError):
    """A value of the bucket that is not a record of this layout."""


@dataclass(frozen=True, slots=True)
class StoredTask:
    """A task as the bucket holds it: the record and the queue's own fields."""

    record: TaskRecord
    #: The maintenance lane.
    maintenance: bool
    #: ``Priority.rank`` (dispatch order: higher first).
    prio: int
    #: Expected run time in whole milliseconds (dispatch order: shorter first).
    est_ms: int
    #: The worker holding the lease (leased states only).
    worker: str | None = None
    lease_expires: float | None = None
    pid_started: float | None = None
    updated_at: float = 0.0

    @property
    def task_id(self) -> str:
        return self.record.task_id

    @property
    def state(self) -> TaskState:
        return self.record.state

    def with_record(self, **fields: Any) -> StoredTask:
        """This task with ``fields`` of its record replaced."""
        return replace(self, record=replace(self.record, **fields))


@dataclass(frozen=True, slots=True)
class KeyOwner:
    """What an idempotency key (``k.`` key) holds: the task it names and that task's owner."""

    task_id: str
    owner: str


def task_key(task_id: str) -> str:
    """The bucket key of a task."""
    if _PLAIN_ID.match(task_id):
        return TASK_PREFIX + task_id
    return TASK_PREFIX + "=" + task_id.encode().hex()


def task_id_of(key: str) -> str:
    """The task id a ``t.`` key names (``task_key`` reversed)."""
    name = key[len(TASK_PREFIX) :]
    if name.startswith("="):
        return bytes.fromhex(name[1:]).decode()
    return name


def idempotency_key(key: str) -> str:
    """The bucket key of an idempotency key (one namespace for every owner, as the embedded
    queue has: another owner's key is refused, never shared)."""
    return KEY_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def duration_key(estimate_key: str) -> str:
    """The bucket key of the learned run time of one ``estimate_key``."""
    return DURATION_PREFIX + hashlib.sha256(estimate_key.encode()).hexdigest()


def _dumps(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def encode_task(stored: StoredTask, *, with_seq: bool = True) -> bytes:
    """The JSON of a task (``with_seq=False`` for the create, whose revision is its seq)."""
    r = stored.record
    body: dict[str, Any] = {name: getattr(r, name) for name in _PLAIN}
    body.update(
        v=FORMAT,
        type=r.type.value,
        state=r.state.value,
        priority=r.priority.value,
        lane=stored.maintenance,
        prio=stored.prio,
        est_ms=stored.est_ms,
        worker=stored.worker,
        lease_expires=stored.lease_expires,
        pid_started=stored.pid_started,
        updated_at=stored.updated_at,
    )
    if with_seq:
        body["seq"] = r.seq
    return _dumps(body)


def decode_task(data: bytes, revision: int) -> StoredTask:
    """A task from its JSON; ``revision``: the entry's (the seq of a record without one)."""
    try:
        body = json.loads(data)
        if body.get("v") != FORMAT:
            raise BadRecord(f"record format {body.get('v')!r}, expected {FORMAT}")
        fields = {name: body[name] for name in _PLAIN}
        record = TaskRecord(
            seq=int(body.get("seq", revision)),
            type=TaskType(body["type"]),
            state=TaskState(body["state"]),
            priority=Priority(body["priority"]),
            estimate_s=body["est_ms"] / 1000.0,
            **fields,
        )
        return StoredTask(
            record,
            maintenance=bool(body["lane"]),
            prio=int(body["prio"]),
            est_ms=int(body["est_ms"]),
            worker=body["worker"],
            lease_expires=body["lease_expires"],
            pid_started=body["pid_started"],
            updated_at=body["updated_at"],
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRecord(f"not a task record: {exc}") from exc


def encode_key_owner(owner: KeyOwner) -> bytes:
    return _dumps({"v": FORMAT, "task_id": owner.task_id, "owner": owner.owner})


def decode_key_owner(data: bytes) -> KeyOwner:
    try:
        body = json.loads(data)
        return KeyOwner(str(body["task_id"]), str(body["owner"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRecord(f"not an idempotency key record: {exc}") from exc


@dataclass(frozen=True, slots=True)
class Duration:
    """The learned run time of one ``estimate_key``: moving average and sample count."""

    key: str
    mean_s: float
    n: int


def encode_duration(d: Duration) -> bytes:
    return _dumps({"v": FORMAT, "key": d.key, "mean_s": d.mean_s, "n": d.n})


def decode_duration(data: bytes) -> Duration:
    try:
        body = json.loads(data)
        return Duration(str(body["key"]), float(body["mean_s"]), int(body["n"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRecord(f"not a duration record: {exc}") from exc
