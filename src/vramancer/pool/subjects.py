"""Every name the pool uses on NATS, in one place: KV buckets, streams, subjects, durables.

Node names (``devices/ids.py``, ``NODE_NAME_PATTERN``: letters, digits, ``-`` and ``_``) are one
subject token each, so a node's subjects never overlap another's.
"""

from __future__ import annotations

from vramancer.devices.ids import node_name_problem

__all__ = [
    "DEAD_STREAM",
    "DEAD_SUBJECTS",
    "DISPATCH_KEY",
    "NODES_BUCKET",
    "POOL_BUCKET",
    "TASKS_BUCKET",
    "WORK_STREAM",
    "WORK_SUBJECTS",
    "control_subject",
    "dead_subject",
    "work_subject",
    "worker_durable",
]

#: KV bucket of the node registry: key = node name, value = ``NodeInfo`` JSON.
NODES_BUCKET = "vrm_nodes"
#: KV bucket of the tasks (the JetStream task queue's records).
TASKS_BUCKET = "vrm_tasks"
#: KV bucket of pool-wide state: the orchestrators' dispatch lease (key :data:`DISPATCH_KEY`).
POOL_BUCKET = "vrm_pool"
#: Key of the dispatch lease in :data:`POOL_BUCKET`.
DISPATCH_KEY = "dispatch"

#: Work-queue stream (file storage): one message per dispatch of a task to a node.
WORK_STREAM = "VRM_WORK"
WORK_SUBJECTS = "vrm.work.>"
#: Dead letters (limits retention, file storage, kept 7 days): dispatches that ran out of
#: deliveries.
DEAD_STREAM = "VRM_DEAD"
DEAD_SUBJECTS = "vrm.dead.>"


def _token(node: str) -> str:
    problem = node_name_problem(node)
    if problem is not None:
        raise ValueError(problem)
    return node


def work_subject(node: str) -> str:
    """``vrm.work.<node>``: where dispatches to ``node`` are published."""
    return f"vrm.work.{_token(node)}"


def dead_subject(node: str) -> str:
    """``vrm.dead.<node>``: dead letters of dispatches to ``node``."""
    return f"vrm.dead.{_token(node)}"


def control_subject(node: str) -> str:
    """``vrm.ctl.<node>``: plain NATS request/reply to ``node`` (cancel, logs)."""
    return f"vrm.ctl.{_token(node)}"


def worker_durable(node: str) -> str:
    """``worker-<node>``: the durable pull consumer of ``node`` on :data:`WORK_STREAM`."""
    return f"worker-{_token(node)}"
