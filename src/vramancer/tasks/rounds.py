"""One dispatch round of user tasks, carried out: read the ready tasks, let the pure plan
(``dispatch.RoundPlan``) place them, lease the grants, record the waits, then start the leased
tasks here (``workers``) or hand them to their nodes (a pool).

Reads follow the free slots: a first page of ``FIRST_PAGE + 2`` per free slot ready tasks (more
when some did not fit), overdue tasks (aging) first. With every slot taken a round still offers
the first ``SATURATED_PAGE`` ready tasks, so they wait saying why; ``room_left`` tells the
dispatch loop whether another round at once could start more.
"""

from __future__ import annotations

import asyncio

from vramancer.devices.ids import DeviceId
from vramancer.tasks.device_views import LocalViews
from vramancer.tasks.dispatch import RoundPlan
from vramancer.tasks.model import READY_STATES, Grant
from vramancer.tasks.picker import PickerPolicy
from vramancer.tasks.ports import PoolPort
from vramancer.tasks.queue import TaskQueue
from vramancer.tasks.settings import TasksSettings
from vramancer.tasks.telemetry import Telemetry
from vramancer.tasks.workers import Workers

#: Overdue tasks (aging) offered first per dispatch round, at most.
OVERDUE_MAX = 8
#: A round reads ``FIRST_PAGE + 2 × free slots`` ready tasks first (more when some did not
#: fit): most rounds fill one freed slot with the first task, and every row read is a record
#: built.
FIRST_PAGE = 2
#: With every slot taken, the first this many ready tasks are offered, so they wait saying why.
SATURATED_PAGE = 8


class UserRounds:
    """The user lane's rounds on this daemon's queue (see the module docstring)."""

    def __init__(
        self,
        settings: TasksSettings,
        *,
        queue: TaskQueue,
        workers: Workers,
        views: LocalViews,
        policy: PickerPolicy,
        telemetry: Telemetry,
        worker_id: str,
        pool: PoolPort | None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.workers = workers
        self.views = views
        self.policy = policy
        self.telemetry = telemetry
        self.worker_id = worker_id
        self.pool = pool
        #: The last round left a slot free (another round at once may fill it).
        self.room_left = True

    def plan(self, now: float) -> RoundPlan | None:
        if self.pool is None:
            return RoundPlan(self.views.now(), self.policy)
        if not self.pool.may_dispatch():
            return None
        return RoundPlan(self.pool.views(now), self.policy, pool=True)

    async def run(self, now: float) -> int:
        """One round; the number of tasks it started (or handed over)."""
        self.room_left = True
        if not self.telemetry.lane_count(False, READY_STATES):
            return 0
        plan = self.plan(now)
        if plan is None:
            return 0
        # every slot taken: the first ready tasks are still offered, so they wait saying why
        await self._offer_ready(plan, now)
        if self.pool is not None:
            return await self._hand_over(plan, now)
        (leased, lease_changes), wait_changes = await asyncio.gather(
            self.queue.lease(
                plan.grants, worker=self.worker_id, now=now, lease_s=self.settings.lease_s
            ),
            self.queue.set_waiting(plan.waiting, now),
        )
        self.telemetry.publish([*lease_changes, *wait_changes])
        started = 0
        for record in leased:
            if await self.workers.launch(record, plan.cuda.get(record.task_id)):
                started += 1
        self.room_left = plan.free_slots > 0 or started < len(leased)
        return started

    async def _offer_ready(self, plan: RoundPlan, now: float) -> None:
        """Offer the plan the overdue tasks first, then the ready ones in dispatch order."""
        scan = self.settings.dispatch_scan
        # Read only about what the free slots can take; read on when tasks did not fit. With
        # no free slot, one page only: those tasks get their waiting reason.
        saturated = plan.free_slots == 0
        page = min(scan, SATURATED_PAGE if saturated else FIRST_PAGE + 2 * plan.free_slots)
        starvation = self.settings.starvation_s
        candidates, overdue = await self.queue.dispatch_view(
            limit=page,
            overdue_before=now - starvation if starvation > 0 else None,
            overdue_limit=OVERDUE_MAX,
        )
        for record in overdue:
            if plan.free_slots == 0:
                break
            plan.offer(record, overdue_after_s=self.settings.starvation_s)
        seen = 0
        while True:
            seen += len(candidates)
            for record in candidates:
                if plan.free_slots == 0 and not plan.holding and not saturated:
                    break
                if record.task_id not in plan.offered:
                    plan.offer(record)
            if plan.free_slots == 0 or len(candidates) < page or seen >= scan:
                break
            page = min(scan - seen, FIRST_PAGE + 2 * plan.free_slots)
            candidates = await self.queue.ready(maintenance=False, limit=page, offset=seen)

    async def _hand_over(self, plan: RoundPlan, now: float) -> int:
        """A pool's round: lease each grant to its node (the node holds the lease and renews
        it), then send the task to that node's work subject."""
        pool = self.pool
        assert pool is not None
        by_node: dict[str, list[Grant]] = {}
        for grant in plan.grants:
            node = DeviceId.parse(grant.device).node or pool.node
            by_node.setdefault(node, []).append(grant)
        lease_s = self.settings.lease_s
        leases = await asyncio.gather(
            *(
                self.queue.lease(grants, worker=node, now=now, lease_s=lease_s)
                for node, grants in by_node.items()
            )
        )
        self.telemetry.publish(await self.queue.set_waiting(plan.waiting, now))
        started = 0
        for records, changes in leases:
            self.telemetry.publish(changes)
            for record in records:
                if await pool.launch(record):
                    started += 1
        return started
