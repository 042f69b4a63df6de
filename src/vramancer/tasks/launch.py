"""Launch: what one attempt's process is, as a ``RunRequest`` built without I/O.

* argv: a ``cmd`` task's list (with ``allowed_commands`` set, its program is the absolute path
  the daemon resolved at start: the task's own ``env`` PATH cannot choose it), ``/bin/sh -c``
  for a ``shell`` task, the daemon's Python running ``vramancer.tasks.pyrun`` for a ``python``
  task;
* environment: the daemon's own, less its ``VRM_*`` variables (its API token ...), then the
  task's ``env``, then what the task always gets and cannot override: ``VRM_TASK_ID``,
  ``VRM_TASK_ATTEMPT``, ``VRM_DEVICE`` (``gpu:N`` or ``host``), ``VRM_SCRATCH_DIR``,
  ``CUDA_VISIBLE_DEVICES``, when it names a model ``VRM_MODEL*`` and, when it names blocks,
  ``VRM_BLOCKS_DIR`` (``tasks/blocks.py``);
* ``CUDA_VISIBLE_DEVICES`` is the GPU's CUDA index for a real CUDA GPU (with
  ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, the order NVML and the device manager number GPUs in), and
  the empty string on a simulated GPU or the host (the task must not touch a GPU it was not
  given);
* cwd: the task's ``cwd``, else its scratch directory
  ``<data_dir>/scratch/<device>/<task id>`` (created right before the start, by the runner);
* limits: the task's timeout, ``kill_grace_s``, ``max_output_bytes``, ``output_tail_bytes``,
  and the attempt's log files (``logs.log_paths``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vramancer.errors import InvalidInput
from vramancer.tasks.admission import dumps
from vramancer.tasks.blocks import ENV_BLOCKS_DIR, blocks_dir
from vramancer.tasks.logs import log_paths
from vramancer.tasks.model import TaskRecord, TaskSpec, TaskType, warm_python_argv
from vramancer.tasks.runner import RunRequest
from vramancer.tasks.settings import TasksSettings

#: Environment variables a task always gets (they override the task's own ``env``).
ENV_TASK_ID = "VRM_TASK_ID"
#: Environment variables of the daemon with this prefix are not passed to tasks.
PRIVATE_ENV_PREFIX = "VRM_"


def scratch_dir(data_dir: Path, device: str, task_id: str) -> Path:
    """``<data_dir>/scratch/<device without ':'>/<task id>`` (joined as text: one path built
    per task, not three)."""
    return Path(os.path.join(data_dir, "scratch", device.replace(":", ""), task_id))


def run_request(
    record: TaskRecord,
    spec: TaskSpec,
    *,
    device: str,
    cuda_index: int | None,
    model_env: Mapping[str, str],
    settings: TasksSettings,
    data_dir: Path,
    programs: Mapping[str, str],
    environ: Mapping[str, str],
) -> RunRequest:
    """The process of this attempt of ``record`` on ``device`` (see the module docstring);
    ``environ`` is the daemon's environment."""
    scratch = scratch_dir(data_dir, device, record.task_id)
    env = inherited_env(environ)
    env.update(spec.env or {})
    env.update(
        {
            ENV_TASK_ID: record.task_id,
            "VRM_TASK_ATTEMPT": str(record.attempts),
            "VRM_DEVICE": device,
            "VRM_SCRATCH_DIR": str(scratch),
            "CUDA_VISIBLE_DEVICES": "" if cuda_index is None else str(cuda_index),
        }
    )
    env.update(model_env)
    if spec.blocks:
        env[ENV_BLOCKS_DIR] = str(blocks_dir(scratch))
    if cuda_index is not None:
        # cuda_index is NVML's (PCI bus) order; CUDA's default order is fastest first.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    out_path, err_path = log_paths(data_dir, record.task_id, record.attempts)
    restricted = programs if settings.allowed_commands else None
    return RunRequest(
        argv=argv(spec, restricted),
        cwd=Path(spec.cwd) if spec.cwd else scratch,
        env=env,
        timeout_s=record.timeout_s,
        kill_grace_s=settings.kill_grace_s,
        max_output_bytes=settings.max_output_bytes,
        tail_bytes=settings.output_tail_bytes,
        stdout_path=out_path,
        stderr_path=err_path,
        python=(spec.python, dumps(spec.payload or {}))
        if spec.type is TaskType.PYTHON and spec.python
        else None,
        warm_argv=warm_python_argv(spec.cmd) if spec.warm else None,
        scratch=scratch,
    )


#: ``os.environ``'s raw items when :func:`inherited_env` last read it, and what it gave.
_inherited: tuple[dict[Any, Any], dict[str, str]] | None = None


def inherited_env(environ: Mapping[str, str]) -> dict[str, str]:
    """A new copy of ``environ`` less the daemon's ``VRM_*`` variables. For ``os.environ`` the
    filtered copy is kept and reused while its raw items are unchanged: reading and decoding
    every variable for each task costs more than the rest of building its request."""
    global _inherited
    raw = getattr(environ, "_data", None) if environ is os.environ else None
    if raw is not None and _inherited is not None and _inherited[0] == raw:
        return dict(_inherited[1])
    env = {k: v for k, v in environ.items() if not k.startswith(PRIVATE_ENV_PREFIX)}
    if isinstance(raw, dict):
        _inherited = (dict(raw), env)
    return dict(env)


def argv(spec: TaskSpec, programs: Mapping[str, str] | None = None) -> list[str]:
    """The command line of a task. ``programs`` (the allow-list is on): a ``cmd`` task's
    program is replaced by the absolute path resolved at start."""
    if spec.type is TaskType.CMD and spec.cmd:
        out = list(spec.cmd)
        if programs is not None:
            resolved = programs.get(out[0])
            if resolved is None:
                raise InvalidInput(f"{out[0]!r} is not an allowed program here")
            out[0] = resolved
        return out
    if spec.type is TaskType.SHELL and spec.shell:
        return ["/bin/sh", "-c", spec.shell]
    if spec.type is TaskType.PYTHON and spec.python:
        return [
            sys.executable,
            "-m",
            "vramancer.tasks.pyrun",
            spec.python,
            dumps(spec.payload or {}),
        ]
    raise InvalidInput(f"{spec.type} tasks do not run a process")


def model_env(name: str, handle: Any) -> dict[str, str]:
    """What a task learns of the model held for it: ``VRM_MODEL`` (its name),
    ``VRM_MODEL_DEVICE`` (``cpu``, ``gpu:N``) and, for an Ollama model, ``VRM_MODEL_ENDPOINT``
    and ``VRM_MODEL_BACKEND`` (the tag to ask Ollama for)."""
    env = {"VRM_MODEL": name}
    for var, attr in (
        ("VRM_MODEL_DEVICE", "device"),
        ("VRM_MODEL_ENDPOINT", "endpoint"),
        ("VRM_MODEL_BACKEND", "backend_model"),
    ):
        value = getattr(handle, attr, None)
        if value is not None:
            env[var] = str(value)
    return env
