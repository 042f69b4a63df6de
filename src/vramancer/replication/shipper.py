"""The primary side: one ``PeerShipper`` per peer of ``VRM_HA_PEERS``.

Each round it sends the records after the peer's acknowledged seq (``[ha] batch_max`` at most,
concatenated, ``application/octet-stream``) to ``http://peer/v1/ha/deltas``; the signatures
are the authentication. An empty request first learns where the peer stands (its acked seq and
epoch). A peer of a lower epoch, or behind the oldest segment still held (``Behind``), gets a
``snapshot`` first (the whole state, sealed at the journal's last seq). A peer that answers
with a higher epoch means this node was replaced: ``on_newer_epoch`` steps it down.

Segments are released only once every peer acknowledged them (``Shippers.release``), and
``vramancer_ha_replication_lag_deltas{peer}`` follows each peer's lag.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpx

from vramancer.clock import Clock
from vramancer.observability.metrics import Metrics
from vramancer.replication.delta import Delta, new_nonce, seal
from vramancer.replication.journal import Behind, Journal
from vramancer.replication.keys import hour_of
from vramancer.replication.kinds import DeltaKind
from vramancer.replication.settings import HaSettings

log = logging.getLogger(__name__)

#: The header a shipper names its own API address in (the standby's ``primary``).
ADDRESS_HEADER = "X-VRM-HA-Address"
#: Seconds between tries to reach a peer that is down, at most.
MAX_BACKOFF_S = 2.0
#: Bytes of records one request carries at most (at least one record is always sent).
MAX_BATCH_BYTES = 32 * 1024 * 1024


#: Refusals that only say where the peer stands: resume from its ``acked_seq`` at once.
RESUME_CODES = frozenset({"replayed", "gap"})


class Refusal(ValueError):
    """A peer refused a batch for a reason a retry at once would not cure."""


class PeerState(StrEnum):
    UP = "up"
    BEHIND = "behind"
    DOWN = "down"


@dataclass(slots=True)
class PeerView:
    address: str
    acked_seq: int
    lag: int
    state: PeerState

    def as_dict(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "acked_seq": self.acked_seq,
            "lag": self.lag,
            "state": self.state.value,
        }


#: Builds the payload of a snapshot (the whole state) as of now.
SnapshotSource = Callable[[], Awaitable[bytes]]
NewerEpoch = Callable[[int, str], Awaitable[None]]


class PeerShipper:
    """Ships the journal to one peer (see the module docstring)."""

    def __init__(
        self,
        address: str,
        *,
        journal: Journal,
        settings: HaSettings,
        client: httpx.AsyncClient,
        snapshot: SnapshotSource,
        on_newer_epoch: NewerEpoch,
        on_ack: Callable[[], None],
        own_address: str,
    ) -> None:
        self.address = address
        self.journal = journal
        self.settings = settings
        self.client = client
        self._snapshot = snapshot
        self._on_newer_epoch = on_newer_epoch
        self._on_ack = on_ack
        self._own = own_address
        self.lag_gauge: Any = None
        #: The peer's acknowledged seq as of the last answer (None: not known since it was last
        #: unreachable, so it holds back every segment release).
        self.acked_seq: int | None = None
        #: The last acknowledged seq ever heard from it (what ``status`` shows while it is down).
        self.last_acked = 0
        self.peer_epoch = 0
        self.state = PeerState.DOWN
        self.wake = asyncio.Event()
        self.snapshots = 0

    def view(self) -> PeerView:
        acked = self.acked_seq if self.acked_seq is not None else self.last_acked
        return PeerView(self.address, acked, max(0, self.journal.last_seq - acked), self.state)

    async def run(self) -> None:
        backoff = 0.05
        while True:
            if self.lag_gauge is not None:
                self.lag_gauge.set(self.view().lag)
            try:
                sent = await self.round()
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except (httpx.HTTPError, OSError, ValueError) as exc:
                if self.state is not PeerState.DOWN:
                    log.warning("HA peer %s: %s", self.address, exc)
                self.state = PeerState.DOWN
                self.acked_seq = None
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)
                continue
            if sent:
                continue
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.settings.ship_interval_s)

    async def round(self) -> bool:
        """One exchange with the peer; whether records were sent (so go on at once)."""
        if self.acked_seq is None:
            self._learn(await self._post(b""))
        assert self.acked_seq is not None
        if self.peer_epoch > self.journal.epoch:
            await self._on_newer_epoch(self.peer_epoch, self.address)
            return False
        if self.peer_epoch < self.journal.epoch:
            await self._send_snapshot()
            return True
        try:
            records = self.journal.read_from(self.acked_seq, limit=self.settings.batch_max)
        except Behind:
            await self._send_snapshot()
            return True
        if not records:
            self.state = PeerState.UP
            return False
        records = _within(records, MAX_BATCH_BYTES)
        self.state = PeerState.BEHIND if self.view().lag > len(records) else PeerState.UP
        self._learn(await self._post(b"".join(records)))
        return True

    async def _send_snapshot(self) -> None:
        self.state = PeerState.BEHIND
        seq, epoch = self.journal.last_seq, self.journal.epoch
        payload = await self._snapshot()
        hour = hour_of(self.journal.clock.time())
        delta = Delta(seq, epoch, hour, new_nonce(), DeltaKind.SNAPSHOT.value, payload)
        record = seal(delta, self.journal.keyring.key(hour))
        log.info("HA peer %s gets a snapshot at seq %d (epoch %d)", self.address, seq, epoch)
        self.snapshots += 1
        self._learn(await self._post(record))

    async def _post(self, body: bytes) -> dict[str, Any]:
        """Send ``body``; the peer's answer. A refusal other than ``replayed`` / ``gap`` (which
        only say where to resume) is learnt from, then raised as ``Refusal``: the peer is
        retried after a back-off rather than at once."""
        response = await self.client.post(
            f"http://{self.address}/v1/ha/deltas",
            content=body,
            headers={"Content-Type": "application/octet-stream", ADDRESS_HEADER: self._own},
            timeout=self.settings.peer_timeout_s,
        )
        data = response.json()
        if response.status_code < 400:
            return dict(data)
        error = data.get("error", {}) if isinstance(data, dict) else {}
        code = error.get("code")
        if "acked_seq" not in error:
            raise Refusal(f"peer {self.address} answered {response.status_code} {code}")
        if code in RESUME_CODES:
            return dict(error)
        self._learn(error)
        if code not in ("stale_epoch", "not_standby"):
            log.warning(
                "HA peer %s refused a batch: %s (%s)", self.address, code, error.get("message")
            )
        raise Refusal(f"peer {self.address} refused the batch: {code}")

    def _learn(self, answer: dict[str, Any]) -> None:
        acked = int(answer["acked_seq"])
        self.peer_epoch = int(answer["epoch"])
        if answer.get("role") == "primary" and self.peer_epoch >= self.journal.epoch:
            # Another primary of the same or a newer epoch: never overwrite it.
            self.peer_epoch = max(self.peer_epoch, self.journal.epoch + 1)
        advanced = self.acked_seq is None or acked > self.acked_seq
        self.acked_seq = self.last_acked = acked
        if advanced:
            self._on_ack()


class Shippers:
    """Every peer's shipper, the lag metric, segment release and sync-mode waits."""

    def __init__(
        self,
        peers: list[str],
        *,
        journal: Journal,
        settings: HaSettings,
        metrics: Metrics,
        clock: Clock,
        snapshot: SnapshotSource,
        on_newer_epoch: NewerEpoch,
        own_address: str,
    ) -> None:
        self.journal = journal
        self.clock = clock
        self.client = httpx.AsyncClient(trust_env=False)
        self.peers = [
            PeerShipper(
                address,
                journal=journal,
                settings=settings,
                client=self.client,
                snapshot=snapshot,
                on_newer_epoch=on_newer_epoch,
                on_ack=self._acked,
                own_address=own_address,
            )
            for address in peers
        ]
        self._lag = metrics.gauge(
            "vramancer_ha_replication_lag_deltas",
            "Deltas journaled that a peer has not acknowledged yet.",
            ["peer"],
        )
        for peer in self.peers:
            peer.lag_gauge = self._lag.labels(peer=peer.address)
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ack = asyncio.Event()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks = [
            asyncio.create_task(p.run(), name=f"ha-ship-{p.address}") for p in self.peers
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def close(self) -> None:
        await self.stop()
        await self.client.aclose()

    def poke(self) -> None:
        """Wake every peer's loop (from any thread)."""
        loop = self._loop
        if loop is None:
            return
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for peer in self.peers:
            if here is loop:
                peer.wake.set()
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(peer.wake.set)

    def views(self) -> list[PeerView]:
        views = [p.view() for p in self.peers]
        for view in views:
            self._lag.labels(peer=view.address).set(view.lag)
        return views

    def _acked(self) -> None:
        self.views()
        acked = [p.acked_seq for p in self.peers]
        if acked and all(a is not None for a in acked):
            self.journal.release(min(a for a in acked if a is not None))
        event, self._ack = self._ack, asyncio.Event()
        event.set()

    async def wait_acked(self, seq: int, timeout_s: float) -> bool:
        """Whether at least one peer acknowledged ``seq`` within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self.poke()
        while not any((p.acked_seq or 0) >= seq for p in self.peers):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ack.wait(), remaining)
        return True


def _within(records: list[bytes], max_bytes: int) -> list[bytes]:
    """The first records that fit in ``max_bytes`` together (the first one always)."""
    total = 0
    for i, record in enumerate(records):
        total += len(record)
        if total > max_bytes and i > 0:
            return records[:i]
    return records
