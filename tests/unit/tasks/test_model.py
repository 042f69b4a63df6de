"""The task body (``TaskSpec``) and its validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from vramancer.arbiter.types import Priority
from vramancer.tasks.model import TaskSpec, TaskState, TaskType


def test_a_full_body_parses() -> None:
    spec = TaskSpec.model_validate(
        {
            "task_id": "train-1",
            "type": "cmd",
            "cmd": ["python", "train.py"],
            "gpu": 1,
            "vram": "4GiB",
            "priority": "high",
            "timeout": 120,
            "max_retries": 3,
            "idempotency_key": "k",
            "cwd": "/tmp",
            "env": {"A": "b"},
        }
    )
    assert spec.vram_bytes == 4 * 1024**3
    assert spec.priority is Priority.HIGH
    assert spec.program() == "python"
    assert spec.estimate_key() == "cmd:python train.py"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"type": "bogus"}, "type"),
        ({"type": "cmd"}, "a cmd task needs 'cmd'"),
        ({"type": "cmd", "cmd": []}, "at least 1 item"),
        ({"type": "cmd", "cmd": [""]}, "cmd[0] must name a program"),
        ({"type": "shell"}, "a shell task needs 'shell'"),
        ({"type": "python", "python": "no-colon"}, "python"),
        ({"type": "cmd", "cmd": ["true"], "shell": "x"}, "'shell' is only for shell tasks"),
        ({"type": "cmd", "cmd": ["true"], "timeout": -1}, "greater than 0"),
        ({"type": "cmd", "cmd": ["true"], "timeout": 0}, "greater than 0"),
        ({"type": "cmd", "cmd": ["true"], "gpu": -1}, "greater than or equal to 0"),
        ({"type": "cmd", "cmd": ["true"], "vram": "-1GiB"}, "vram"),
        ({"type": "cmd", "cmd": ["true"], "max_retries": -1}, "max_retries"),
        ({"type": "cmd", "cmd": ["true"], "priority": "urgent"}, "priority"),
        ({"type": "cmd", "cmd": ["true"], "cwd": "relative/dir"}, "absolute path"),
        ({"type": "cmd", "cmd": ["true"], "env": {"1BAD": "x"}}, "not a valid variable name"),
        ({"type": "cmd", "cmd": ["true"], "task_id": "../etc"}, "task_id"),
        ({"type": "cmd", "cmd": ["true"], "surprise": 1}, "surprise"),
        ({"type": "noop", "gpu": 0}, "gpu apply only to cmd, shell and python tasks"),
        ({"type": "warmup", "env": {"A": "b"}}, "env apply only"),
        ({"type": "cmd", "cmd": ["true"], "gpu": True}, "gpu\n  Input should be a valid integer"),
        ({"type": "cmd", "cmd": ["true"], "gpu": "1"}, "gpu\n  Input should be a valid integer"),
        ({"type": "cmd", "cmd": ["true"], "max_retries": False}, "max_retries\n"),
        ({"type": "cmd", "cmd": ["true"], "timeout": "NaN"}, "timeout\n  Input should be a finite"),
        ({"type": "cmd", "cmd": ["true"], "timeout": float("inf")}, "timeout\n  Input should be"),
    ],
)
def test_bad_bodies_are_refused_with_the_field(body: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        TaskSpec.model_validate(body)
    assert message in str(info.value)


def test_programs_for_the_allow_list_and_estimate_keys() -> None:
    shell = TaskSpec(type=TaskType.SHELL, shell="make  -j8 all")
    assert shell.program() == "sh"
    assert shell.estimate_key() == "shell:make -j8"
    py = TaskSpec(type=TaskType.PYTHON, python="pkg.mod:run")
    assert py.program() == "python"
    assert py.estimate_key() == "python:pkg.mod:run"
    assert TaskSpec(type=TaskType.NOOP).estimate_key() == "noop"
    assert TaskSpec(type=TaskType.CMD, cmd=["/usr/bin/ffmpeg", "-i"]).estimate_key() == (
        "cmd:ffmpeg -i"
    )


def test_kinds_and_states() -> None:
    assert {t for t in TaskType if t.maintenance} == {
        TaskType.WARMUP,
        TaskType.COMPRESS,
        TaskType.NOOP,
        TaskType.REBALANCE,
    }
    assert {t for t in TaskType if t.needs_operator} == {
        TaskType.CMD,
        TaskType.SHELL,
        TaskType.PYTHON,
    }
    assert {s for s in TaskState if s.terminal} == {
        TaskState.DONE,
        TaskState.FAILED,
        TaskState.CANCELLED,
    }
    assert [s.value for s in TaskState] == [
        "queued",
        "scheduled",
        "waiting_gpu",
        "running",
        "retry",
        "done",
        "failed",
        "cancelled",
    ]
