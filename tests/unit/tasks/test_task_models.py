"""Tasks that name a managed model (``model`` in the task body): the real ``ModelManager``
(torch models built by ``tests.unit.models.tiny``, a simulated 12 GiB GPU, the real arbiter) and
the real ``TaskService`` (SQLite, subprocesses), on one manual clock, workers driven by
``run_once()``.

What holds: a model serving a task is loaded for it (on demand), never reaped or evicted while the
task runs, and reapable once it ended; an unknown model is refused at submit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tests.unit.models.conftest import Harness as ModelsHarness
from tests.unit.models.conftest import harness as models_harness
from tests.unit.models.conftest import seed_settings

from vramancer.errors import InvalidInput
from vramancer.models.types import ModelState
from vramancer.tasks.model import TaskSpec, TaskState
from vramancer.tasks.service import TaskService
from vramancer.tasks.settings import TasksSettings

TINY = "tests.unit.models.tiny:tiny"
BROKEN = "tests.unit.models.tiny:broken"
#: No Ollama model is configured: the manager never calls this address.
NO_OLLAMA = "http://127.0.0.1:9"


@dataclass
class Both:
    m: ModelsHarness
    svc: TaskService


@asynccontextmanager
async def both(tmp: Path, models: list[dict[str, Any]], **tasks: Any) -> AsyncIterator[Both]:
    """A model manager and a task service sharing devices, arbiter, events and clock."""
    settings = seed_settings(NO_OLLAMA, str(tmp), models=models)
    async with models_harness(settings) as m:
        svc = TaskService(
            TasksSettings(backoff_base_s=1.0, kill_grace_s=0.2, **tasks),
            data_dir=tmp / "tasks",
            devices=m.devices,
            arbiter=m.arbiter,
            memory=_NoMemory(),
            events=m.events,
            metrics=m.metrics,
            clock=m.clock,
            models=m.models,
        )
        await svc.start(dispatch=False)
        try:
            yield Both(m, svc)
        finally:
            await svc.stop()


class _NoMemory:
    """Maintenance tasks are not used here."""

    def warmup(self, max_blocks: int) -> int:
        raise AssertionError("no maintenance task in these tests")

    def compress_cold(self, max_blocks: int) -> int:
        raise AssertionError("no maintenance task in these tests")


async def _until(svc: TaskService, task_id: str, state: TaskState, timeout_s: float = 10) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if (await svc.status(task_id)).state is state:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{task_id} never reached {state} (is {await svc.status(task_id)})")


async def test_the_model_is_loaded_for_the_task_and_held_until_it_ends(tmp_path: Path) -> None:
    gate = tmp_path / "go"
    script = f'echo "$VRM_MODEL on $VRM_MODEL_DEVICE"; while [ ! -e {gate} ]; do sleep 0.02; done'
    clip = {"name": "clip", "backend": "torch", "factory": TINY, "vram": "500MiB"}
    async with both(tmp_path, [{**clip, "idle_timeout_s": 60}]) as b:
        models, clock = b.m.models, b.m.clock
        assert models.state("clip") is ModelState.UNLOADED
        sub = await b.svc.submit({"type": "shell", "shell": script, "model": "clip"})
        assert await b.svc.run_once() == 1
        await _until(b.svc, sub.task_id, TaskState.RUNNING)
        # Loaded on demand for the task, and held while it runs.
        assert models.is_loaded("clip") and models.status("clip").in_use == 1
        clock.advance(1000)  # far past its 60 s idle timeout
        assert await models.reap_once() == []
        assert models.is_loaded("clip")
        gate.touch()
        await b.svc.drain(timeout_s=10)
        record = await b.svc.status(sub.task_id)
        assert record.state is TaskState.DONE
        assert record.stdout_tail.strip() == f"clip on {models.device('clip')}"
        assert models.device("clip") == "gpu:0"
        assert record.as_dict()["model"] == "clip"
        # Released when the task ended: idle from then on, reaped after its timeout.
        assert models.status("clip").in_use == 0
        clock.advance(59.9)
        assert await models.reap_once() == []
        clock.advance(0.1)
        assert await models.reap_once() == ["clip"]
        assert models.state("clip") is ModelState.UNLOADED
        assert [e.data["reason"] for e in b.m.of("model_loaded")] == ["request"]


async def test_a_task_without_model_leaves_the_models_alone(tmp_path: Path) -> None:
    async with both(tmp_path, [{"name": "clip", "backend": "torch", "factory": TINY}]) as b:
        sub = await b.svc.submit({"type": "cmd", "cmd": ["sh", "-c", 'echo "[$VRM_MODEL]"']})
        await b.svc.run_until_idle()
        record = await b.svc.status(sub.task_id)
        assert (record.state, record.stdout_tail.strip()) == (TaskState.DONE, "[]")
        assert record.as_dict()["model"] is None
        assert b.m.models.state("clip") is ModelState.UNLOADED


async def test_an_unknown_model_is_refused_at_submit_and_nothing_is_queued(
    tmp_path: Path,
) -> None:
    async with both(tmp_path, [{"name": "clip", "backend": "torch", "factory": TINY}]) as b:
        with pytest.raises(InvalidInput) as caught:
            await b.svc.submit({"type": "cmd", "cmd": ["true"], "model": "llama"})
        assert caught.value.details.get("field") == "model"
        assert "no managed model 'llama' (models: clip)" in caught.value.message
        with pytest.raises(InvalidInput, match=r"tasks\[1\]: model: no managed model 'gpt'"):
            await b.svc.submit_batch(
                [
                    {"type": "cmd", "cmd": ["true"], "model": "clip"},
                    {"type": "cmd", "cmd": ["true"], "model": "gpt"},
                ]
            )
        assert sum(b.svc.counts().values()) == 0
        assert (await b.svc.history()).tasks == []


async def test_without_a_model_manager_no_task_may_name_a_model(make_harness: Any) -> None:
    h = await make_harness()
    with pytest.raises(InvalidInput, match="no managed model 'clip' \\(models: none configured"):
        await h.svc.submit({"type": "cmd", "cmd": ["true"], "model": "clip"})
    assert sum(h.svc.counts().values()) == 0


def test_the_model_field_is_validated_in_the_body() -> None:
    assert TaskSpec.model_validate({"type": "cmd", "cmd": ["x"], "model": "clip"}).model == "clip"
    with pytest.raises(ValueError, match="model apply only to cmd, shell and python tasks"):
        TaskSpec.model_validate({"type": "noop", "model": "clip"})
    with pytest.raises(ValueError, match="at least 1 character"):
        TaskSpec.model_validate({"type": "cmd", "cmd": ["x"], "model": ""})


async def test_a_model_that_cannot_load_fails_the_attempt_and_follows_the_retry_policy(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "ran"
    models = [{"name": "bad", "backend": "torch", "factory": BROKEN, "vram": "100MiB"}]
    async with both(tmp_path, models) as b:
        sub = await b.svc.submit(
            {"type": "cmd", "cmd": ["touch", str(marker)], "model": "bad", "max_retries": 1}
        )
        assert await b.svc.run_once() == 1
        await b.svc.drain(timeout_s=10)
        first = await b.svc.status(sub.task_id)
        assert (first.state, first.attempts) == (TaskState.RETRY, 1)
        assert first.error is not None
        assert first.error.startswith("model 'bad' could not be loaded: ")
        assert "weights are corrupt" in first.error
        b.m.clock.advance(1.0)  # backoff_base_s
        await b.svc.run_until_idle()
        last = await b.svc.status(sub.task_id)
        assert (last.state, last.attempts) == (TaskState.FAILED, 2)
        assert not marker.exists()  # the process never started
        assert b.m.models.status("bad").in_use == 0
