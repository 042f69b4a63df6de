"""``PoolQueue``: the JetStream queue as a node of the pool uses it.

On top of ``JetStreamQueue`` (the ``TaskQueue`` itself):

* ``leased()``: the tasks holding a lease now, from the copy (what the dispatcher counts per
  device);
* ``renew(leases)``: a node extends only the leases of the attempts it really runs (task and
  lease token), never every lease recorded under its name — a restarted worker must not keep
  alive the lease of an attempt its previous process was running;
* ``open`` that does not fail while NATS is unreachable: the copy starts empty and loads at the
  first connection (``resync``), so a daemon starts with its NATS servers down;
* ``follow``: every change of a task in the pool as the bucket delivers it (once per revision,
  this process's own writes included), so an orchestrator's events, metrics, counts and waiters
  follow every task of the pool, whoever wrote it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

from vramancer.errors import BackendUnavailable
from vramancer.pool.jsqueue import JetStreamQueue
from vramancer.pool.records import StoredTask
from vramancer.tasks.model import LEASED_STATES, Change, TaskRecord
from vramancer.tasks.queue import Purged

log = logging.getLogger(__name__)


def change_between(before: TaskRecord | None, after: TaskRecord) -> Change | None:
    """The ``Change`` a state move from ``before`` to ``after`` is (None: the state is the same)."""
    previous = before.state if before is not None else None
    if previous is after.state:
        return None
    run_s = None
    if after.state.terminal and after.started_at is not None and after.finished_at is not None:
        run_s = max(0.0, after.finished_at - after.started_at)
    wait_s = None
    if after.started_at is not None and before is not None and before.started_at is None:
        wait_s = max(0.0, after.started_at - (after.ready_at or after.submitted_at))
    return Change(
        after.task_id,
        previous,
        after.state,
        attempts=after.attempts,
        device=after.device,
        exit_code=after.exit_code,
        error=after.error,
        wait_s=wait_s,
        run_s=run_s,
        type=after.type,
    )


class PoolQueue(JetStreamQueue):
    """See the module docstring."""

    def follow(
        self,
        changed: Callable[[Change], None],
        deleted: Callable[[Purged], None],
        loaded: Callable[[], None],
    ) -> None:
        """Hear of every task change and delete in the pool, from the bucket itself (exactly
        once per revision, this process's own writes included), after ``loaded``: the first
        whole load of the bucket (the starting point)."""
        self.store.on_loaded = loaded

        def heard(before: TaskRecord | None, after: TaskRecord | None) -> None:
            if after is None:
                if before is not None:
                    deleted(
                        Purged(
                            before.task_id, before.attempts, before.type.maintenance, before.state
                        )
                    )
                return
            change = change_between(before, after)
            if change is not None:
                changed(change)

        self.store.on_change = heard

    async def fresh(self, task_id: str) -> TaskRecord | None:
        """The task as the bucket holds it now (read through; the copy is updated too): a
        worker handed a lease its copy has not heard of yet reads it rather than wait."""
        found = await self.store.read(task_id)
        return found[0].record if found is not None else None

    def leased(self) -> list[TaskRecord]:
        return [s.record for s in self.store.mirror.in_state(*LEASED_STATES)]

    async def renew(self, leases: Sequence[tuple[str, int]], *, now: float, lease_s: float) -> int:
        """Extend the lease of each ``(task_id, lease_token)`` still held under that token."""

        def extend_for(token: int) -> Callable[[StoredTask], tuple[StoredTask, bool] | None]:
            def extend(s: StoredTask) -> tuple[StoredTask, bool] | None:
                if s.record.lease_token != token or s.state not in LEASED_STATES:
                    return None
                return replace(s, lease_expires=now + lease_s), True

            return extend

        calls = ((task_id, extend_for(token)) for task_id, token in leases)
        return len(await self.store.each(calls))

    async def open(self) -> None:
        try:
            await super().open()
        except BackendUnavailable as exc:
            log.warning(
                "the pool's task queue is unreachable (%s): it loads when NATS answers", exc
            )
