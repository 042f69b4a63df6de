"""``HaService``: HA replication of one node, built by the runtime when ``ha_replication`` is on.

It owns the journal (``<data_dir>/ha/journal``), the replica state of a standby
(``<data_dir>/ha/replica.sqlite``), the role and epoch, and, by role:

* primary: ``Capture`` (every acknowledged change becomes a delta) and ``Shippers`` (one per
  peer); the task service dispatches and the memory store runs its maintenance;
* standby: the ``Receiver`` (``POST /v1/ha/deltas``) and its ``Applier``; the task service
  and the memory store start without their loops, so a standby runs no task and moves no block.

The service starts before every other component (it decides the role, asking its peers);
``wrap`` puts it first and makes the memory store and the task service start as the role says.
``promote`` raises the epoch and turns the node primary; a node that learns of a newer epoch
steps down (``step_down``). See docs/ha.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from vramancer.arbiter.arbiter import Arbiter
from vramancer.clock import Clock
from vramancer.events import EventBus
from vramancer.files import open_private
from vramancer.memory.store import TieredStore
from vramancer.models.manager import ModelManager
from vramancer.observability.metrics import Metrics
from vramancer.replication.apply import Applier
from vramancer.replication.capture import (
    DATA_TIERS,
    MANAGED_OWNERS,
    Capture,
    block_entry,
    profile_state,
)
from vramancer.replication.journal import Journal
from vramancer.replication.journal_files import journal_dir
from vramancer.replication.keys import KeyRing
from vramancer.replication.kinds import encode
from vramancer.replication.receiver import Receiver
from vramancer.replication.replica import ReplicaState
from vramancer.replication.roles import PeerStatus, primary_address, start_role
from vramancer.replication.settings import HaRole
from vramancer.replication.shipper import Shippers
from vramancer.tasks import sqlite_replica
from vramancer.tasks.service import TaskService
from vramancer.tasks.settings import Synchronous
from vramancer.tasks.sqlite_queue import SqliteQueue

if TYPE_CHECKING:
    from vramancer.config import Settings

log = logging.getLogger(__name__)

#: Bytes of block data a snapshot carries at most (hex-encoded in its JSON); blocks past it
#: travel as entries only.
SNAPSHOT_DATA_BYTES = 24 * 1024 * 1024
#: Written at a clean stop (``<data_dir>/ha/stopped.json``): what capture had not journaled.
STOP_FILE = "stopped.json"
#: Seconds a peer is given to answer the start-up question.
PROBE_TIMEOUT_S = 2.0


class Component(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class _GatedMemory:
    """The memory store, started without its maintenance loop on a standby."""

    def __init__(self, memory: TieredStore, ha: HaService) -> None:
        self.memory, self.ha = memory, ha

    async def start(self) -> None:
        await self.memory.start(maintenance=self.ha.is_primary)

    async def stop(self) -> None:
        await self.memory.stop()


class _GatedTasks:
    """The task service, started without its dispatch loop on a standby."""

    def __init__(self, tasks: TaskService, ha: HaService) -> None:
        self.tasks, self.ha = tasks, ha

    async def start(self) -> None:
        await self.tasks.start(dispatch=self.ha.is_primary)

    async def stop(self) -> None:
        await self.tasks.stop()


class _GatedModels:
    """The model manager, started without its ``initial_profile`` on a standby."""

    def __init__(self, models: ModelManager, ha: HaService) -> None:
        self.models, self.ha = models, ha

    async def start(self) -> None:
        await self.models.start(initial_profile=self.ha.is_primary)

    async def stop(self) -> None:
        await self.models.stop()


class _Resync:
    """Last to start, first to stop: marks what an earlier run left unjournaled once every
    subsystem is up (``HaService.resync``)."""

    def __init__(self, ha: HaService) -> None:
        self.ha = ha

    async def start(self) -> None:
        await self.ha.resync()

    async def stop(self) -> None:
        return None


class HaService:
    """See the module docstring."""

    def __init__(
        self,
        settings: Settings,
        *,
        memory: TieredStore,
        tasks: TaskService,
        models: ModelManager,
        arbiter: Arbiter,
        events: EventBus,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.ha = settings.ha
        self.peers = settings.peers
        self.memory, self.tasks, self.models, self.arbiter = memory, tasks, models, arbiter
        self.clock = clock
        self.metrics = metrics
        secret = settings.ha_secret.get_secret_value().encode() if settings.ha_secret else b""
        self.keyring = KeyRing(secret)
        self.journal = Journal(
            journal_dir(settings.data_dir),
            self.keyring,
            segment_max_bytes=int(settings.ha_journal_max),
            # What an acknowledgement promises follows the task queue's: fsync'd with "full".
            fsync=settings.tasks.synchronous is Synchronous.FULL,
            clock=clock,
            metrics=metrics,
        )
        self.replica = ReplicaState(settings.data_dir / "ha" / "replica.sqlite")
        self.role = settings.ha_role
        self.primary: str | None = None
        self.sync = settings.ha_sync
        self.capture = Capture(
            events=events,
            tasks=tasks,
            memory=memory,
            models=models,
            append=self._append,
            replicate_data=self.ha.replicate_data,
        )
        self.applier = Applier(tasks=tasks, memory=memory, models=models, replica=self.replica)
        self.receiver = Receiver(
            self.journal,
            self.keyring,
            apply=self._apply,
            clock=clock,
            metrics=metrics,
            role=lambda: self.role.value,
        )
        self.shippers: Shippers | None = None
        self._transition = asyncio.Lock()
        self._started = False
        #: What the previous run left (``stopped.json``); None: it did not stop cleanly.
        self._left: dict[str, Any] | None = None
        self._reconcile: asyncio.Task[None] | None = None
        #: A standby's leased task rows as replicated, put back once its queue is open.
        self._leased: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ composition

    def wrap(self, components: Sequence[Component]) -> list[Component]:
        """The runtime's components with this service first and the memory store and the task
        service started as the role says."""
        out: list[Component] = [self]
        for component in components:
            if component is self.memory:
                out.append(_GatedMemory(self.memory, self))
            elif component is self.tasks:
                out.append(_GatedTasks(self.tasks, self))
            elif component is self.models:
                out.append(_GatedModels(self.models, self))
            else:
                out.append(component)
        return [*out, _Resync(self)]

    @property
    def is_primary(self) -> bool:
        return self.role is HaRole.PRIMARY

    @property
    def own_address(self) -> str:
        server = self.settings.server
        host = server.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return f"{host}:{server.port}"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the journal and the replica state, decide the role, start its parts."""
        await asyncio.to_thread(self.journal.open)
        await asyncio.to_thread(self.replica.open)
        self._left = await asyncio.to_thread(self._read_stop_file)
        peers = await self.probe()
        decided = start_role(self.settings.ha_role, self.journal.epoch, peers)
        self.role, self.primary = decided.role, decided.primary
        if self.primary is None and not self.is_primary and len(self.peers) == 1:
            self.primary = self.peers[0]
        log.warning(
            "HA replication: starting as %s at epoch %d (%s)",
            self.role.value,
            self.journal.epoch,
            decided.reason,
        )
        if self.is_primary:
            self._start_primary_parts()
        else:
            # Opening the task queue takes back every lease and kills the processes they name
            # (a daemon restarting after a crash); on a standby those leases and processes are
            # the primary's: their pids are cleared first and their rows put back afterwards.
            queue = self.tasks.queue
            if isinstance(queue, SqliteQueue):
                self._leased = await asyncio.to_thread(sqlite_replica.take_leased_rows, queue.path)
        self._started = True

    async def stop(self) -> None:
        """Stop; what capture had not journaled yet is kept in ``stopped.json`` (its absence at
        the next start means a crash: everything is marked again)."""
        was_primary = self.is_primary
        await self._stop_primary_parts()
        pending = self.capture.pending() if was_primary else []
        await asyncio.to_thread(self._write_stop_file, pending)
        await asyncio.to_thread(self.journal.close)
        await asyncio.to_thread(self.replica.close)
        self._started = False

    def _start_primary_parts(self) -> None:
        self.capture.enabled = True
        self.capture.start()
        self.shippers = Shippers(
            self.peers,
            journal=self.journal,
            settings=self.ha,
            metrics=self.metrics,
            clock=self.clock,
            snapshot=self.snapshot,
            on_newer_epoch=self._newer_epoch,
            own_address=self.own_address,
        )
        self.shippers.start()

    async def _stop_primary_parts(self) -> None:
        self.capture.enabled = False
        await self.capture.stop()
        if self.shippers is not None:
            await self.shippers.close()
            self.shippers = None

    async def resync(self) -> None:
        """Once every subsystem is up. On a primary: mark again what the previous run left
        unjournaled (see ``Capture.resync``). On a standby: put back the primary's leased task
        rows that opening the queue took back."""
        left, self._left = self._left, None
        if not self.is_primary:
            leased, self._leased = self._leased, []
            queue = self.tasks.queue
            if leased and isinstance(queue, SqliteQueue):
                await sqlite_replica.upsert_rows(queue, leased)
                self.tasks.telemetry.reset(await queue.counts())
            return
        everything = left is None
        marks = await self.capture.resync(
            everything=everything, pending=list(left.get("pending", [])) if left else []
        )
        if everything:
            log.warning("HA replication: no clean stop recorded; re-journaling %d items", marks)

    @property
    def _stop_file(self) -> Path:
        return self.settings.data_dir / "ha" / STOP_FILE

    def _read_stop_file(self) -> dict[str, Any] | None:
        path = self._stop_file
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        path.unlink(missing_ok=True)
        return data if isinstance(data, dict) else None

    def _write_stop_file(self, pending: list[list[Any]]) -> None:
        path = self._stop_file
        temporary = path.with_suffix(".tmp")
        fd = open_private(temporary)
        try:
            os.write(fd, json.dumps({"pending": pending}).encode())
        finally:
            os.close(fd)
        os.replace(temporary, path)

    async def probe(self) -> list[PeerStatus]:
        """Ask every peer where it stands (an empty ``POST /v1/ha/deltas``); silent peers are
        left out."""
        async with httpx.AsyncClient(trust_env=False, timeout=PROBE_TIMEOUT_S) as client:
            answers = await asyncio.gather(
                *(self._probe_one(client, p) for p in self.peers), return_exceptions=True
            )
        return [a for a in answers if isinstance(a, PeerStatus)]

    async def _probe_one(self, client: httpx.AsyncClient, address: str) -> PeerStatus:
        response = await client.post(f"http://{address}/v1/ha/deltas", content=b"")
        data = response.json()
        data = data.get("error", data) if isinstance(data, dict) else {}
        return PeerStatus(address, int(data["epoch"]), HaRole(data["role"]), int(data["acked_seq"]))

    # ------------------------------------------------------------------ roles

    async def promote(self) -> dict[str, Any]:
        """Raise the epoch and turn this node primary (a primary stays as it is)."""
        async with self._transition:
            if self.is_primary:
                return self.status()
            epoch = self.journal.epoch + 1
            await asyncio.to_thread(self.journal.set_epoch, epoch)
            self.role, self.primary = HaRole.PRIMARY, None
            log.warning("HA replication: promoted to primary at epoch %d", epoch)
            self._start_primary_parts()
            # Reopening the queue takes back the leases of the old primary's running tasks
            # (they run again here: at-least-once), then the dispatch loop starts.
            await self.tasks.stop()
            await self.tasks.start()
            self.memory.start_maintenance()
            self._reconcile = asyncio.get_running_loop().create_task(self._apply_profile())
            return self.status()

    async def _apply_profile(self) -> None:
        """After a promotion: load what the replicated profile in force says."""
        name = self.models.profile
        try:
            report = await self.models.switch_profile(name)
        except Exception:
            log.exception("HA promotion: applying profile %s failed", name)
            return
        if not report.ok:
            log.warning("HA promotion: profile %s did not apply fully", name)

    async def step_down(self, epoch: int, primary: str | None) -> None:
        """A newer epoch exists: stop capturing and dispatching, wait for the new primary."""
        async with self._transition:
            if not self.is_primary:
                return
            log.warning(
                "HA replication: peer %s is at epoch %d (this node: %d); stepping down",
                primary,
                epoch,
                self.journal.epoch,
            )
            self.role, self.primary = HaRole.STANDBY, primary
            await self._stop_primary_parts()
            await self.memory.stop_maintenance()
            await self.tasks.stop()
            await self.tasks.start(dispatch=False)

    async def _newer_epoch(self, epoch: int, address: str) -> None:
        asyncio.get_running_loop().create_task(self.step_down(epoch, address))

    # ------------------------------------------------------------------ journal I/O

    def _append(self, deltas: Sequence[tuple[str, bytes]]) -> int:
        self.journal.append_many(deltas)
        shippers = self.shippers
        if shippers is not None:
            shippers.views()  # the lag gauges follow the journal
            shippers.poke()
        return self.journal.last_seq

    async def _apply(self, deltas: list[tuple[str, bytes]]) -> None:
        await self.applier.apply(deltas)

    async def receive(self, body: bytes, advertised: str | None) -> dict[str, Any]:
        """``POST /v1/ha/deltas``. A primary that receives genuine deltas of a newer epoch was
        replaced: it steps down first, then takes them as a standby."""
        if body and self.is_primary:
            epoch = self.receiver.newer_epoch(body)
            if epoch is not None:
                sender = primary_address(advertised, self.peers) if advertised else None
                await self.step_down(epoch, sender)
        answer = await self.receiver.receive(body)
        if body and advertised:
            self.primary = primary_address(advertised, self.peers)
        return answer

    async def rotate(self) -> dict[str, Any]:
        await asyncio.to_thread(self.journal.rotate)
        return self.status()

    # ------------------------------------------------------------------ sync mode

    async def confirm(self) -> bool:
        """Sync mode: whether a peer holds every change made so far (within
        ``[ha] sync_timeout_s``)."""
        timeout = self.ha.sync_timeout_s
        try:
            seq = await asyncio.wait_for(self.capture.barrier(), timeout)
        except TimeoutError:
            return False
        if seq == 0:
            return True
        shippers = self.shippers
        if shippers is None:
            return False
        return await shippers.wait_acked(seq, timeout)

    # ------------------------------------------------------------------ status, snapshot

    def status(self) -> dict[str, Any]:
        views = self.shippers.views() if self.shippers is not None else []
        return {
            "enabled": True,
            "role": self.role.value,
            "epoch": self.journal.epoch,
            "last_seq": self.journal.last_seq,
            "journal_bytes": self.journal.size_bytes,
            "peers": [v.as_dict() for v in views]
            if self.is_primary
            else [
                {
                    "address": p,
                    "acked_seq": 0,
                    "lag": 0,
                    "state": "up" if p == self.primary else "down",
                }
                for p in self.peers
            ],
            "primary": self.peers_primary(),
            "sync": self.sync,
            "snapshots_sent": sum(p.snapshots for p in self.shippers.peers) if self.shippers else 0,
            "replica": {
                "blocks_without_data": self.replica.count("blocks"),
                "allocations": self.replica.count("allocations"),
            },
        }

    def peers_primary(self) -> str | None:
        return None if self.is_primary else self.primary

    async def snapshot(self) -> bytes:
        """The whole replicated state now (the payload of a ``snapshot`` delta)."""
        queue = self.tasks.queue
        rows = await sqlite_replica.all_rows(queue) if isinstance(queue, SqliteQueue) else []
        blocks = await asyncio.to_thread(self._snapshot_blocks)
        allocations = [
            a.as_dict()
            for a in self.arbiter.allocations()
            if not (a.owner or "").startswith(MANAGED_OWNERS)
        ]
        allocations += self.replica.items("allocations")
        return encode(
            {
                "tasks": rows,
                "blocks": blocks,
                "profile": profile_state(self.models),
                "allocations": allocations,
            }
        )

    def _snapshot_blocks(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        budget = SNAPSHOT_DATA_BYTES
        offset = 0
        while True:
            page, total = self.memory.list_blocks(limit=1000, offset=offset)
            for info in page:
                item: dict[str, Any] = {"entry": block_entry(info), "data_hex": None}
                size = int(info.get("size", 0))
                if self.ha.replicate_data and info.get("tier") in DATA_TIERS and size <= budget:
                    with contextlib.suppress(Exception):
                        data, _ = self.memory.peek_bytes(str(info["id"]))
                        item["data_hex"] = data.hex()
                        budget -= size
                out.append(item)
            offset += len(page)
            if not page or offset >= total:
                break
        out += [{"entry": e, "data_hex": None} for e in self.replica.items("blocks")]
        return out
