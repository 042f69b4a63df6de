"""``cmd`` tasks that opt in to the warm runner (``"warm": true``): a Python script or module
forked from the runner, run as ``python`` would run it (``__main__``, ``sys.argv``,
``sys.path``, exit codes), cold when the runner is off, and refused for any other command."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from tests.unit.tasks.conftest import MakeHarness

from vramancer.errors import InvalidInput
from vramancer.tasks.model import TaskState

SCRIPT = """
import json, os, sys
print(json.dumps({
    "argv": sys.argv,
    "name": __name__,
    "path0": sys.path[0],
    "ppid": os.getppid(),
    "cwd": os.getcwd(),
    "task": os.environ.get("VRM_TASK_ID"),
    "preloaded": "warm_marker_mod" in sys.modules,
}))
sys.exit(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
"""


def _files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A script in its own directory, a package with a ``__main__``-style module, and a
    module for the runner to preload; the work directory is elsewhere."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "probe.py").write_text(SCRIPT)
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "probe_main.py").write_text(SCRIPT)
    (lib / "warm_marker_mod.py").write_text("")
    work = tmp_path / "work"
    work.mkdir()
    return scripts / "probe.py", lib, work


@pytest.fixture
def pythonpath(tmp_path: Path) -> object:
    _, lib, _ = _files(tmp_path)
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(lib), before) if p)
    yield lib
    if before is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = before


async def _run(h: object, body: dict[str, object]) -> tuple[TaskState, dict[str, object], int]:
    svc = h.svc  # type: ignore[attr-defined]
    sub = await svc.submit({"max_retries": 0, **body})
    await svc.run_until_idle()
    record = await svc.status(sub.task_id)
    seen = json.loads(record.stdout_tail) if record.stdout_tail else {}
    seen["task_id"] = sub.task_id
    return record.state, seen, record.exit_code


async def test_a_warm_script_is_forked_from_the_runner_and_runs_as_python_would(
    make_harness: MakeHarness, tmp_path: Path, pythonpath: Path
) -> None:
    script, _, work = tmp_path / "scripts" / "probe.py", pythonpath, tmp_path / "work"
    h = await make_harness(warm_preload=["warm_marker_mod"])
    body = {"type": "cmd", "cmd": ["python", str(script), "0", "x"], "cwd": str(work)}
    state, warm, code = await _run(h, {**body, "warm": True})
    assert state is TaskState.DONE and code == 0
    runner = h.svc.workers.warm
    assert runner is not None and runner._proc is not None
    assert warm["ppid"] == runner._proc.pid  # forked by the runner, not started by the daemon
    assert warm["preloaded"] is True  # the runner's imports are there
    assert warm["argv"] == [str(script), "0", "x"]
    assert warm["name"] == "__main__"
    assert warm["path0"] == str(script.parent)  # the script's directory, as python puts it
    assert warm["cwd"] == str(work)
    assert warm["task"] == warm["task_id"]
    state, cold, code = await _run(h, body)  # the same command, not warm
    assert state is TaskState.DONE and code == 0
    assert cold["ppid"] == os.getpid() and cold["preloaded"] is False
    assert {k: cold[k] for k in ("argv", "name", "path0", "cwd")} == {
        k: warm[k] for k in ("argv", "name", "path0", "cwd")
    }


async def test_a_warm_module_runs_as_python_dash_m(
    make_harness: MakeHarness, tmp_path: Path, pythonpath: Path
) -> None:
    h = await make_harness()
    work = tmp_path / "work"
    body = {"type": "cmd", "cmd": ["python3", "-m", "probe_main", "0"], "cwd": str(work)}
    state, seen, _ = await _run(h, {**body, "warm": True})
    assert state is TaskState.DONE
    assert seen["name"] == "__main__"
    assert seen["argv"] == [str(pythonpath / "probe_main.py"), "0"]
    assert seen["path0"] == str(work)  # -m: the working directory first


async def test_a_warm_scripts_exit_code_and_errors_are_the_tasks(
    make_harness: MakeHarness, tmp_path: Path, pythonpath: Path
) -> None:
    h = await make_harness()
    script, work = tmp_path / "scripts" / "probe.py", tmp_path / "work"
    base = {"type": "cmd", "cwd": str(work), "warm": True}
    state, _, code = await _run(h, {**base, "cmd": ["python", str(script), "3"]})
    assert (state, code) == (TaskState.FAILED, 3)
    (tmp_path / "scripts" / "boom.py").write_text("raise RuntimeError('boom here')\n")
    sub = await h.svc.submit({**base, "cmd": ["python", "../scripts/boom.py"], "max_retries": 0})
    await h.svc.run_until_idle()
    record = await h.svc.status(sub.task_id)
    assert record.state is TaskState.FAILED and record.exit_code == 1
    assert "RuntimeError: boom here" in record.stderr_tail
    state, _, code = await _run(h, {**base, "cmd": ["python", "missing.py"]})
    assert (state, code) == (TaskState.FAILED, 2)


async def test_with_the_runner_off_a_warm_task_starts_cold(
    make_harness: MakeHarness, tmp_path: Path, pythonpath: Path
) -> None:
    h = await make_harness(warm_python=False)
    script = tmp_path / "scripts" / "probe.py"
    body = {"type": "cmd", "cmd": [sys.executable, str(script)], "warm": False}
    state, seen, _ = await _run(h, body)
    assert state is TaskState.DONE and seen["ppid"] == os.getpid()
    state, seen, _ = await _run(h, {"type": "cmd", "cmd": ["python", str(script)], "warm": True})
    assert state is TaskState.DONE and seen["ppid"] == os.getpid()


@pytest.mark.parametrize(
    "body",
    [
        {"type": "cmd", "cmd": ["ls", "-l"], "warm": True},
        {"type": "cmd", "cmd": ["python"], "warm": True},
        {"type": "cmd", "cmd": ["python", "-c", "print(1)"], "warm": True},
        {"type": "cmd", "cmd": ["python", "-m", "not a module"], "warm": True},
        {"type": "cmd", "cmd": ["/usr/bin/python3", "x.py"], "warm": True},
        {"type": "shell", "shell": "python x.py", "warm": True},
        {"type": "cmd", "cmd": ["python", "x.py"], "warm": "yes"},
    ],
)
async def test_only_a_python_script_or_module_may_start_warm(
    make_harness: MakeHarness, body: dict[str, object]
) -> None:
    h = await make_harness()
    with pytest.raises(InvalidInput, match="warm"):
        await h.svc.submit(body)
    assert h.svc.counts().get("queued", 0) == 0
