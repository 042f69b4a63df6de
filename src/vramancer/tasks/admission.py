"""Admission: whether a submission may be queued, decided without I/O (``admit``).

A batch is checked whole before anything is queued; any bad task refuses it (nothing queued):

* size: at most ``[tasks] max_batch`` tasks, counted before any item is looked at; each body
  (as stored) at most ``max_payload_bytes`` (``PayloadTooLarge``, 413);
* body: a valid ``TaskSpec`` (``InvalidInput``, 422, naming the field);
* role: ``cmd``, ``shell`` and ``python`` tasks run code and need the operator role
  (``needs_operator``, checked by the API, which knows the caller's role); a viewer's task may
  carry at most ``viewer_max_payload_bytes`` of payload, and a viewer may have at most
  ``viewer_max_queued`` maintenance tasks not ended (``Admitted.max_open_maintenance``: the
  queue counts and inserts in one transaction);
* allow-list: with ``allowed_commands`` set, only the listed programs (``sh`` and ``python``
  stand for shell and python tasks) run, each the absolute path the daemon resolved from its own
  PATH at start (``resolve_programs``), and no ``env`` variable that changes what a program
  loads (``HIJACK_ENV``, ``LD_*``, ``DYLD_*``) is accepted;
* devices: a named GPU must exist; the VRAM asked for must fit what the arbiter may grant on
  at least one GPU; a named ``model`` must be a managed one;
* owner: every task is recorded with its submitter (``owner``); an idempotency key or id of
  another owner's task refuses the batch (the queue checks, against what it stores).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from vramancer.devices.ids import DeviceId
from vramancer.devices.types import SystemSnapshot
from vramancer.errors import Forbidden, InvalidInput
from vramancer.tasks.errors import PayloadTooLarge
from vramancer.tasks.model import LOCAL_OWNER, NewTask, TaskSpec, TaskType
from vramancer.tasks.ports import PoolPort
from vramancer.tasks.settings import TasksSettings
from vramancer.units import format_size

log = logging.getLogger(__name__)

#: Variables (besides ``LD_*`` and ``DYLD_*``) that make a program load or run other code; a
#: task may not set them while ``allowed_commands`` restricts what runs.
HIJACK_ENV = frozenset(
    {
        "BASH_ENV",
        "ENV",
        "GCONV_PATH",
        "NODE_OPTIONS",
        "PERL5LIB",
        "PERL5OPT",
        "PERLLIB",
        "PYTHONHOME",
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "RUBYLIB",
        "RUBYOPT",
    }
)
#: Names ``python`` and ``sh`` in ``allowed_commands`` stand for the task kinds, not a program.
KIND_NAMES = frozenset({"python", "sh"})
_KINDS = frozenset(t.value for t in TaskType)


def new_task_id() -> str:
    return uuid.uuid4().hex[:20]


@dataclass(frozen=True, slots=True)
class Context:
    """What admission reads: the settings, the allow-list as resolved at start, the latest
    device snapshot, the arbiter's per-GPU budget, the managed models and the estimator."""

    settings: TasksSettings
    programs: Mapping[str, str]
    snapshot: SystemSnapshot
    #: The arbiter's budget per ``gpu:N`` (read only when a task asks for VRAM).
    budgets: Callable[[], Mapping[str, int]]
    #: The managed models' names; None: no model manager (no task may name a model).
    model_names: Callable[[], Sequence[str]] | None
    estimate: Callable[[TaskSpec], float]
    new_id: Callable[[], str] = new_task_id
    #: This node's name (a task pinned to another node is refused without a pool).
    node: str | None = None
    #: The pool this daemon schedules over (None: this machine alone).
    pool: PoolPort | None = None


@dataclass(frozen=True, slots=True)
class Admitted:
    """The decision: the tasks to queue as one transaction, and the owner's quota of
    maintenance tasks not ended (None: no quota)."""

    tasks: list[NewTask]
    max_open_maintenance: int | None


def admit(
    specs: Sequence[TaskSpec | Mapping[str, Any] | Any],
    ctx: Context,
    *,
    owner: str = LOCAL_OWNER,
    viewer: bool = False,
) -> Admitted:
    """Check a whole batch (see the module docstring); raises on the first bad task."""
    s = ctx.settings
    if not specs:
        raise InvalidInput("no tasks given", field="tasks")
    if len(specs) > s.max_batch:
        raise InvalidInput(
            f"tasks: {len(specs)} tasks in one batch; at most {s.max_batch} ([tasks] max_batch)",
            field="tasks",
        )
    prefix = len(specs) > 1
    new = []
    for i, raw in enumerate(specs):
        where = f"tasks[{i}]: " if prefix else ""
        spec = as_spec(raw, where)
        if viewer:
            check_viewer(spec, s, where)
        new.append(prepare(spec, ctx, where, owner))
    return Admitted(new, s.viewer_max_queued if viewer else None)


def needs_operator(specs: Sequence[TaskSpec | Any]) -> tuple[int, str] | None:
    """The first task (index, type) of a batch that runs code (the operator role), if any; a
    raw body counts when it names a known type (else validation says what is wrong)."""
    for i, spec in enumerate(specs):
        kind = spec.type.value if isinstance(spec, TaskSpec) else _raw_type(spec)
        if kind is not None and TaskType(kind).needs_operator:
            return i, kind
    return None


def _raw_type(item: Any) -> str | None:
    kind = item.get("type") if isinstance(item, dict) else None
    return kind if isinstance(kind, str) and kind in _KINDS else None


def as_spec(spec: TaskSpec | Mapping[str, Any] | Any, where: str) -> TaskSpec:
    """A validated ``TaskSpec`` of a body; ``InvalidInput`` naming the first bad field."""
    if isinstance(spec, TaskSpec):
        return spec
    if not isinstance(spec, Mapping):
        raise InvalidInput(
            f"{where}a task body must be a JSON object (got {type(spec).__name__})",
            field=where.rstrip(": ") or "body",
        )
    try:
        return TaskSpec.model_validate(spec)
    except ValidationError as exc:
        errors = exc.errors()
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: "
            f"{str(e['msg']).removeprefix('Value error, ')}"
            for e in errors
        )
        first = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        prefix = where.rstrip(": ")
        field = ".".join(part for part in (prefix, first) if part) or "body"
        raise InvalidInput(f"{where}{problems}", field=field) from None


def check_viewer(spec: TaskSpec, settings: TasksSettings, where: str) -> None:
    limit = settings.viewer_max_payload_bytes
    if spec.payload is None:
        return
    size = len(dumps(spec.payload))
    if size > limit:
        raise InvalidInput(
            f"{where}payload: {format_size(size)} as JSON; a viewer's task may carry at most "
            f"{format_size(limit)} ([tasks] viewer_max_payload_bytes)",
            field="payload",
        )


def prepare(spec: TaskSpec, ctx: Context, where: str, owner: str = LOCAL_OWNER) -> NewTask:
    """One checked task with everything the queue stores (id, ranks, estimate, limits)."""
    s = ctx.settings
    task_id = spec.task_id
    if task_id is None:
        task_id = ctx.new_id()
        spec = spec.model_copy(update={"task_id": task_id})
    spec_json = spec.model_dump_json(exclude_none=True)
    if len(spec_json) > s.max_payload_bytes:
        raise PayloadTooLarge(
            f"{where}the task body is {format_size(len(spec_json))}; at most "
            f"{format_size(s.max_payload_bytes)} "
            "([tasks] max_payload_bytes)"
        )
    check_allowed(spec, s.allowed_commands, ctx.programs, where)
    check_devices(spec, ctx, where)
    check_model(spec, ctx.model_names, where)
    return NewTask(
        task_id=task_id,
        spec=spec,
        spec_json=spec_json,
        priority_rank=spec.priority.rank,
        estimate_s=ctx.estimate(spec),
        estimate_key=spec.estimate_key(),
        max_retries=s.max_retries if spec.max_retries is None else spec.max_retries,
        timeout_s=s.default_timeout_s if spec.timeout is None else spec.timeout,
        maintenance=spec.type.maintenance,
        owner=owner,
    )


def check_allowed(
    spec: TaskSpec, allowed: Sequence[str], programs: Mapping[str, str], where: str
) -> None:
    """The allow-list (``allowed_commands``; empty: any command)."""
    if not allowed or spec.type.maintenance:
        return
    program = spec.program()
    if program not in allowed:
        what = {"sh": "shell tasks (they run sh -c)", "python": "python tasks"}.get(
            program, f"command {program!r}"
        )
        raise Forbidden(
            f"{where}{what} not allowed here: [tasks] allowed_commands is {', '.join(allowed)}"
        )
    if spec.type is TaskType.CMD and program not in programs:
        raise InvalidInput(
            f"{where}cmd: {program!r} is allowed but the daemon found no such program on "
            "its own PATH at start-up (a task's env cannot choose where it comes from)",
            field="cmd",
        )
    hijack = sorted(k for k in spec.env or {} if k in HIJACK_ENV or k.startswith(("LD_", "DYLD_")))
    if hijack:
        raise Forbidden(
            f"{where}env: {', '.join(hijack)} would change what an allowed command runs "
            "(loader or interpreter hooks); refused while [tasks] allowed_commands is set",
            field="env",
        )


def check_model(
    spec: TaskSpec, model_names: Callable[[], Sequence[str]] | None, where: str
) -> None:
    """A named model must be one the model manager manages (else nothing is queued)."""
    if spec.model is None:
        return
    known = list(model_names()) if model_names is not None else []
    if spec.model not in known:
        listed = ", ".join(known) or "none configured"
        raise InvalidInput(
            f"{where}model: no managed model {spec.model!r} (models: {listed})",
            field="model",
        )


def check_devices(spec: TaskSpec, ctx: Context, where: str) -> None:
    """A named GPU exists; the VRAM asked for fits what the arbiter may grant on one GPU."""
    if ctx.pool is not None:
        check_pool_devices(spec, ctx.pool, where)
        return
    if spec.node is not None and spec.node != ctx.node:
        raise InvalidInput(
            f"{where}node: no node {spec.node!r} (this daemon is not in a pool; its node is "
            f"{ctx.node!r})",
            field="node",
        )
    snapshot = ctx.snapshot
    gpus = snapshot.gpus
    present = ", ".join(str(g.index) for g in gpus) or "none"
    if spec.gpu is not None and snapshot.gpu(spec.gpu) is None:
        raise InvalidInput(
            f"{where}gpu {spec.gpu} does not exist (GPUs of this machine: {present})",
            field="gpu",
        )
    need = spec.vram_bytes
    if need <= 0:
        return
    if not gpus:
        raise InvalidInput(
            f"{where}vram: the task needs {format_size(need)} of VRAM but this machine has no "
            "GPU; leave the VRAM out (no --vram) to run it on the CPU",
            field="vram",
        )
    candidates = [snapshot.gpu(spec.gpu)] if spec.gpu is not None else list(gpus)
    budget = ctx.budgets()
    largest = max(
        (
            min(g.memory_total_bytes, budget.get(str(DeviceId.gpu(g.index)), g.memory_total_bytes))
            for g in candidates
            if g is not None
        ),
        default=0,
    )
    if need > largest:
        raise InvalidInput(
            f"{where}the task needs {format_size(need)} of VRAM; no GPU here can grant that "
            f"much (largest: {format_size(largest)})",
            field="vram",
        )


def check_pool_devices(spec: TaskSpec, pool: PoolPort, where: str) -> None:
    """In a pool: a pinned node is known and not down; a named GPU exists on a live node (the
    pinned one); the VRAM asked for fits one of those GPUs."""
    if spec.node is not None:
        problem = pool.node_problem(spec.node)
        if problem is not None:
            raise InvalidInput(f"{where}node: {problem}", field="node")
    gpus = [g for g in pool.gpus() if spec.node is None or g.node == spec.node]
    if not gpus:
        where_to = f"node {spec.node} has" if spec.node else "the pool's live nodes have"
        raise InvalidInput(
            f"{where}{where_to} no GPU: a pool runs tasks on its nodes' GPUs",
            field="node" if spec.node else "tasks",
        )
    if spec.gpu is not None:
        gpus = [g for g in gpus if g.index == spec.gpu]
        if not gpus:
            on = f"node {spec.node}" if spec.node else "any live node"
            raise InvalidInput(f"{where}gpu {spec.gpu} does not exist on {on}", field="gpu")
    need = spec.vram_bytes
    largest = max((g.grantable_total_bytes for g in gpus), default=0)
    if need > largest:
        raise InvalidInput(
            f"{where}the task needs {format_size(need)} of VRAM; no GPU of the pool's live "
            f"nodes can grant that much (largest: {format_size(largest)})",
            field="vram",
        )


def resolve_programs(allowed: Sequence[str]) -> dict[str, str]:
    """``allowed_commands`` entry -> the absolute path that runs for it: a name is looked up
    once in the daemon's own PATH, a path made absolute. Entries that resolve to nothing are
    left out (a task naming one is refused); ``sh`` and ``python`` also stand for shell and
    python tasks, which run ``/bin/sh`` and the daemon's Python. The one function here that
    reads the system: the daemon calls it once, at start."""
    path = os.environ.get("PATH", os.defpath)
    out: dict[str, str] = {}
    for name in allowed:
        found = shutil.which(name, path=path) if os.sep not in name else name
        if found is not None and os.access(found, os.X_OK) and os.path.isfile(found):
            out[name] = os.path.abspath(found)
        elif name not in KIND_NAMES:
            log.warning("[tasks] allowed_commands: %r is not on the daemon's PATH", name)
    return out


def dumps(value: Any) -> str:
    """Compact, sorted JSON (payload sizes, the argument of a python task)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
