"""``python`` tasks forked from the warm runner (``[tasks] warm_python``): what the task sees
(its parent, working directory, ``sys.path``, environment), imports done once, timeouts and a
runner that died, against the cold path."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
from tests.unit.tasks.conftest import MakeHarness

from vramancer.tasks.model import TaskState

PROBE = """
import os, sys

def probe():
    return {
        "ppid": os.getppid(),
        "pgid": os.getpgid(0),
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "path0": sys.path[0],
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "task": os.environ.get("VRM_TASK_ID"),
        "private": os.environ.get("VRM_API_TOKEN"),
        "mine": os.environ.get("MINE"),
    }
"""


def _module(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(text)
    return directory


async def _probe(h: object, cwd: Path, **extra: object) -> dict[str, object]:
    svc = h.svc  # type: ignore[attr-defined]
    sub = await svc.submit(
        {"type": "python", "python": "probe_mod:probe", "cwd": str(cwd), **extra}
    )
    await svc.run_until_idle()
    record = await svc.status(sub.task_id)
    assert record.state is TaskState.DONE, record.stderr_tail
    result: dict[str, object] = json.loads(record.stdout_tail)
    result["task_id"] = sub.task_id
    return result


async def test_a_warm_task_is_forked_from_the_runner_and_sees_what_a_cold_one_sees(
    make_harness: MakeHarness, tmp_path: Path, monkeypatch: object
) -> None:
    os.environ["VRM_API_TOKEN"] = "daemon-secret"  # the daemon's own: never a task's
    try:
        cwd = _module(tmp_path / "work", "probe_mod", PROBE)
        warm = await make_harness()
        cold = await make_harness(warm_python=False)
        w = await _probe(warm, cwd, env={"MINE": "1"})
        c = await _probe(cold, cwd, env={"MINE": "1"})
    finally:
        del os.environ["VRM_API_TOKEN"]
    runner = warm.svc.workers.warm
    assert runner is not None and runner._proc is not None
    assert w["ppid"] == runner._proc.pid  # forked by the runner
    assert c["ppid"] == os.getpid()  # started by the daemon itself
    for seen in (w, c):
        assert seen["pgid"] == seen["pid"]  # its own process group
        assert seen["cwd"] == str(cwd)
        assert seen["path0"] == str(cwd)  # its module is found as with `python -m`
        assert seen["cuda"] == "0" or seen["cuda"] == ""  # set for the task, not inherited
        assert seen["task"] == seen["task_id"]
        assert seen["private"] is None
        assert seen["mine"] == "1"


async def test_preloaded_modules_are_imported_once_by_the_runner(
    make_harness: MakeHarness, tmp_path: Path, monkeypatch: object
) -> None:
    marks = tmp_path / "imports.txt"
    lib = _module(
        tmp_path / "lib",
        "heavy_mod",
        f"open({str(marks)!r}, 'a').write('imported\\n')\n\ndef run():\n    return 42\n",
    )
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(lib), before) if p)
    try:
        h = await make_harness(warm_preload=["heavy_mod"])
        ids = [
            (await h.svc.submit({"type": "python", "python": "heavy_mod:run"})).task_id
            for _ in range(3)
        ]
        await h.svc.run_until_idle()
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before
    for task_id in ids:
        record = await h.svc.status(task_id)
        assert record.state is TaskState.DONE, record.stderr_tail
        assert record.stdout_tail == "42\n"
    assert marks.read_text() == "imported\n"  # once, in the runner: not once per task


async def test_a_warm_task_past_its_timeout_is_killed_with_its_group(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness(kill_grace_s=0.2)
    sub = await h.svc.submit(
        {"type": "python", "python": "time:sleep", "payload": {"args": [60]}, "timeout": 1}
    )
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert record.state is not TaskState.DONE
    assert "timed out" in (record.error or "")
    assert record.pid is not None and not psutil.pid_exists(record.pid)


async def test_a_runner_that_died_is_started_again_for_the_next_task(
    make_harness: MakeHarness,
) -> None:
    h = await make_harness()
    first = await h.svc.submit({"type": "python", "python": "os:getppid"})
    await h.svc.run_until_idle()
    runner = h.svc.workers.warm
    assert runner is not None and runner._proc is not None
    old = runner._proc.pid
    assert (await h.svc.status(first.task_id)).stdout_tail == f"{old}\n"
    os.kill(old, signal.SIGKILL)
    await runner._proc.wait()
    second = await h.svc.submit({"type": "python", "python": "os:getppid"})
    await h.svc.run_until_idle()
    record = await h.svc.status(second.task_id)
    assert record.state is TaskState.DONE, record.stderr_tail
    assert record.stdout_tail != f"{old}\n"
    assert record.stdout_tail == f"{runner._proc.pid}\n"


async def test_a_missing_working_directory_is_a_start_failure_as_when_cold(
    make_harness: MakeHarness, tmp_path: Path
) -> None:
    errors = []
    for h in (await make_harness(), await make_harness(warm_python=False)):
        sub = await h.svc.submit(
            {"type": "python", "python": "os:getpid", "cwd": str(tmp_path / "nowhere")}
        )
        await h.svc.run_until_idle()
        record = await h.svc.status(sub.task_id)
        assert record.state is TaskState.FAILED
        assert record.attempts == 1  # not retried: it cannot start
        errors.append(record.error)
    assert errors[0] == errors[1]
    assert "working directory" in (errors[0] or "")


async def test_a_runner_that_cannot_start_is_not_tried_again_for_every_task(
    make_harness: MakeHarness, caplog: object
) -> None:
    h = await make_harness(warm_preload=["no_such_module_anywhere"])
    ids = [
        (await h.svc.submit({"type": "python", "python": "os:getpid"})).task_id for _ in range(3)
    ]
    await h.svc.run_until_idle()
    for task_id in ids:  # they ran cold
        assert (await h.svc.status(task_id)).state is TaskState.DONE
    messages = [r.getMessage() for r in caplog.records]  # type: ignore[attr-defined]
    failures = [m for m in messages if "did not start" in m]
    assert len(failures) == 1, messages
