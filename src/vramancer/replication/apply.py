"""How a standby applies deltas: each one upserts or deletes the matching state.

* ``task`` / ``task_delete``: the row goes into the standby's own SQLite queue as it is
  (``tasks/sqlite_replica.py``), the primary's ``seq`` kept; the task counts are re-read after
  each batch. The standby never dispatches (its task service starts without its loops).
* ``block`` / ``block_delete``: with bytes, the block is put into the memory store (durably, so
  it sits on a disk tier) with its priority, hint and pin; without bytes, the standby keeps
  only the entry (``replica.ReplicaState``) and drops any older copy it held (its bytes may be
  stale). The standby's store runs no maintenance, so nothing moves blocks around.
* ``profile``: the profile in force and its last report are recorded (no model is loaded).
* ``allocation`` / ``allocation_delete``: recorded (``ReplicaState``), not granted.
* ``snapshot``: the whole state, replacing what the standby held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from vramancer.errors import NotFound
from vramancer.memory.store import TieredStore
from vramancer.models.manager import ModelManager
from vramancer.models.types import PlanStep, StepAction, StepResult, StepStatus, SwitchReport
from vramancer.replication.kinds import DeltaKind, unpack
from vramancer.replication.replica import ReplicaState
from vramancer.tasks import sqlite_replica
from vramancer.tasks.service import TaskService
from vramancer.tasks.sqlite_queue import SqliteQueue

log = logging.getLogger(__name__)


def switch_report(data: dict[str, Any] | None) -> SwitchReport | None:
    """A ``SwitchReport`` rebuilt from its ``as_dict()``."""
    if data is None:
        return None
    steps = tuple(
        StepResult(
            PlanStep(StepAction(s["action"]), s["model"], s.get("device"), s.get("reason", "")),
            StepStatus(s["status"]),
            float(s.get("duration_s", 0.0)),
            s.get("error"),
            s.get("error_code"),
        )
        for s in data.get("steps", [])
    )
    return SwitchReport(
        profile=data["name"],
        previous=data["previous"],
        ok=bool(data["ok"]),
        steps=steps,
        duration_s=float(data.get("duration_s", 0.0)),
        failed_step=data.get("failed_step"),
        notes=tuple(data.get("notes", [])),
    )


def block_value(entry: dict[str, Any], data: bytes) -> object:
    """The value to put: a numpy array again for a numpy block, else the bytes."""
    if entry.get("kind") == "numpy":
        try:
            import numpy as np

            return np.frombuffer(data, dtype=np.dtype(entry["dtype"])).reshape(entry["shape"])
        except (ImportError, ValueError, TypeError, KeyError):
            return data
    return data


class Applier:
    """Applies decoded deltas to the standby's subsystems (see the module docstring)."""

    def __init__(
        self,
        *,
        tasks: TaskService,
        memory: TieredStore,
        models: ModelManager,
        replica: ReplicaState,
    ) -> None:
        self.tasks = tasks
        self.memory = memory
        self.models = models
        self.replica = replica

    async def apply(self, deltas: Sequence[tuple[str, bytes]]) -> None:
        """Apply ``(kind, payload)`` in order; task rows are written in runs."""
        rows: list[dict[str, Any]] = []
        touched_tasks = False
        for kind, raw in deltas:
            payload, data = unpack(raw)
            if kind == DeltaKind.TASK:
                rows.append(payload["row"])
                continue
            if rows:
                await self._upsert(rows)
                rows = []
            touched_tasks = touched_tasks or kind in (DeltaKind.TASK_DELETE, DeltaKind.SNAPSHOT)
            await self._apply_one(kind, payload, data)
        if rows:
            await self._upsert(rows)
            touched_tasks = True
        if touched_tasks:
            self.tasks.telemetry.reset(await self.tasks.queue.counts())

    def _queue(self) -> SqliteQueue:
        queue = self.tasks.queue
        if not isinstance(queue, SqliteQueue):
            raise RuntimeError("HA replication of tasks needs the SQLite task queue")
        return queue

    async def _upsert(self, rows: list[dict[str, Any]]) -> None:
        await sqlite_replica.upsert_rows(self._queue(), rows)

    async def _apply_one(self, kind: str, payload: dict[str, Any], data: bytes | None) -> None:
        if kind == DeltaKind.TASK_DELETE:
            await sqlite_replica.delete_rows(self._queue(), [payload["id"]])
        elif kind == DeltaKind.BLOCK:
            await asyncio.to_thread(self.put_block, payload["block"], data)
        elif kind == DeltaKind.BLOCK_DELETE:
            await asyncio.to_thread(self.delete_block, payload["id"])
        elif kind == DeltaKind.PROFILE:
            self.set_profile(payload)
        elif kind == DeltaKind.ALLOCATION:
            allocation = payload["allocation"]
            self.replica.put("allocations", str(allocation["id"]), allocation)
        elif kind == DeltaKind.ALLOCATION_DELETE:
            self.replica.delete("allocations", str(payload["id"]))
        elif kind == DeltaKind.SNAPSHOT:
            await self.apply_snapshot(payload)
        else:
            raise ValueError(f"kind: {kind!r} is not a delta kind this node applies")

    # ------------------------------------------------------------------ blocks

    def put_block(self, entry: dict[str, Any], data: bytes | None) -> None:
        block_id = str(entry["id"])
        if data is None:
            self.replica.put("blocks", block_id, entry)
            with contextlib.suppress(NotFound):
                self.memory.delete(block_id)
            return
        self.replica.delete("blocks", block_id)
        store = self.memory
        with contextlib.suppress(NotFound):
            store.unpin(block_id)
        store.put_receipt(
            block_id,
            block_value(entry, data),
            int(entry.get("priority", 0)),
            entry.get("hint"),
            durable=True,
        )
        tier = str(entry.get("tier", ""))
        if tier and tier in store.tiers and store.locate(block_id) != tier:
            with contextlib.suppress(Exception):
                store.demote(block_id, tier)
        if entry.get("pinned"):
            store.pin(block_id)

    def _block_ids(self) -> list[str]:
        ids: list[str] = []
        while True:
            page, total = self.memory.list_blocks(limit=1000, offset=len(ids))
            ids += [str(b["id"]) for b in page]
            if not page or len(ids) >= total:
                return ids

    def delete_block(self, block_id: str) -> None:
        self.replica.delete("blocks", block_id)
        with contextlib.suppress(NotFound):
            self.memory.delete(block_id)

    # ------------------------------------------------------------------ profile, snapshot

    def set_profile(self, payload: dict[str, Any]) -> None:
        self.models.adopt_profile(str(payload["name"]), switch_report(payload.get("last_switch")))

    async def apply_snapshot(self, payload: dict[str, Any]) -> None:
        """Replace the replicated state with the snapshot's."""
        await sqlite_replica.replace_all(self._queue(), payload.get("tasks", []))
        blocks = payload.get("blocks", [])
        keep = {str(b["entry"]["id"]) for b in blocks}
        stale = [b for b in await asyncio.to_thread(self._block_ids) if b not in keep]
        for block_id in stale:
            await asyncio.to_thread(self.delete_block, block_id)
        self.replica.clear("blocks")
        for block in blocks:
            data = block.get("data_hex")
            raw = bytes.fromhex(data) if data is not None else None
            await asyncio.to_thread(self.put_block, block["entry"], raw)
        if payload.get("profile") is not None:
            self.set_profile(payload["profile"])
        self.replica.clear("allocations")
        for allocation in payload.get("allocations", []):
            self.replica.put("allocations", str(allocation["id"]), allocation)
