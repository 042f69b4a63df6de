"""``Telemetry``'s counts follow purges, and its purge listeners hear of every one."""

from __future__ import annotations

from vramancer.events import EventBus
from vramancer.observability.metrics import Metrics
from vramancer.tasks.model import TaskState
from vramancer.tasks.queue import Purged
from vramancer.tasks.telemetry import Telemetry


def make() -> Telemetry:
    return Telemetry(Metrics(node="t"), EventBus(), observe=lambda *_: None, on_end=lambda _: None)


def test_purge_listeners_hear_every_purge_and_counts_follow_the_store_when_asked() -> None:
    telemetry = make()
    telemetry.reset({(False, TaskState.DONE): 3})
    heard: list[list[str]] = []
    telemetry.purge_listeners.append(lambda tasks: heard.append([t.task_id for t in tasks]))
    gone = [Purged("a", 1, False, TaskState.DONE)]
    telemetry.purged(gone)
    assert telemetry.counts[(False, TaskState.DONE)] == 2
    telemetry.follow_store = True  # an orchestrator of a pool: only the store's reports count
    telemetry.purged([Purged("b", 1, False, TaskState.DONE)])
    assert telemetry.counts[(False, TaskState.DONE)] == 2
    telemetry.purged([Purged("c", 1, False, TaskState.DONE)], observed=True)
    assert telemetry.counts[(False, TaskState.DONE)] == 1
    assert heard == [["a"], ["b"], ["c"]]
