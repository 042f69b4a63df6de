"""``PoolQueue``: the JetStream queue as a node of the pool uses it.

On top of ``JetStreamQueue`` (the ``TaskQueue`` itself):

* ``leased()``: the tasks holding a lease now, from the copy (what the dispatcher counts per
  device);
* ``renew(leases)``: a node extends only the leases of the attempts it really runs (task and
  lease token), never every lease recorded under its name — a restarted worker must not keep
  alive the lease of an attempt its previous process was running;
* ``open`` that does not fail while NATS is unreachable: the copy starts empty and loads at the
  first connection (``resync``), so a daemon starts with its NATS servers down;
* ``on_change``: every change of a task written by *another* process (seen by the watcher), so
  this daemon's events, metrics, counts and waiters follow tasks it does not run itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace

from vramancer.errors import BackendUnavailable
from vramancer.pool import records as rec
from vramancer.pool.jsqueue import JetStreamQueue
from vramancer.pool.kvbucket import Value
from vramancer.pool.mirror import TaskMirror
from vramancer.pool.records import StoredTask
from vramancer.tasks.model import LEASED_STATES, Change, TaskRecord

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

    #: Hears of every task change another process wrote (after the copy holds it).
    on_change: Callable[[Change], None] | None = None

    def leased(self) -> list[TaskRecord]:
        return [s.record for s in self._mirror.in_state(*LEASED_STATES)]

    async def renew(self, leases: Sequence[tuple[str, int]], *, now: float, lease_s: float) -> int:
        """Extend the lease of each ``(task_id, lease_token)`` still held under that token."""

        def extend_for(token: int) -> Callable[[StoredTask], tuple[StoredTask, bool] | None]:
            def extend(s: StoredTask) -> tuple[StoredTask, bool] | None:
                if s.record.lease_token != token or s.state not in LEASED_STATES:
                    return None
                return replace(s, lease_expires=now + lease_s), True

            return extend

        return len(await self._each((task_id, extend_for(token)) for task_id, token in leases))

    async def open(self) -> None:
        try:
            await super().open()
        except BackendUnavailable as exc:
            log.warning(
                "the pool's task queue is unreachable (%s): it loads when NATS answers", exc
            )

    def _apply(self, mirror: TaskMirror, key: str, value: Value, *, watched: bool) -> None:
        hook = self.on_change
        notify = (
            hook is not None
            and watched
            and mirror is self._mirror
            and value.data is not None
            and key.startswith(rec.TASK_PREFIX)
        )
        before = mirror.get(rec.task_id_of(key)) if notify else None
        known = before is not None and mirror.revisions.get(before.task_id, 0) >= value.revision
        super()._apply(mirror, key, value, watched=watched)
        if not notify or known or hook is None:
            return
        after = mirror.get(rec.task_id_of(key))
        if after is None:
            return
        change = change_between(before.record if before is not None else None, after.record)
        if change is not None:
            try:
                hook(change)
            except Exception:
                log.exception("a task change listener failed")
