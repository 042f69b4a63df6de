"""Records of the model manager: states, device names, placements, statuses (all values).

Device names are ``DeviceId``'s (``devices/ids.py``): ``cpu`` or ``gpu:N`` where ``N`` is
VRAMancer's GPU index (``GpuSnapshot.index``), the same name as in the arbiter and the tasks;
``cuda:N`` is read as ``gpu:N``. A model placed on a simulated GPU keeps ``device = "gpu:N"``
for accounting, and its ``runs_on`` (the torch device its tensors are on) says ``cpu``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from vramancer.devices.ids import CPU as CPU_ID
from vramancer.devices.ids import DeviceId
from vramancer.devices.manager import VramInfo
from vramancer.errors import InvalidInput
from vramancer.units import parse_size


class ModelState(StrEnum):
    """Lifecycle of a managed model (the ``state`` of ``GET /v1/models``)."""

    #: Not in memory anywhere; the next use loads it.
    UNLOADED = "unloaded"
    #: A load (or a move onto a device) is in progress.
    LOADING = "loading"
    #: Resident on ``device`` and usable.
    LOADED = "loaded"
    #: An unload is in progress.
    UNLOADING = "unloading"
    #: The last load or unload failed after every retry; the next load tries again.
    ERROR = "error"


class BackendKind(StrEnum):
    """How a model is run."""

    #: An Ollama server, over its HTTP API.
    OLLAMA = "ollama"
    #: A PyTorch module (or pipeline object) in this process, moved with ``.to()``.
    TORCH = "torch"
    #: A model-server command in its own process group, watched through a health URL.
    PROCESS = "process"


class PlacementKind(StrEnum):
    """What a profile asks for one model."""

    #: On a GPU (the pinned one, else the allowed GPU with the most free memory).
    GPU = "gpu"
    #: On one named GPU (``gpu:N``).
    DEVICE = "device"
    #: Loaded on the CPU.
    CPU = "cpu"
    #: Not loaded.
    UNLOADED = "unloaded"
    #: On a GPU when more than ``min_free_bytes`` is free there, else on the CPU.
    GPU_IF_FREE = "gpu_if_free"


class StepAction(StrEnum):
    """One step of a reconciliation plan."""

    #: Unload the model (frees its memory).
    UNLOAD = "unload"
    #: Move a loaded model to another device in place (torch ``.to()``).
    MOVE = "move"
    #: Load the model on a device.
    LOAD = "load"


class StepStatus(StrEnum):
    """What became of a plan step when it was executed."""

    #: Not executed (an earlier step failed).
    PENDING = "pending"
    #: Executed successfully.
    DONE = "done"
    #: Executed and failed; later steps were not run.
    FAILED = "failed"


CPU = str(CPU_ID)
#: Any GPU (the manager picks one); ``cuda`` means the same.
ANY_GPU = "gpu"


def gpu_device(index: int) -> str:
    """The name of GPU ``index``: ``gpu:N``."""
    return str(DeviceId.gpu(index))


def gpu_index(device: str | None) -> int | None:
    """``gpu:N`` (or ``cuda:N``) -> ``N``; ``cpu`` / None -> None."""
    if device is None or device == CPU:
        return None
    return DeviceId.parse(device).index


def read_device(text: str) -> str:
    """A device as a user or the config writes it (``cpu``, ``gpu`` / ``cuda`` for any GPU,
    ``gpu:N``, ``cuda:N``) in its one form: ``cpu``, ``gpu`` or ``gpu:N``. ``ValueError``
    names the forms."""
    value = text.strip().lower()
    if value in (ANY_GPU, "cuda"):
        return ANY_GPU
    try:
        device = DeviceId.parse(value)
    except ValueError:
        raise ValueError(
            f"device must be 'cpu', 'gpu' (any GPU), 'gpu:N' or 'cuda:N', got {text!r}"
        ) from None
    if not device.is_local:
        raise ValueError(f"device {text!r}: a model runs on this node's devices only")
    return str(device)


def normalize_device(text: str, gpu_indices: tuple[int, ...] | list[int]) -> str:
    """Turn a user's device (``cpu``, ``cuda``, ``gpu``, ``cuda:1``, ``gpu:1``) into ``cpu``,
    ``gpu`` (any GPU) or ``gpu:N``; ``InvalidInput`` names the form or the missing GPU."""
    try:
        device = read_device(text)
    except ValueError as exc:
        raise InvalidInput(str(exc), field="device") from None
    if device == CPU:
        return CPU
    if not gpu_indices:
        raise InvalidInput(
            f"device {text!r}: there is no GPU on this machine (CPU-only mode)", field="device"
        )
    index = gpu_index(device) if device != ANY_GPU else None
    if index is not None and index not in gpu_indices:
        known = ", ".join(gpu_device(i) for i in gpu_indices)
        raise InvalidInput(f"device {text!r} does not exist; GPUs: {known}", field="device")
    return device


@dataclass(frozen=True, slots=True)
class Placement:
    """A profile's wish for one model (``gpu``, ``cpu``, ``unloaded``, ``gpu:N`` (or
    ``cuda:N``), ``gpu_if_free:1GiB``)."""

    kind: PlacementKind
    min_free_bytes: int = 0
    device_index: int | None = None

    @classmethod
    def parse(cls, text: str) -> Placement:
        value = text.strip().lower()
        if value in ("gpu", "cuda"):
            return cls(PlacementKind.GPU)
        if value == "cpu":
            return cls(PlacementKind.CPU)
        if value == "unloaded":
            return cls(PlacementKind.UNLOADED)
        if value.startswith("gpu_if_free:"):
            try:
                size = parse_size(text.strip()[len("gpu_if_free:") :])
            except ValueError as exc:
                raise InvalidInput(f"placement {text!r}: {exc}") from None
            return cls(PlacementKind.GPU_IF_FREE, min_free_bytes=size)
        try:
            device = DeviceId.parse(value)
        except ValueError:
            device = CPU_ID
        if device.is_gpu and device.is_local:
            return cls(PlacementKind.DEVICE, device_index=device.index)
        raise InvalidInput(
            f"placement must be gpu, cpu, unloaded, gpu:N or gpu_if_free:SIZE (got {text!r})"
        )

    def __str__(self) -> str:
        if self.kind is PlacementKind.GPU_IF_FREE:
            return f"gpu_if_free:{_exact_size(self.min_free_bytes)}"
        if self.kind is PlacementKind.DEVICE:
            return gpu_device(self.device_index or 0)
        return self.kind.value


def _exact_size(size: int) -> str:
    """``1073741824`` -> ``1GiB``: the largest binary unit that divides it exactly (so it
    parses back to the same bytes), else plain bytes."""
    for unit, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if size and size % unit == 0:
            return f"{size // unit}{name}"
    return str(size)


def iso_time(wall: float | None) -> str | None:
    """A wall-clock time as ISO 8601 in UTC (what the API reports), or None."""
    if wall is None:
        return None
    return dt.datetime.fromtimestamp(wall, tz=dt.UTC).isoformat()


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """One managed model as the API and the CLI see it."""

    name: str
    backend: BackendKind
    state: ModelState
    #: ``cpu`` / ``gpu:N`` while loaded (or loading onto it); None when unloaded.
    device: str | None
    #: Where tensors really are: ``cpu`` for a placement on a simulated GPU, else ``device``.
    runs_on: str | None
    simulated: bool
    #: Expected VRAM on a GPU (configured, or measured at the last load).
    vram_bytes: int
    #: VRAM it holds now (0 unless loaded on a GPU).
    used_vram_bytes: int
    priority: str
    workload_type: str
    last_used: float | None
    in_use: int
    idle_timeout_s: float
    never_evict: bool
    pinned_device: str | None
    allowed_devices: tuple[str, ...]
    variant: str | None = None
    error: str | None = None
    loads: int = 0
    last_load_s: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "backend": self.backend.value,
            "state": self.state.value,
            "device": self.device,
            "runs_on": self.runs_on,
            "simulated": self.simulated,
            "vram_bytes": self.vram_bytes,
            "used_vram_bytes": self.used_vram_bytes,
            "priority": self.priority,
            "workload_type": self.workload_type,
            "last_used": iso_time(self.last_used),
            "in_use": self.in_use,
            "idle_timeout_s": self.idle_timeout_s,
            "never_evict": self.never_evict,
            "pinned_device": self.pinned_device,
            "allowed_devices": list(self.allowed_devices),
            "variant": self.variant,
            "error": self.error,
            "loads": self.loads,
            "last_load_s": self.last_load_s,
        }


@dataclass(frozen=True, slots=True)
class GpuResourceStatus:
    """The GPU resource status (VLM state, CLIP device, VRAM, mode), served at
    ``GET /v1/gpu/status``."""

    execution_mode: str
    vlm_state: ModelState
    vlm_model: str
    clip_device: str
    vram: VramInfo
    idle_timeout_seconds: int
    last_vlm_request: float | None
    degraded_mode: bool
    degraded_reason: str | None
    cpu_only: bool = False
    simulated: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "execution_mode": self.execution_mode,
            "vlm_state": self.vlm_state.value,
            "vlm_model": self.vlm_model,
            "clip_device": self.clip_device,
            "vram": dataclasses.asdict(self.vram),
            "idle_timeout_seconds": self.idle_timeout_seconds,
            "last_vlm_request": iso_time(self.last_vlm_request),
            "degraded_mode": self.degraded_mode,
            "degraded_reason": self.degraded_reason,
            "cpu_only": self.cpu_only,
            "simulated": self.simulated,
        }


@dataclass(frozen=True, slots=True)
class PlanStep:
    """One step of a profile reconciliation: ``action`` ``model`` to ``device``."""

    action: StepAction
    model: str
    #: Target device (``cpu`` / ``gpu:N``) for load and move; the device freed for unload.
    device: str | None
    reason: str = ""

    def describe(self) -> str:
        if self.action is StepAction.UNLOAD:
            where = f" from {self.device}" if self.device else ""
            return f"unload {self.model}{where}"
        if self.action is StepAction.MOVE:
            return f"move {self.model} to {self.device}"
        return f"load {self.model} on {self.device}"


@dataclass(frozen=True, slots=True)
class ProfilePlan:
    """An ordered plan: every step that frees VRAM comes before every step that takes some."""

    profile: str
    steps: tuple[PlanStep, ...] = ()
    #: Wishes the plan could not honour (a GPU placement on a CPU-only machine ...).
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StepResult:
    step: PlanStep
    status: StepStatus
    duration_s: float = 0.0
    error: str | None = None
    #: The failed step's error code (``backend_unavailable``, ``insufficient_memory`` ...).
    error_code: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.step.action.value,
            "model": self.step.model,
            "device": self.step.device,
            "reason": self.step.reason,
            "description": self.step.describe(),
            "status": self.status.value,
            "duration_s": round(self.duration_s, 6),
            "error": self.error,
            "error_code": self.error_code,
        }


@dataclass(frozen=True, slots=True)
class SwitchReport:
    """What a profile switch did, step by step."""

    profile: str
    previous: str
    ok: bool
    steps: tuple[StepResult, ...] = ()
    duration_s: float = 0.0
    failed_step: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.profile,
            "previous": self.previous,
            "ok": self.ok,
            "duration_s": round(self.duration_s, 6),
            "failed_step": self.failed_step,
            "steps": [s.as_dict() for s in self.steps],
            "notes": list(self.notes),
        }
