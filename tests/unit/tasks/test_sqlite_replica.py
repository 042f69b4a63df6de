"""Whole task rows copied from one SQLite queue into another (what an HA standby applies): the
copy reads back as the same records, with the same ``seq``, and deletes and snapshots replace
exactly what they say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vramancer.tasks import sqlite_replica
from vramancer.tasks.model import NewTask, TaskSpec
from vramancer.tasks.sqlite_queue import SqliteQueue


def new_task(task_id: str) -> NewTask:
    body: dict[str, object] = {"task_id": task_id, "type": "cmd", "cmd": ["true"]}
    return NewTask(
        task_id=task_id,
        spec=TaskSpec.model_validate(body),
        spec_json=json.dumps(body),
        priority_rank=1,
        estimate_s=60.0,
        estimate_key="cmd:true",
        max_retries=2,
        timeout_s=60.0,
        maintenance=False,
    )


async def test_rows_copy_into_another_queue_as_the_same_records(tmp_path: Path) -> None:
    source, copy = SqliteQueue(tmp_path / "a.sqlite"), SqliteQueue(tmp_path / "b.sqlite")
    await source.open()
    await copy.open()
    try:
        await source.submit([new_task(f"t{i}") for i in range(5)], 100.0)
        await source.cancel("t1", 101.0)
        ids = [f"t{i}" for i in range(5)]
        rows = await sqlite_replica.read_rows(source, [*ids, "unknown"])
        assert sorted(rows) == ids
        await sqlite_replica.upsert_rows(copy, [rows[i] for i in ids[2:]])  # any order
        await sqlite_replica.upsert_rows(copy, [rows[i] for i in ids[:2]])
        for task_id in ids:
            assert await copy.get(task_id) == await source.get(task_id)
        assert await copy.counts() == await source.counts()
        assert await sqlite_replica.delete_rows(copy, ["t0", "nope"]) == 1
        assert await copy.get("t0") is None
        await sqlite_replica.replace_all(copy, [rows["t4"]])
        assert await sqlite_replica.all_ids(copy) == ["t4"]
        with pytest.raises(ValueError, match="unknown column"):
            await sqlite_replica.upsert_rows(copy, [{**rows["t3"], "bogus": 1}])
    finally:
        await source.close()
        await copy.close()
