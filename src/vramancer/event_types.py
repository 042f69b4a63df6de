"""Every kind of event the bus carries: one frozen dataclass per kind.

An event's ``kind`` (its SSE ``event:`` name) is a class variable; its fields are the keys of
the ``data`` object that ``GET /v1/events`` sends, in the same order. Fields hold plain values
only (str, int, float, bool, None, lists and dicts of those), so this module needs no
subsystem: publishers convert their own types (enums to their value, and so on). A field
whose key is not a Python name (``from``) names it in its metadata under ``"key"``.

:data:`BusEvent` is the closed union the bus accepts: a kind not listed here cannot be
published. :func:`data_schema` gives the JSON Schema of one kind's ``data``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

#: A JSON value as events carry it (``details`` of ``resource_changed``).
Scalar = str | int | float | bool | None


@dataclass(frozen=True, slots=True)
class EventData:
    """Base of every event kind; subclasses set ``kind``."""

    kind: ClassVar[str]

    def as_data(self) -> dict[str, Any]:
        """The ``data`` object of the wire format (keys in field order)."""
        return {
            f.metadata.get("key", f.name): _plain(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }


def _plain(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------- runtime


@dataclass(frozen=True, slots=True)
class RuntimeStarted(EventData):
    """Every subsystem started; the node serves."""

    kind: ClassVar[str] = "runtime_started"
    node: str


# ---------------------------------------------------------------------------- devices


@dataclass(frozen=True, slots=True)
class DeviceChanged(EventData):
    """A GPU appeared, disappeared, failed or recovered (``change``: added, removed, error,
    recovered)."""

    kind: ClassVar[str] = "device_changed"
    change: str
    index: int
    uuid: str
    name: str
    backend: str
    simulated: bool
    error: str | None


@dataclass(frozen=True, slots=True)
class VramChanged(EventData):
    """A device's free memory moved past ``[devices] vram_change_threshold``."""

    kind: ClassVar[str] = "vram_changed"
    index: int
    uuid: str
    name: str
    backend: str
    simulated: bool
    free_before_bytes: int
    free_after_bytes: int
    used_bytes: int
    total_bytes: int
    #: Positive when memory was freed, negative when it was taken.
    delta_free_bytes: int


# ---------------------------------------------------------------------------- arbiter


@dataclass(frozen=True, slots=True)
class _AllocationFields(EventData):
    id: str
    workload_type: str
    priority: str
    memory_bytes: int
    quality_target: float
    device: str | None
    owner: str | None
    created_at: float
    preemptible: bool
    min_quality: float | None


@dataclass(frozen=True, slots=True)
class AllocationGranted(_AllocationFields):
    """The arbiter granted an allocation."""

    kind: ClassVar[str] = "allocation_granted"


@dataclass(frozen=True, slots=True)
class AllocationReleased(_AllocationFields):
    """An allocation was released by its holder (or when the arbiter stopped)."""

    kind: ClassVar[str] = "allocation_released"


@dataclass(frozen=True, slots=True)
class Preempted(EventData):
    """The arbiter took an allocation away: for a higher priority (``by``), or because the
    budget shrank (``reason`` ``budget_shrunk``, ``by`` null)."""

    kind: ClassVar[str] = "preempted"
    allocation_id: str
    owner: str | None
    workload_type: str
    priority: str
    memory_bytes: int
    device: str | None
    reason: str
    by: str | None
    by_priority: str | None
    by_owner: str | None


@dataclass(frozen=True, slots=True)
class ArbiterBudgetChanged(EventData):
    """The arbiter's budget changed (a device came, went or failed)."""

    kind: ClassVar[str] = "arbiter_budget_changed"
    budget_bytes: int
    #: Budget per device name (``cuda:0`` ...).
    devices: dict[str, int]


# ---------------------------------------------------------------------------- models


@dataclass(frozen=True, slots=True)
class ModelLoaded(EventData):
    """A model is loaded (``reason`` ``adopted``: found loaded in its server)."""

    kind: ClassVar[str] = "model_loaded"
    model: str
    backend: str
    device: str | None
    runs_on: str
    simulated: bool
    duration_s: float
    vram_bytes: int
    reason: str


@dataclass(frozen=True, slots=True)
class ModelUnloaded(EventData):
    """A model is unloaded (``reason`` ``external``: its server dropped it)."""

    kind: ClassVar[str] = "model_unloaded"
    model: str
    backend: str
    device: str | None
    reason: str
    freed_bytes: int


@dataclass(frozen=True, slots=True)
class ModelMigrated(EventData):
    """A loaded model moved from one device to another."""

    kind: ClassVar[str] = "model_migrated"
    model: str
    from_: str | None = field(metadata={"key": "from"})
    to: str
    runs_on: str
    simulated: bool
    duration_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class ResourceChanged(EventData):
    """What a model's load, unload or move did to the devices, for dashboards: ``event_type``
    (``model_loaded``, ``model_unloaded``, ``device_changed``) and that event's ``data``."""

    kind: ClassVar[str] = "resource_changed"
    event_type: str
    details: dict[str, Scalar]


@dataclass(frozen=True, slots=True)
class ModelError(EventData):
    """A model's load, unload or move failed (``code``: the error code)."""

    kind: ClassVar[str] = "model_error"
    model: str
    operation: str
    error: str
    code: str


@dataclass(frozen=True, slots=True)
class ModelPreempted(EventData):
    """The arbiter took a model's allocation; the model moves to the CPU or unloads."""

    kind: ClassVar[str] = "model_preempted"
    model: str
    device: str | None
    allocation_id: str


@dataclass(frozen=True, slots=True)
class IdleUnload(EventData):
    """A model idle for its timeout was unloaded."""

    kind: ClassVar[str] = "idle_unload"
    model: str
    idle_s: float
    idle_timeout_s: float


@dataclass(frozen=True, slots=True)
class DegradedMode(EventData):
    """A model server became unreachable (``degraded`` true) or reachable again."""

    kind: ClassVar[str] = "degraded_mode"
    backend: str
    degraded: bool
    reason: str | None


@dataclass(frozen=True, slots=True)
class ModeChanged(EventData):
    """A profile switch went through; ``steps`` describes each step."""

    kind: ClassVar[str] = "mode_changed"
    previous: str | None
    mode: str
    duration_s: float
    steps: list[str]


@dataclass(frozen=True, slots=True)
class ProfileSwitchFailed(EventData):
    """A profile switch stopped at step ``failed_step``."""

    kind: ClassVar[str] = "profile_switch_failed"
    profile: str
    previous: str | None
    failed_step: int
    step: str
    error: str | None


# ---------------------------------------------------------------------------- memory


@dataclass(frozen=True, slots=True)
class BlockPut(EventData):
    """A block was written (or overwritten) in ``tier``."""

    kind: ClassVar[str] = "block_put"
    id: str
    tier: str
    size: int


@dataclass(frozen=True, slots=True)
class BlockDeleted(EventData):
    """A block was deleted from ``tier``."""

    kind: ClassVar[str] = "block_deleted"
    id: str
    tier: str
    size: int


@dataclass(frozen=True, slots=True)
class _BlockMoveFields(EventData):
    id: str
    size: int
    source: str
    target: str
    reason: str
    seconds: float


@dataclass(frozen=True, slots=True)
class BlockPromoted(_BlockMoveFields):
    """A block moved up a tier."""

    kind: ClassVar[str] = "block_promoted"


@dataclass(frozen=True, slots=True)
class BlockDemoted(_BlockMoveFields):
    """A block moved down a tier (asked for, or to make room)."""

    kind: ClassVar[str] = "block_demoted"


@dataclass(frozen=True, slots=True)
class BlockEvicted(_BlockMoveFields):
    """A block was evicted down a tier by the eviction cycle."""

    kind: ClassVar[str] = "block_evicted"


@dataclass(frozen=True, slots=True)
class BlockLost(EventData):
    """A block's file was gone when the store opened."""

    kind: ClassVar[str] = "block_lost"
    id: str
    reason: str


@dataclass(frozen=True, slots=True)
class BlockPinned(EventData):
    """A block was pinned in its tier."""

    kind: ClassVar[str] = "block_pinned"
    id: str


@dataclass(frozen=True, slots=True)
class BlockUnpinned(EventData):
    """A block was unpinned."""

    kind: ClassVar[str] = "block_unpinned"
    id: str


@dataclass(frozen=True, slots=True)
class TierCapacityChanged(EventData):
    """A tier's capacity (its budget) was set."""

    kind: ClassVar[str] = "tier_capacity_changed"
    tier: str
    capacity_bytes: int
    target_capacity_bytes: int


@dataclass(frozen=True, slots=True)
class MemoryBudgetChanged(EventData):
    """The host-memory regulator changed a tier's budget."""

    kind: ClassVar[str] = "memory_budget_changed"
    tier: str
    old_bytes: int
    new_bytes: int
    action: str
    reason: str
    available_bytes: int
    low_bytes: int
    high_bytes: int


# ---------------------------------------------------------------------------- tasks


@dataclass(frozen=True, slots=True)
class TaskStateChanged(EventData):
    """A task changed state (one event per committed change)."""

    kind: ClassVar[str] = "task_state"
    task_id: str
    state: str
    previous: str | None
    attempts: int
    device: str | None
    exit_code: int | None
    error: str | None
    type: str


#: What ``EventBus.publish`` accepts: every kind, and nothing else.
BusEvent = Union[  # noqa: UP007 (a runtime value: typing.get_args reads it)
    RuntimeStarted,
    DeviceChanged,
    VramChanged,
    AllocationGranted,
    AllocationReleased,
    Preempted,
    ArbiterBudgetChanged,
    ModelLoaded,
    ModelUnloaded,
    ModelMigrated,
    ResourceChanged,
    ModelError,
    ModelPreempted,
    IdleUnload,
    DegradedMode,
    ModeChanged,
    ProfileSwitchFailed,
    BlockPut,
    BlockDeleted,
    BlockPromoted,
    BlockDemoted,
    BlockEvicted,
    BlockLost,
    BlockPinned,
    BlockUnpinned,
    TierCapacityChanged,
    MemoryBudgetChanged,
    TaskStateChanged,
]

#: Every event class, in the order above.
EVENT_TYPES: tuple[type[EventData], ...] = typing.get_args(BusEvent)
#: kind -> its class.
BY_KIND: dict[str, type[EventData]] = {cls.kind: cls for cls in EVENT_TYPES}
assert len(BY_KIND) == len(EVENT_TYPES), "two event classes share a kind"


# ---------------------------------------------------------------------------- JSON Schema


def data_schema(cls: type[EventData]) -> dict[str, Any]:
    """The JSON Schema of ``cls``'s ``data`` object: every key is required (a missing value is
    ``null``), no other key appears."""
    hints = typing.get_type_hints(cls)
    properties = {
        f.metadata.get("key", f.name): _type_schema(hints[f.name]) for f in dataclasses.fields(cls)
    }
    return {
        "type": "object",
        "description": " ".join((cls.__doc__ or "").split()),
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


_SCALARS: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def _type_schema(hint: Any) -> dict[str, Any]:
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if all(a in _SCALARS for a in args):
            return {"type": [_SCALARS[a] for a in args]}
        return {"anyOf": [_type_schema(a) for a in args]}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1])}
    raise TypeError(f"event field type {hint!r} has no JSON Schema here")


def message_schema() -> dict[str, Any]:
    """The JSON Schema of one SSE message's ``data`` line: ``kind``, ``seq``, ``timestamp``
    and ``data``, whose schema the kind picks (one ``$defs`` entry per kind)."""
    kinds = list(BY_KIND)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {
            "kind": {"type": "string", "enum": kinds},
            "seq": {"type": "integer"},
            "timestamp": {"type": "number"},
            "data": {"type": "object"},
        },
        "required": ["kind", "seq", "timestamp", "data"],
        "additionalProperties": False,
        "oneOf": [
            {
                "properties": {
                    "kind": {"const": kind},
                    "data": {"$ref": f"#/$defs/{kind}"},
                }
            }
            for kind in kinds
        ],
        "$defs": {kind: data_schema(cls) for kind, cls in BY_KIND.items()},
    }
