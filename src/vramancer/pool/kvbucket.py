"""One JetStream KV bucket as the task queue writes it: create-only writes (de-duplicated by
``Nats-Msg-Id``), compare-and-set updates and deletes on a key's revision, reads of one key,
and the watcher.

The JetStream context comes from a callable, asked again for every call: the connection's
owner gives the current one (it raises its own ``BackendUnavailable`` while NATS is down, and
that error goes to the caller as it is). A NATS failure in the middle of a call (a timeout, a
connection lost) is raised as ``QueueUnavailable``: the write may or may not have happened, as
after any lost acknowledgement; a create retried with the same ``Nats-Msg-Id`` is not written
twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, KeyValue

from vramancer.errors import BackendUnavailable

if TYPE_CHECKING:
    from nats.js import JetStreamContext

#: JetStream's "wrong last sequence" (the compare-and-set lost).
_WRONG_LAST = (10071, 10164)
_EXPECTED_LAST = "Nats-Expected-Last-Subject-Sequence"
_MSG_ID = "Nats-Msg-Id"
#: Largest value the bucket takes (NATS' default ``max_payload`` is 1 MiB; headers need room).
DEFAULT_MAX_VALUE = 1024 * 1024 - 4096


class QueueUnavailable(BackendUnavailable):
    """NATS failed in the middle of a task queue operation (503)."""

    code = "nats_unavailable"


@dataclass(frozen=True, slots=True)
class Value:
    """A key's latest value and its revision; ``data`` None: the key was deleted."""

    data: bytes | None
    revision: int


@contextlib.contextmanager
def nats_errors(what: str, *, api_errors: bool = False) -> Iterator[None]:
    """Raise NATS failures of ``what`` as ``QueueUnavailable`` (``api_errors``: JetStream's
    answers refusing the request are left to the caller)."""
    try:
        yield
    except nats.js.errors.APIError as exc:
        if api_errors:
            raise
        raise QueueUnavailable(f"NATS JetStream refused {what}: {exc}") from exc
    except (TimeoutError, nats.errors.Error, OSError) as exc:
        raise QueueUnavailable(
            f"NATS JetStream failed while {what} ({type(exc).__name__}: {exc}); "
            "try again once the pool's NATS servers answer"
        ) from exc


def _lost_cas(exc: nats.js.errors.APIError) -> bool:
    return exc.err_code in _WRONG_LAST


class Bucket:
    """The KV bucket ``name`` (module docstring)."""

    def __init__(
        self,
        js: Callable[[], JetStreamContext],
        name: str,
        *,
        replicas: int = 1,
        max_value: int = DEFAULT_MAX_VALUE,
    ) -> None:
        self._js = js
        self.name = name
        self.replicas = replicas
        self.max_value = max_value
        self.stream = f"KV_{name}"
        self.prefix = f"$KV.{name}."
        self.direct = True

    async def ensure(self) -> None:
        """Create the bucket when it does not exist (one value per key, direct gets on)."""
        js = self._js()
        with nats_errors(f"opening the KV bucket {self.name}"):
            try:
                kv = await js.key_value(self.name)
            except nats.js.errors.BucketNotFoundError:
                config = KeyValueConfig(
                    bucket=self.name,
                    history=1,
                    replicas=self.replicas,
                    max_value_size=self.max_value,
                    storage=StorageType.FILE,
                    direct=True,
                )
                kv = await js.create_key_value(config)
            self.direct = bool(kv._direct)

    def kv(self) -> KeyValue:
        """A ``KeyValue`` handle on the current context (no request: the bucket exists)."""
        return KeyValue(self.name, self.stream, self.prefix, self._js(), self.direct)

    async def _publish(self, key: str, value: bytes, headers: dict[str, str]) -> Any:
        js = self._js()
        with nats_errors(f"writing {key} to the bucket {self.name}", api_errors=True):
            return await js.publish(self.prefix + key, value, headers=headers)

    async def create(self, key: str, value: bytes, msg_id: str | None) -> int | None:
        """Write ``key`` only if it holds no value; its revision, or None when it holds one.

        ``msg_id`` de-duplicates a repeated create within the stream's duplicate window. A key
        whose value was deleted is created again over its delete marker."""
        last = 0
        while True:
            headers = {_EXPECTED_LAST: str(last)}
            if msg_id is not None and last == 0:
                headers[_MSG_ID] = msg_id
            try:
                ack = await self._publish(key, value, headers)
            except nats.js.errors.APIError as exc:
                if not _lost_cas(exc):
                    raise QueueUnavailable(f"writing {key}: {exc}") from exc
            else:
                if not ack.duplicate:
                    return int(ack.seq)
            current = await self.get(key)
            if current is not None and current.data is not None:
                return None
            # Deleted (or a duplicate of a create since deleted): write over the marker.
            last = 0 if current is None else current.revision
            msg_id = None

    async def update(self, key: str, value: bytes, last: int) -> int | None:
        """Write ``key`` if its revision is still ``last``; the new revision, or None."""
        try:
            ack = await self._publish(key, value, {_EXPECTED_LAST: str(last)})
        except nats.js.errors.APIError as exc:
            if _lost_cas(exc):
                return None
            raise QueueUnavailable(f"writing {key}: {exc}") from exc
        return int(ack.seq)

    async def delete(self, key: str, last: int) -> int | None:
        """Delete ``key`` if its revision is still ``last``; the delete's revision, or None."""
        try:
            ack = await self._publish(key, b"", {KV_OP: KV_DEL, _EXPECTED_LAST: str(last)})
        except nats.js.errors.APIError as exc:
            if _lost_cas(exc):
                return None
            raise QueueUnavailable(f"deleting {key}: {exc}") from exc
        return int(ack.seq)

    async def forget(self, key: str, revision: int) -> None:
        """Remove ``key``'s messages up to ``revision`` from the stream (its delete marker),
        never a later value."""
        js = self._js()
        with nats_errors(f"removing the delete marker of {key}"):
            await js.purge_stream(self.stream, seq=revision + 1, subject=self.prefix + key)

    async def get(self, key: str) -> Value | None:
        """The latest value of ``key`` (``data`` None: deleted), or None: never written."""
        js = self._js()
        with nats_errors(f"reading {key} from the bucket {self.name}"):
            try:
                msg = await js.get_msg(self.stream, subject=self.prefix + key, direct=self.direct)
            except nats.js.errors.NotFoundError:
                return None
        op = (msg.headers or {}).get(KV_OP)
        if op in (KV_DEL, KV_PURGE):
            return Value(None, int(msg.seq or 0))
        return Value(msg.data or b"", int(msg.seq or 0))

    async def watch(self) -> KeyValue.KeyWatcher:
        """A watcher of every key: the latest value of each, a None marker, then updates."""
        with nats_errors(f"watching the bucket {self.name}"):
            return await self.kv().watchall()
