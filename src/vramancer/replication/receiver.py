"""The standby side of ``POST /v1/ha/deltas``: verify a batch, apply it in order, journal it.

Checks, in order, for every record of a batch (``check`` is the pure part):

* the signature under the key of the record's hour (``bad_signature``, 401), the hour being the
  current or the previous one (``stale_key``, 401), a well-formed frame (``corrupt``, 400);
* the epoch: lower than this node's (``stale_epoch``, 409);
* a nonce already seen in the last two hours, or a seq this node already holds (``replayed``,
  409: a replay is never a 2xx);
* the seq being the next one (``gap``, 409: the sender resumes from ``acked_seq``).

A batch with any refused record applies nothing, and each refusal is counted in
``vramancer_ha_deltas_rejected_total{reason}``. An accepted batch is applied in order, then
journaled (``Journal.append_record``, the primary's seq kept); a ``snapshot`` replaces the
state and restarts the journal at its seq (``Journal.reset``). The answer is the acked seq.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from vramancer.clock import Clock
from vramancer.errors import VramancerError
from vramancer.observability.metrics import Metrics
from vramancer.replication.delta import Delta, DeltaError, open_record, split_records
from vramancer.replication.journal import Journal
from vramancer.replication.keys import KeyRing, hour_of
from vramancer.replication.kinds import DeltaKind

#: Records one request may carry at most.
MAX_BATCH_RECORDS = 10_000


class Reason(StrEnum):
    """Why a delta was refused (the error code and the metric's ``reason`` label)."""

    BAD_SIGNATURE = "bad_signature"
    STALE_KEY = "stale_key"
    CORRUPT = "corrupt"
    STALE_EPOCH = "stale_epoch"
    REPLAYED = "replayed"
    GAP = "gap"
    NOT_STANDBY = "not_standby"


_STATUS = {
    Reason.BAD_SIGNATURE: 401,
    Reason.STALE_KEY: 401,
    Reason.CORRUPT: 400,
    Reason.STALE_EPOCH: 409,
    Reason.REPLAYED: 409,
    Reason.GAP: 409,
    Reason.NOT_STANDBY: 409,
}


class Refused(VramancerError):
    """A batch refused: ``code`` is the reason; details carry ``acked_seq``, ``epoch``,
    ``role`` so the sender knows where to resume."""

    def __init__(self, reason: Reason, message: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.code = reason.value
        self.http_status = _STATUS[reason]
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Position:
    """What the receiver holds: its last seq and epoch."""

    last_seq: int
    epoch: int


def check(delta: Delta, expected_seq: int, epoch: int, nonce_seen: bool) -> Reason | None:
    """The pure order checks of one verified delta (see the module docstring). A snapshot may
    jump ahead (it replaces everything before its seq); it may also be of the same seq when
    it comes with a higher epoch."""
    if delta.epoch < epoch:
        return Reason.STALE_EPOCH
    if nonce_seen:
        return Reason.REPLAYED
    if delta.kind == DeltaKind.SNAPSHOT:
        if delta.seq < expected_seq - 1 or (delta.seq == expected_seq - 1 and delta.epoch == epoch):
            return Reason.REPLAYED
        return None
    if delta.seq < expected_seq:
        return Reason.REPLAYED
    if delta.seq > expected_seq:
        return Reason.GAP
    return None


class NonceWindow:
    """Nonces seen, kept for the two hours a record's key is accepted."""

    def __init__(self) -> None:
        self._seen: dict[bytes, int] = {}

    def seen(self, nonce: bytes) -> bool:
        return nonce in self._seen

    def add(self, nonce: bytes, hour: int) -> None:
        self._seen[nonce] = hour

    def prune(self, now_hour: int) -> None:
        if len(self._seen) > 1024:
            self._seen = {n: h for n, h in self._seen.items() if h >= now_hour - 1}


Apply = Callable[[list[tuple[str, bytes]]], Awaitable[None]]


class Receiver:
    """Verifies, applies and journals batches (see the module docstring)."""

    def __init__(
        self,
        journal: Journal,
        keyring: KeyRing,
        *,
        apply: Apply,
        clock: Clock,
        metrics: Metrics,
        role: Callable[[], str],
    ) -> None:
        self.journal = journal
        self.keyring = keyring
        self._apply = apply
        self.clock = clock
        self._role = role
        self.nonces = NonceWindow()
        self._lock = asyncio.Lock()
        self._rejected = metrics.counter(
            "vramancer_ha_deltas_rejected_total",
            "Deltas a standby refused, by reason.",
            ["reason"],
        )
        for reason in Reason:
            self._rejected.labels(reason=reason.value)
        self.applied = 0

    def position(self) -> Position:
        return Position(self.journal.last_seq, self.journal.epoch)

    def answer(self) -> dict[str, Any]:
        """What the sender is told: where this node stands."""
        pos = self.position()
        return {"acked_seq": pos.last_seq, "epoch": pos.epoch, "role": self._role()}

    def refuse(self, reason: Reason, message: str, count: int = 1) -> Refused:
        self._rejected.labels(reason=reason.value).inc(count)
        return Refused(reason, message, **self.answer())

    async def receive(self, body: bytes) -> dict[str, Any]:
        """Handle one request body (concatenated records); an empty body only answers."""
        async with self._lock:
            if not body:
                return self.answer()
            if self._role() != "standby":
                raise self.refuse(Reason.NOT_STANDBY, "this node is not a standby")
            accepted = self._verify(body)
            await self._apply([(d.kind, d.payload) for _, d in accepted])
            await asyncio.to_thread(self._journal, accepted)
            self.applied += len(accepted)
            return self.answer()

    def newer_epoch(self, body: bytes) -> int | None:
        """The epoch of the batch's first record when it is genuine (signature, hour) and newer
        than this node's; None otherwise. A primary that gets one was replaced."""
        try:
            first = next(split_records(body))
            delta = open_record(first, self.keyring, now_hour=hour_of(self.clock.time()))
        except (DeltaError, StopIteration):
            return None
        return delta.epoch if delta.epoch > self.journal.epoch else None

    def _verify(self, body: bytes) -> list[tuple[bytes, Delta]]:
        try:
            records = list(split_records(body))
        except DeltaError as exc:
            raise self.refuse(Reason.CORRUPT, exc.message) from None
        if len(records) > MAX_BATCH_RECORDS:
            raise self.refuse(Reason.CORRUPT, f"more than {MAX_BATCH_RECORDS} records in a batch")
        now_hour = hour_of(self.clock.time())
        self.nonces.prune(now_hour)
        pos = self.position()
        expected, epoch = pos.last_seq + 1, pos.epoch
        batch_nonces: set[bytes] = set()
        accepted: list[tuple[bytes, Delta]] = []
        for record in records:
            try:
                delta = open_record(record, self.keyring, now_hour=now_hour)
            except DeltaError as exc:
                raise self.refuse(Reason(exc.reason), exc.message) from None
            seen = self.nonces.seen(delta.nonce) or delta.nonce in batch_nonces
            reason = check(delta, expected, epoch, seen)
            if reason is not None:
                raise self.refuse(reason, _explain(reason, delta, expected, epoch))
            batch_nonces.add(delta.nonce)
            accepted.append((record, delta))
            expected, epoch = delta.seq + 1, delta.epoch
        return accepted

    def _journal(self, accepted: list[tuple[bytes, Delta]]) -> None:
        """Journal the batch in order: runs of plain deltas with one fsync each, a snapshot
        resetting the journal where it comes."""
        run: list[tuple[bytes, Delta]] = []
        for record, delta in accepted:
            if delta.kind == DeltaKind.SNAPSHOT:
                self.journal.append_records(run)
                run = []
                self.journal.reset(delta.seq, delta.epoch)
            else:
                run.append((record, delta))
            self.nonces.add(delta.nonce, delta.hour)
        self.journal.append_records(run)


def _explain(reason: Reason, delta: Delta, expected: int, epoch: int) -> str:
    if reason is Reason.STALE_EPOCH:
        return f"delta seq {delta.seq} is of epoch {delta.epoch}, older than this node's {epoch}"
    if reason is Reason.GAP:
        return f"delta seq {delta.seq} is ahead of the next one expected ({expected})"
    return f"delta seq {delta.seq} was already applied (next expected: {expected})"
