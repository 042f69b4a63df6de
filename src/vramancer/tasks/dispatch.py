"""One dispatch round as a pure plan: which ready tasks start where, which wait and why.

The service reads the ready tasks and the device views, offers the tasks to a ``RoundPlan`` in
order, then leases the grants and records the waits. No I/O here, so the order rules are
tested without a queue:

* tasks that have waited longer than ``[tasks] starvation_s`` are offered first, longest
  waiting first (aging: neither a stream of smaller tasks nor of shorter or higher-priority
  ones can pass them forever);
* such an overdue task that fits nowhere gets a device held for it (``picker.hold``): no later
  task of the round may start there, so the device drains until the task fits;
* then the other ready tasks, in the queue's order (priority, expected run time, submission);
  a task that does not fit is skipped, so it does not block smaller ones behind it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vramancer.tasks.model import Grant, TaskRecord, TaskState
from vramancer.tasks.picker import DeviceView, PickerPolicy, Placement, assume, hold, pick


def pinned_node(record: TaskRecord) -> str | None:
    """The node a task's body pins it to (``"node"``), or None."""
    if '"node"' not in record.spec_json:
        return None
    node = record.spec.get("node")
    return node if isinstance(node, str) else None


#: Prefix of the reason a waiting task shows (``error`` of its status).
WAITING = "waiting for a device: "
#: In the reason of an overdue task a device is held for: `` (gpu:0 is held for it: ...)``.
HELD_NOTE = " is held for it: "


def hold_note(reason: str | None) -> str:
    """The `` (gpu:N is held for it: ...)`` ending of a reason the dispatcher recorded, or ""
    (a hold is decided by a round: it is not in the device views a reader sees)."""
    if reason is None or HELD_NOTE not in reason:
        return ""
    start = reason.rfind(" (", 0, reason.find(HELD_NOTE))
    return reason[start:] if start >= 0 else ""


@dataclass
class RoundPlan:
    """Places tasks one by one on ``views``; see the module docstring."""

    views: list[DeviceView]
    policy: PickerPolicy
    grants: list[Grant] = field(default_factory=list)
    #: The CUDA index each granted task sees (None: simulated GPU or the host).
    cuda: dict[str, int | None] = field(default_factory=dict)
    #: ``(task_id, reason, state it was read in)`` for tasks that wait.
    waiting: list[tuple[str, str, TaskState]] = field(default_factory=list)
    offered: set[str] = field(default_factory=set)
    #: The views are a pool's (``NODE/gpu:N``): a task's ``node`` pins it to that node.
    pool: bool = False

    @property
    def free_slots(self) -> int:
        """Slots still free on devices that are not held."""
        return sum(max(0, v.slots - v.running) for v in self.views if v.held_for is None)

    @property
    def holding(self) -> bool:
        """A device is held for an overdue task: tasks already read are still offered, so the
        ones it blocks say why they wait."""
        return any(v.held_for is not None for v in self.views)

    def offer(self, record: TaskRecord, *, overdue_after_s: float | None = None) -> bool:
        """Place ``record`` if a device can take it; True when granted. ``overdue_after_s``:
        it has waited longer than this (``starvation_s``): hold a device for it when it does
        not fit (the reason's text stays the same from round to round)."""
        self.offered.add(record.task_id)
        node = pinned_node(record) if self.pool else None
        decision = pick(self.views, record.vram_bytes, record.gpu, self.policy, node)
        if isinstance(decision, Placement):
            self.views = assume(self.views, decision, record.vram_bytes, record.task_id)
            self.grants.append(Grant(record.task_id, decision.device, previous=record.state))
            self.cuda[record.task_id] = next(
                v.cuda_index for v in self.views if v.device == decision.device
            )
            return True
        reason = WAITING + decision.message()
        if overdue_after_s is not None:
            self.views, held = hold(
                self.views, record.vram_bytes, record.gpu, record.task_id, self.policy, node
            )
            if held is not None:
                reason += f" ({held}{HELD_NOTE}it has waited over {overdue_after_s:g} s)"
            self.waiting.append((record.task_id, reason, record.state))
        elif record.state is TaskState.QUEUED or record.error != reason:
            # a waiting task's reason is rewritten whenever it changed: it never goes stale
            self.waiting.append((record.task_id, reason, record.state))
        return False
