"""The JetStream queue's in-memory indexes: the chunked sorted collection against a plain
sorted list, and the copy ignoring entries older than what it holds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.tasks.queue_support import T0, new
from vramancer.pool.jssubmit import new_stored
from vramancer.pool.mirror import SortedKeys, TaskMirror
from vramancer.tasks.model import TaskState

ops = st.lists(st.tuples(st.booleans(), st.integers(0, 3000)), max_size=1500)


@settings(max_examples=40, deadline=None)
@given(ops, st.integers(0, 3100), st.integers(0, 3100))
def test_sorted_keys_match_a_sorted_list(
    steps: list[tuple[bool, int]], bound: int, offset: int
) -> None:
    keys = SortedKeys[tuple[int]](chunk=8)  # small chunks: splits and empty chunks happen often
    expected: set[tuple[int]] = set()
    for add, value in steps:
        if not add:
            keys.discard((value,))
            expected.discard((value,))
        elif (value,) not in expected:  # the items are unique (each task once)
            keys.add((value,))
            expected.add((value,))
    plain = sorted(expected)
    assert list(keys) == plain and len(keys) == len(plain)
    assert list(reversed(keys)) == plain[::-1]
    assert keys.last() == (plain[-1] if plain else None)
    assert list(keys.from_index(offset)) == plain[offset:]
    assert list(keys.below((bound,))) == [k for k in reversed(plain) if k < (bound,)]
    assert list(keys.at_or_after((bound,))) == [k for k in plain if k >= (bound,)]


def test_an_older_revision_never_replaces_a_newer_one() -> None:
    mirror = TaskMirror()
    queued = new_stored(new("a"), T0).with_record(seq=5)
    waiting = queued.with_record(state=TaskState.WAITING_GPU)
    assert mirror.put_task(waiting, 7)
    assert not mirror.put_task(queued, 5)  # the watcher delivering the older write late
    assert mirror.count == {(False, TaskState.WAITING_GPU): 1}
    assert mirror.delete_task("a", 9)
    assert not mirror.put_task(waiting, 7)  # a write from before the delete
    assert mirror.get("a") is None and mirror.count == {}
    mirror.forget_delete("a", 9)  # the watcher delivered the delete
    assert mirror.deleted == {}
