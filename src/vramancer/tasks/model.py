"""The task model: what a user submits (``TaskSpec``), what the queue stores (``TaskRecord``).

The body: ``type``, ``cmd``/``shell``, ``env``, ``cwd``, GPU and VRAM, priority, retries and
timeout, idempotency key and task id (``TaskSpec``'s fields), with ``python`` (``module:function``)
and ``payload`` (free JSON: ``{"args": [...], "kwargs": {...}}`` for ``python`` tasks,
``{"max_blocks": N}`` for ``warmup``/``compress``) and ``model`` (a managed model the task
needs, held loaded while it runs). Validation is strict (unknown fields,
missing ``cmd`` for a ``cmd`` task, negative timeouts ... are refused) so a bad submission is a
4xx and nothing is queued.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vramancer.arbiter.types import Priority
from vramancer.blockids import BLOCK_ID_PATTERN
from vramancer.devices.ids import NODE_NAME_PATTERN
from vramancer.units import Size, format_size

#: Task ids given by callers: used in file names, so no slash and a bounded length.
TASK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PY_TARGET = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$"
#: Longest timeout accepted (30 days).
MAX_TIMEOUT_S = 30 * 24 * 3600.0
#: Longest model name accepted in a task body.
MAX_MODEL_NAME = 256
#: Bounds of a task body, checked before anything is queued (a larger body is a 422 naming
#: the field). ``[tasks] max_payload_bytes`` bounds the whole body as stored on top of these.
#: Most arguments in ``cmd``.
MAX_ARGV = 4096
#: Longest single argument (Linux refuses longer ones: ``MAX_ARG_STRLEN``), and longest
#: ``shell`` source (it is one argument of ``sh -c``).
MAX_ARG_CHARS = 128 * 1024
#: Most variables in ``env``, longest name and value.
MAX_ENV_VARS = 256
MAX_ENV_NAME = 256
MAX_ENV_VALUE = 32 * 1024
#: Blocks one task may name (``blocks``).
MAX_TASK_BLOCKS = 64
#: What a task's ``release`` may name: a link of the release directory, or a release.
RELEASE_PATTERN = r"^(current|candidate|[0-9]{8}T[0-9]{6}Z-[0-9a-f]{7,40})$"
#: Longest ``python`` target (``module:function``) and ``cwd``.
MAX_PY_TARGET = 512
MAX_PATH_CHARS = 4096
#: Largest ``payload`` (as compact JSON).
MAX_PAYLOAD_JSON = 1024 * 1024
#: Longest idempotency key.
MAX_IDEMPOTENCY_KEY = 256
#: Most tasks one ``submit_batch`` body may hold whatever ``[tasks] max_batch`` says; a longer
#: list is refused before any of its items is looked at.
MAX_BATCH_HARD = 100_000
#: Owner of tasks submitted with no token (no ``[auth] tokens``: every caller is this machine).
LOCAL_OWNER = "local"
#: Owner of the maintenance tasks the daemon queues itself (``[tasks] auto_maintenance``).
SYSTEM_OWNER = "system"
#: Environment variable names whose values are hidden from every caller but an admin.
SECRET_ENV = re.compile(
    r"TOKEN|SECRET|PASSW|PASSPHRASE|KEY|CREDENTIAL|AUTH|COOKIE|SESSION|PRIVATE|SIGNATURE|"
    r"CERT|DSN|_URL$|^URL$",
    re.IGNORECASE,
)
#: What replaces a hidden ``env`` value in a status body.
REDACTED = "<redacted>"


def owner_of(token: str | None) -> str:
    """The owner recorded with a task: a stable id of the caller's token that does not reveal
    it (the first 16 hex digits of its SHA-256), or ``local`` without a token."""
    if token is None:
        return LOCAL_OWNER
    return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]


class EnvView(StrEnum):
    """How much of a task a status body shows: its ``env`` and, to other callers, its code."""

    #: Every value (admins).
    FULL = "full"
    #: Values of secret-looking names (``SECRET_ENV``) hidden (the task's owner).
    NO_SECRETS = "no_secrets"
    #: Another caller's task (not an admin): every ``env`` value hidden (names kept), and so are
    #: the command text (``cmd``, ``shell``, ``python``), the ``payload`` of a task that runs
    #: code, and the output tails (``stdout_tail``, ``stderr_tail``: its logs are its owner's).
    NAMES = "names"


#: Fields of a task body that hold the code it runs (hidden from other callers).
CODE_FIELDS = ("cmd", "shell", "python")


def redact_code(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` (a parsed task body) with its command text and, for a task that runs code, its
    payload replaced by ``<redacted>`` (``cmd`` keeps its list shape: one hidden item)."""
    for name in CODE_FIELDS:
        if name in spec:
            spec[name] = [REDACTED] if name == "cmd" else REDACTED
    if "payload" in spec and not TaskType(spec["type"]).maintenance:
        spec["payload"] = REDACTED
    return spec


def redact_env(env: dict[str, str], view: EnvView) -> dict[str, str]:
    """``env`` as ``view`` allows: hidden values read ``<redacted>``."""
    if view is EnvView.FULL:
        return env
    if view is EnvView.NAMES:
        return dict.fromkeys(env, REDACTED)
    return {k: REDACTED if SECRET_ENV.search(k) else v for k, v in env.items()}


class TaskType(StrEnum):
    """What a task runs."""

    #: An argv list run as a subprocess (no shell).
    CMD = "cmd"
    #: A shell string run by ``sh -c``.
    SHELL = "shell"
    #: ``module:function`` called with JSON arguments in a subprocess of the daemon's Python.
    PYTHON = "python"
    #: Maintenance: prefetch hot blocks of the memory store (idle windows only).
    WARMUP = "warmup"
    #: Maintenance: lazy L4 -> L5 compression of cold blocks (idle windows only).
    COMPRESS = "compress"
    #: Maintenance: does nothing; instrumentation and tests (idle windows only).
    NOOP = "noop"
    #: Maintenance: one upkeep pass of the memory store (promotions queued by hotness, then an
    #: eviction cycle) (idle windows only).
    REBALANCE = "rebalance"

    @property
    def maintenance(self) -> bool:
        """Maintenance tasks run in-process, in idle windows, and never delay a user task."""
        return self in _MAINTENANCE

    @property
    def needs_operator(self) -> bool:
        """Tasks that run arbitrary code need the operator role."""
        return not self.maintenance


_MAINTENANCE = frozenset({TaskType.WARMUP, TaskType.COMPRESS, TaskType.NOOP, TaskType.REBALANCE})


class TaskState(StrEnum):
    """Where a task is in its life. ``done``, ``failed`` and ``cancelled`` are terminal."""

    #: Accepted and durable; waiting for the dispatcher.
    QUEUED = "queued"
    #: Leased to a worker and a device; the process is being started.
    SCHEDULED = "scheduled"
    #: No eligible device has room right now; it stays in the queue.
    WAITING_GPU = "waiting_gpu"
    #: Its process (or maintenance job) is running.
    RUNNING = "running"
    #: An attempt failed; queued again once its back-off delay (``not_before``) has passed.
    RETRY = "retry"
    #: Ended with exit code 0. A task ends as done at most once.
    DONE = "done"
    #: Ended in failure after its last allowed attempt.
    FAILED = "failed"
    #: Cancelled by a user before it ended.
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED})
#: States in which a task waits in the queue for a device.
READY_STATES = (TaskState.QUEUED, TaskState.WAITING_GPU)
#: States in which a task holds a lease.
LEASED_STATES = (TaskState.SCHEDULED, TaskState.RUNNING)


#: The program names a warm ``cmd`` task may start (they mean the daemon's Python).
WARM_PROGRAMS = frozenset({"python", "python3"})
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def warm_python_argv(cmd: Sequence[str] | None) -> list[str] | None:
    """The interpreter's arguments of ``cmd`` when it runs a Python script or module the way a
    warm runner can (``python SCRIPT ...``, ``python -m MODULE ...``), else None."""
    if not cmd or len(cmd) < 2 or cmd[0] not in WARM_PROGRAMS:
        return None
    args = list(cmd[1:])
    if args[0] == "-m":
        return args if len(args) >= 2 and _MODULE_NAME.match(args[1]) else None
    return None if args[0].startswith("-") else args


class TaskSpec(BaseModel):
    """A task as submitted (the task body). Immutable once accepted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str | None = Field(default=None, max_length=128, pattern=TASK_ID_PATTERN)
    type: TaskType
    cmd: list[Annotated[str, Field(max_length=MAX_ARG_CHARS)]] | None = Field(
        default=None, min_length=1, max_length=MAX_ARGV
    )
    shell: str | None = Field(default=None, min_length=1, max_length=MAX_ARG_CHARS)
    #: ``module:function`` for ``python`` tasks.
    python: str | None = Field(default=None, max_length=MAX_PY_TARGET, pattern=_PY_TARGET)
    #: Free JSON for the task: ``args``/``kwargs`` (python), ``max_blocks`` (maintenance).
    payload: dict[str, Any] | None = None
    #: Pin to this GPU (VRAMancer index, as in ``GET /v1/devices``).
    gpu: int | None = Field(default=None, ge=0, strict=True)
    #: VRAM the task needs; reserved in the arbiter while it runs.
    vram: Size | None = None
    priority: Priority = Priority.NORMAL
    #: Seconds before the task's process group is killed (default: ``[tasks] default_timeout_s``).
    timeout: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)
    #: Retries after the first attempt (default: ``[tasks] max_retries``).
    max_retries: int | None = Field(default=None, ge=0, le=100, strict=True)
    #: Two submissions with the same key are one task.
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=MAX_IDEMPOTENCY_KEY)
    #: Working directory (absolute); default: a scratch directory per task.
    cwd: str | None = Field(default=None, max_length=MAX_PATH_CHARS)
    env: (
        dict[
            Annotated[str, Field(max_length=MAX_ENV_NAME)],
            Annotated[str, Field(max_length=MAX_ENV_VALUE)],
        ]
        | None
    ) = Field(default=None, max_length=MAX_ENV_VARS)
    #: A managed model (``[[models]]`` name) the task needs: loaded before its process starts
    #: and held (never reaped or evicted) until it ends.
    model: str | None = Field(default=None, min_length=1, max_length=MAX_MODEL_NAME)
    #: Pin to this node of the pool (``node_name``); alone, this node.
    node: str | None = Field(default=None, max_length=63, pattern=NODE_NAME_PATTERN)
    #: Blocks of the memory store the task reads: brought to the node that runs it (from a
    #: peer over the fastpath when another node holds them) and written as files under
    #: ``$VRM_BLOCKS_DIR`` before its process starts.
    blocks: list[Annotated[str, Field(pattern=f"^{BLOCK_ID_PATTERN}$")]] | None = Field(
        default=None, min_length=1, max_length=MAX_TASK_BLOCKS
    )
    #: Run in a release's checkout (``current``, ``candidate`` or a release's name, see
    #: docs/release.md) instead of ``cwd``: resolved when the task starts, so a release
    #: accepted later never changes the code under a running task.
    release: str | None = Field(default=None, max_length=64, pattern=RELEASE_PATTERN)
    #: A ``cmd`` task that runs a Python script or module (``["python", SCRIPT, ARG ...]`` or
    #: ``["python", "-m", MODULE, ARG ...]``) forks from the warm runner instead of starting an
    #: interpreter: it runs in the daemon's Python (the runner's, with ``[tasks] warm_preload``
    #: imported), not a ``python`` found on its ``PATH``. Cold when the runner is off.
    warm: bool | None = Field(default=None, strict=True)

    @field_validator("cmd")
    @classmethod
    def _cmd(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value[0] or any("\0" in part for part in value)):
            raise ValueError("cmd[0] must name a program and no argument may contain NUL")
        return value

    @field_validator("payload")
    @classmethod
    def _payload(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            size = len(json.dumps(value, separators=(",", ":"), default=str))
            if size > MAX_PAYLOAD_JSON:
                raise ValueError(
                    f"{format_size(size)} as JSON; at most {format_size(MAX_PAYLOAD_JSON)}"
                )
        return value

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, value: str | None) -> str | None:
        if value is not None and not os.path.isabs(value):
            raise ValueError(f"must be an absolute path (got {value!r})")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, item in (value or {}).items():
            if not _ENV_NAME.match(key):
                raise ValueError(f"{key!r} is not a valid variable name")
            if "\0" in item:
                raise ValueError(f"the value of {key} contains NUL")
        return value

    @model_validator(mode="after")
    def _fields_match_type(self) -> TaskSpec:
        needed = {TaskType.CMD: "cmd", TaskType.SHELL: "shell", TaskType.PYTHON: "python"}
        for kind, name in needed.items():
            given = getattr(self, name) is not None
            if self.type is kind and not given:
                raise ValueError(f"a {kind.value} task needs '{name}'")
            if self.type is not kind and given:
                raise ValueError(f"'{name}' is only for {kind.value} tasks (type is {self.type})")
        if self.cwd is not None and self.release is not None:
            raise ValueError("give cwd or release, not both (a release is its own directory)")
        if self.warm and warm_python_argv(self.cmd) is None:
            raise ValueError(
                "warm: only a cmd task running a Python script or module starts warm "
                '(cmd ["python", SCRIPT, ...] or ["python", "-m", MODULE, ...])'
            )
        if self.type.maintenance:
            extra = [
                n
                for n in ("gpu", "vram", "cwd", "env", "model", "node", "blocks", "release")
                if getattr(self, n) is not None
            ]
            if extra:
                raise ValueError(
                    f"{', '.join(extra)} apply only to cmd, shell and python tasks "
                    f"({self.type} runs inside the daemon)"
                )
        return self

    @property
    def vram_bytes(self) -> int:
        return self.vram or 0

    def program(self) -> str:
        """The executable the task starts (for the allow-list): argv[0], ``sh`` or ``python``."""
        if self.type is TaskType.CMD and self.cmd:
            return self.cmd[0]
        if self.type is TaskType.SHELL:
            return "sh"
        if self.type is TaskType.PYTHON:
            return "python"
        return ""

    def estimate_key(self) -> str:
        """Tasks with the same key share a learned run time (``RuntimeEstimator``)."""
        if self.type is TaskType.CMD and self.cmd:
            words = [os.path.basename(self.cmd[0]), *self.cmd[1:2]]
            return ("cmd:" + " ".join(words))[:200]
        if self.type is TaskType.SHELL and self.shell:
            return ("shell:" + " ".join(self.shell.split()[:2]))[:200]
        if self.type is TaskType.PYTHON and self.python:
            return "python:" + self.python
        return self.type.value


class SubmitBatch(BaseModel):
    """Body of ``POST /api/tasks/submit_batch``: ``{"tasks": [task body, ...]}``.

    The items are task bodies (``TaskSpec``), validated one by one by the service only once
    the list's length passed ``[tasks] max_batch``: a huge list of junk is refused at the cost
    of counting it, not of validating every item."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[Any] = Field(
        min_length=1,
        max_length=MAX_BATCH_HARD,
        json_schema_extra={"items": {"type": "object", "description": "a task body"}},
    )


@dataclass(frozen=True, slots=True)
class NewTask:
    """A validated submission with everything the queue stores, decided by the service."""

    task_id: str
    spec: TaskSpec
    spec_json: str
    priority_rank: int
    estimate_s: float
    estimate_key: str
    max_retries: int
    timeout_s: float
    maintenance: bool
    #: Who submitted it (``owner_of``); idempotency keys and task ids belong to their owner.
    owner: str = LOCAL_OWNER


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """A task as stored. Timestamps are wall-clock seconds (``clock.time()``); None: not yet."""

    task_id: str
    seq: int
    type: TaskType
    state: TaskState
    priority: Priority
    spec_json: str
    attempts: int
    max_retries: int
    timeout_s: float
    estimate_s: float
    estimate_key: str
    gpu: int | None
    vram_bytes: int
    device: str | None
    lease_token: int
    exit_code: int | None
    error: str | None
    submitted_at: float
    scheduled_at: float | None
    started_at: float | None
    finished_at: float | None
    not_before: float | None
    cancel_requested: bool
    pid: int | None
    stdout_tail: str = ""
    stderr_tail: str = ""
    idempotency_key: str | None = None
    #: Attempts whose lease was lost (the worker or daemon died while running them).
    lease_losses: int = 0
    #: When it last became ready (submitted, back-off over, requeued); aging counts from it.
    ready_at: float | None = None
    #: Who submitted it (``owner_of``), ``system`` for the daemon's own maintenance.
    owner: str = LOCAL_OWNER
    #: The node of the pool its current (or last) attempt was leased to; None on one machine.
    node: str | None = None

    @property
    def spec(self) -> dict[str, Any]:
        """The task body as submitted (with its id), parsed on demand."""
        parsed: dict[str, Any] = json.loads(self.spec_json)
        return parsed

    def task_spec(self) -> TaskSpec:
        return TaskSpec.model_validate_json(self.spec_json)

    def outcome(self, kind: OutcomeKind, **fields: Any) -> Outcome:
        """How this leased attempt ended (reported under its lease token)."""
        return Outcome(self.task_id, self.lease_token, kind, **fields)

    def as_dict(self, env: EnvView = EnvView.FULL) -> dict[str, Any]:
        """The status body of the API (``task_id``, ``state``, ``attempts``, ``device`` ...);
        ``env`` says how much of the task it shows (``redact_env``; ``EnvView.NAMES`` also
        hides its code and output, ``redact_code``)."""
        spec = self.spec
        if spec.get("env"):
            spec["env"] = redact_env(spec["env"], env)
        others = env is EnvView.NAMES
        if others:
            redact_code(spec)
        return {
            "task_id": self.task_id,
            "type": self.type.value,
            "state": self.state.value,
            "attempts": self.attempts,
            "max_retries": self.max_retries,
            "device": self.device,
            "node": self.node,
            "gpu": self.gpu,
            "vram_bytes": self.vram_bytes,
            "model": spec.get("model"),
            "priority": self.priority.value,
            "exit_code": self.exit_code,
            "error": self.error,
            "waiting_reason": self.error if self.state is TaskState.WAITING_GPU else None,
            "timeout_s": self.timeout_s,
            "estimate_s": self.estimate_s,
            "submitted_at": self.submitted_at,
            "scheduled_at": self.scheduled_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "not_before": self.not_before,
            "cancel_requested": self.cancel_requested,
            "idempotency_key": self.idempotency_key,
            "lease_losses": self.lease_losses,
            "ready_at": self.ready_at,
            "owner": self.owner,
            "system": self.owner == SYSTEM_OWNER,
            "stdout_tail": REDACTED if others and self.stdout_tail else self.stdout_tail,
            "stderr_tail": REDACTED if others and self.stderr_tail else self.stderr_tail,
            "spec": spec,
        }


@dataclass(frozen=True, slots=True)
class Change:
    """One state change, committed: what the service turns into an event and metrics."""

    task_id: str
    previous: TaskState | None
    state: TaskState
    attempts: int = 0
    device: str | None = None
    exit_code: int | None = None
    error: str | None = None
    #: Seconds from becoming ready to starting (set when the task starts running).
    wait_s: float | None = None
    #: Seconds of running (set when the task ends after running).
    run_s: float | None = None
    type: TaskType | None = None
    #: The task's ``estimate_key`` (set when it ends done, to learn its run time).
    estimate_key: str | None = None


@dataclass(frozen=True, slots=True)
class Submitted:
    """The answer to one submission: the task id, and whether this call created it."""

    task_id: str
    created: bool


@dataclass(frozen=True, slots=True)
class Grant:
    """The dispatcher's decision for one ready task: lease it on this device."""

    task_id: str
    device: str
    #: Lease straight to ``running`` (maintenance runs at once) instead of ``scheduled``.
    running: bool = False
    #: The state the dispatcher saw the task in (queued or waiting_gpu).
    previous: TaskState = TaskState.QUEUED


class OutcomeKind(StrEnum):
    """How an attempt ended."""

    #: Exit code 0 (or the maintenance job returned): the task is done.
    OK = "ok"
    #: Non-zero exit, timeout, or a start failure a later try may not meet (no memory to
    #: fork ...): retry or fail per the retry policy.
    ERROR = "error"
    #: A failure no retry can cure (the program is missing or cannot be executed, its working
    #: directory does not exist): the task fails at once, whatever retries it has left.
    FATAL = "fatal"
    #: Killed because a user cancelled it.
    CANCELLED = "cancelled"
    #: Never started (the arbiter had no room after all): back to the queue, not counted.
    RELEASED = "released"


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended, reported by the worker that held the lease ``lease_token``."""

    task_id: str
    lease_token: int
    kind: OutcomeKind
    exit_code: int | None = None
    error: str | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    run_s: float | None = None


@dataclass(frozen=True, slots=True)
class HistoryPage:
    """One page of history, newest first; ``next_cursor`` continues (None: no more)."""

    tasks: list[TaskRecord] = field(default_factory=list)
    next_cursor: str | None = None
