"""The dispatch lease: only one orchestrator of the pool dispatches tasks at a time.

The lease is the key ``dispatch`` of the ``vrm_pool`` bucket, holding
``{"holder": NAME, "expires_at": UNIX_SECONDS, "token": RANDOM}``. Every write is a
compare-and-set on the key's revision, so two orchestrators never both write it from the same
state:

* absent (or deleted): ``create`` (fails if another got there first);
* expired (``expires_at`` at or before this host's clock): ``update(last=its revision)``;
* ours: renewed with ``update(last=our revision)``; a renewal that fails means another
  orchestrator took it over (or NATS cannot be reached), and the lease is lost at once (a
  record this very object wrote, still there after such a failure, is taken back by the next
  tick with a compare-and-set on its revision).

:meth:`DispatchLease.tick` is called every ``ttl_s / 3`` or so by the dispatch loop, which
dispatches only while :attr:`DispatchLease.held`. ``held`` also turns false by itself once the
lease would have expired without a renewal (measured on this host's monotonic clock from the
moment the last successful write was sent, less ``skew_s``), so a holder cut off from NATS
stops dispatching before another can take over.

Clocks: expiry compares ``expires_at`` (written with the holder's wall clock) with the wall clock
of whoever wants the lease. The hosts' clocks must agree to within ``skew_s`` (default: a
quarter of ``ttl_s``, at most 1 s), and ``ttl_s`` must be well above that skew: with clocks
further apart, another orchestrator can take the lease while this one still believes it holds it.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from vramancer.clock import Clock
from vramancer.pool.connection import NatsUnavailable, PoolConnection, describe
from vramancer.pool.subjects import DISPATCH_KEY, POOL_BUCKET

__all__ = ["DispatchLease", "LeaseRecord"]

log = logging.getLogger(__name__)

_MAX_RECORD_BYTES = 4096


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """The value of the ``dispatch`` key."""

    holder: str
    #: Unix seconds (the holder's wall clock when it wrote it, plus ``ttl_s``).
    expires_at: float
    #: Random per :class:`DispatchLease` object: a record of ours is taken back at once after a
    #: failed renewal; one under our name but another token (two processes given the same
    #: holder name) is waited out like anyone else's.
    token: str = ""

    def to_json(self) -> bytes:
        data = {"holder": self.holder, "expires_at": self.expires_at, "token": self.token}
        return json.dumps(data).encode()

    @classmethod
    def from_json(cls, raw: bytes | None) -> LeaseRecord | None:
        """The record, or None for a malformed one (treated as expired: it can be taken)."""
        if not raw or len(raw) > _MAX_RECORD_BYTES:
            return None
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(data, dict):
            return None
        holder, expires = data.get("holder"), data.get("expires_at")
        if not isinstance(holder, str) or isinstance(expires, bool):
            return None
        if not isinstance(expires, int | float) or not math.isfinite(expires):
            return None
        token = data.get("token", "")
        return cls(holder, float(expires), token if isinstance(token, str) else "")


class DispatchLease:
    """One orchestrator's claim on the dispatch lease. ``holder`` names it (unique in the pool:
    the node name, or the node name and the process)."""

    def __init__(
        self,
        conn: PoolConnection,
        *,
        holder: str,
        ttl_s: float,
        clock: Clock,
        skew_s: float | None = None,
    ) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        skew = min(1.0, ttl_s / 4) if skew_s is None else skew_s
        if not 0 <= skew < ttl_s:
            raise ValueError("skew_s must be at least 0 and below ttl_s")
        self._conn = conn
        self._holder = holder
        self._ttl_s = ttl_s
        self._skew_s = skew
        self._clock = clock
        #: Revision of our last successful write; None while not held.
        self._revision: int | None = None
        #: Monotonic time after which we no longer count on the lease without a renewal.
        self._valid_until = 0.0
        self._seen: str | None = None
        self._token = secrets.token_hex(8)

    @property
    def held(self) -> bool:
        """Whether this orchestrator holds the lease now (and may dispatch)."""
        return self._revision is not None and self._clock.monotonic() < self._valid_until

    def holder(self) -> str | None:
        """Who held the lease when it was last read or written (None: nobody, or not known)."""
        return self._seen

    async def tick(self) -> bool:
        """Acquire or renew; whether the lease is held. Any conflict or NATS error: not held."""
        try:
            return await self._tick()
        except (NatsUnavailable, nats.errors.Error, TimeoutError, OSError) as exc:
            if self._revision is not None:
                log.warning("dispatch lease lost: %s", describe(exc))
            self._drop()
            return False

    async def _tick(self) -> bool:
        kv = await self._conn.kv(POOL_BUCKET)
        if self._revision is not None:
            return await self._write(kv, self._revision)
        try:
            entry = await kv.get(DISPATCH_KEY)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return await self._write(kv, None)
        record = LeaseRecord.from_json(entry.value)
        if record is not None and record.token != self._token:
            self._seen = record.holder
            if record.expires_at > self._clock.time():
                return False
        return await self._write(kv, entry.revision)

    async def _write(self, kv: KeyValue, last: int | None) -> bool:
        """Write our record: ``create`` (``last`` None) or compare-and-set on ``last``."""
        sent = self._clock.monotonic()
        expires_at = self._clock.time() + self._ttl_s
        value = LeaseRecord(self._holder, expires_at, self._token).to_json()
        try:
            if last is None:
                revision = await kv.create(DISPATCH_KEY, value)
            else:
                revision = await kv.update(DISPATCH_KEY, value, last=last)
        except nats.js.errors.KeyWrongLastSequenceError:
            if self._revision is not None:
                log.warning("dispatch lease lost: another orchestrator wrote it")
            self._drop()
            return False
        if self._revision is None:
            log.info("dispatch lease acquired by %s", self._holder)
        self._revision = revision
        self._valid_until = sent + self._ttl_s - self._skew_s
        self._seen = self._holder
        return True

    async def release(self) -> None:
        """Give the lease up (delete it, only if still ours), so another takes it at once."""
        revision = self._revision
        self._drop()
        if revision is None:
            return
        try:
            kv = await self._conn.kv(POOL_BUCKET)
            await kv.delete(DISPATCH_KEY, last=revision)
        except (NatsUnavailable, nats.errors.Error, TimeoutError, OSError) as exc:
            log.info("dispatch lease not released (it expires by itself): %s", describe(exc))
            return
        self._seen = None

    def _drop(self) -> None:
        self._revision = None
        self._valid_until = 0.0
