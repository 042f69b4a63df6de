"""Pure decisions of the model manager: no I/O, no clock, no locks.

* :func:`plan_profile` - a profile + the models' current states + free VRAM -> an ordered plan
  that frees VRAM first (unload, move to the CPU) and loads after.
* :func:`choose_evictions` - which loaded models to unload to make room on one GPU: idle,
  low-priority, cheap-to-reload first; "no room" is a value naming what blocks.
* :func:`next_group` - which model a device's load queue serves next: grouped by model, but a
  request that waited ``max_wait_s`` goes first (no starvation).
* :func:`plan_optimize` - ``optimize_resources``: unload idle models, then under pressure switch
  to smaller variants and unload the least recently used.
* :class:`LoadBandwidth` - bytes per second of past loads, per backend (reload cost).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from vramancer.models.types import (
    ANY_GPU,
    CPU,
    ModelState,
    Placement,
    PlacementKind,
    PlanStep,
    ProfilePlan,
    StepAction,
    gpu_device,
    gpu_index,
)

#: Weight of the newest measurement in the load-bandwidth average.
BANDWIDTH_ALPHA = 0.3


@dataclass(frozen=True, slots=True)
class ModelView:
    """What a policy needs to know about one managed model, frozen."""

    name: str
    backend: str
    state: ModelState
    #: ``cpu`` / ``gpu:N`` when loaded, else None.
    device: str | None
    #: Memory it takes on a GPU.
    vram_bytes: int
    priority_rank: int = 1
    #: Can move between devices in place (torch ``.to()``); others unload and load again.
    can_move: bool = False
    #: Allowed devices as configured: ``gpu``, ``gpu:N``, ``cpu``.
    allowed: tuple[str, ...] = ("gpu", CPU)
    pinned: str | None = None
    in_use: bool = False
    never_evict: bool = False
    idle_s: float = 0.0
    reload_cost_s: float = 1.0
    smaller_variant: str | None = None
    smaller_vram_bytes: int | None = None
    variant_active: bool = False

    @property
    def on_gpu(self) -> bool:
        return self.device is not None and self.device != CPU

    @property
    def resident(self) -> bool:
        return self.state is ModelState.LOADED and self.device is not None

    def allows_cpu(self) -> bool:
        return CPU in self.allowed


# --------------------------------------------------------------------------- device choice


def gpu_candidates(model: ModelView, gpu_indices: Sequence[int]) -> list[int]:
    """GPUs the model may use, in preference order: the pinned one alone, else the ``gpu:N``
    named in ``allowed`` (in their order), else every GPU."""
    if model.pinned is not None:
        index = gpu_index(model.pinned)
        return [index] if index is not None and index in gpu_indices else []
    named = [gpu_index(a) for a in model.allowed if a not in (CPU, ANY_GPU)]
    ordered = [i for i in named if i is not None and i in gpu_indices]
    if "gpu" in model.allowed:
        ordered += [i for i in gpu_indices if i not in ordered]
    return ordered


def pick_gpu(
    model: ModelView, gpu_indices: Sequence[int], free_bytes: Mapping[int, int]
) -> int | None:
    """The allowed GPU where the model fits with the most room left; if it fits nowhere, the
    first allowed one (eviction may make room); None when no GPU is allowed."""
    candidates = gpu_candidates(model, gpu_indices)
    if not candidates:
        return None
    fitting = [i for i in candidates if free_bytes.get(i, 0) >= model.vram_bytes]
    if fitting:
        return max(fitting, key=lambda i: (free_bytes.get(i, 0), -i))
    return candidates[0]


# --------------------------------------------------------------------------- profiles


@dataclass
class _Projection:
    """Free bytes per GPU as the plan goes (steps not yet executed)."""

    free: dict[int, int]

    def release(self, device: str | None, size: int) -> None:
        index = gpu_index(device)
        if index is not None:
            self.free[index] = self.free.get(index, 0) + size

    def take(self, device: str | None, size: int) -> None:
        index = gpu_index(device)
        if index is not None:
            self.free[index] = self.free.get(index, 0) - size


def plan_profile(
    profile: str,
    placements: Mapping[str, Placement],
    models: Mapping[str, ModelView],
    free_bytes: Mapping[int, int],
) -> ProfilePlan:
    """Order the steps that bring ``models`` to ``placements``.

    Phase 1 frees VRAM: unloads, moves to the CPU (a model that cannot move is unloaded and
    loaded on the CPU in phase 2). Phase 2 loads: CPU loads first, then GPU loads and moves by
    priority (highest first). ``gpu_if_free`` is decided on the free VRAM projected after the
    steps before it. Models the profile does not name are left alone. With no GPU, GPU wishes
    fall back to the CPU (CPU-only mode) and say so in ``notes``.
    """
    gpus = sorted(free_bytes)
    proj = _Projection(dict(free_bytes))
    freeing: list[PlanStep] = []
    cpu_loads: list[PlanStep] = []
    gpu_wishes: list[tuple[ModelView, Placement]] = []
    notes: list[str] = []
    for name in sorted(placements):
        model = models.get(name)
        if model is None:
            notes.append(f"{name}: not a managed model; ignored")
            continue
        placement = placements[name]
        kind = placement.kind
        if kind is PlacementKind.UNLOADED:
            if model.state is not ModelState.UNLOADED:
                freeing.append(PlanStep(StepAction.UNLOAD, name, model.device, "profile: unloaded"))
                proj.release(model.device, model.vram_bytes)
        elif kind is PlacementKind.CPU:
            _plan_cpu(model, "profile: cpu", proj, freeing, cpu_loads, notes)
        else:
            gpu_wishes.append((model, placement))
    gpu_steps: list[PlanStep] = []
    gpu_wishes.sort(key=lambda mp: (-mp[0].priority_rank, mp[0].name))
    for model, placement in gpu_wishes:
        _plan_gpu(model, placement, gpus, proj, freeing, cpu_loads, gpu_steps, notes)
    return ProfilePlan(profile, tuple(freeing + cpu_loads + gpu_steps), tuple(notes))


def _plan_cpu(
    model: ModelView,
    reason: str,
    proj: _Projection,
    freeing: list[PlanStep],
    cpu_loads: list[PlanStep],
    notes: list[str],
) -> None:
    if model.resident and model.device == CPU:
        return
    if not model.allows_cpu():
        notes.append(f"{model.name}: cpu is not in allowed_devices; left as it is")
        return
    if model.resident and model.on_gpu:
        proj.release(model.device, model.vram_bytes)
        if model.can_move:
            freeing.append(PlanStep(StepAction.MOVE, model.name, CPU, reason))
            return
        freeing.append(PlanStep(StepAction.UNLOAD, model.name, model.device, reason))
    elif model.state is not ModelState.UNLOADED:  # error, or caught mid-operation
        freeing.append(PlanStep(StepAction.UNLOAD, model.name, model.device, reason))
        proj.release(model.device, model.vram_bytes)
    cpu_loads.append(PlanStep(StepAction.LOAD, model.name, CPU, reason))


def _plan_gpu(
    model: ModelView,
    placement: Placement,
    gpus: Sequence[int],
    proj: _Projection,
    freeing: list[PlanStep],
    cpu_loads: list[PlanStep],
    gpu_steps: list[PlanStep],
    notes: list[str],
) -> None:
    kind = placement.kind
    reason = f"profile: {placement}"
    if not gpus:
        if kind is not PlacementKind.GPU_IF_FREE:
            notes.append(f"{model.name}: no GPU (CPU-only mode); placed on the CPU")
        _plan_cpu(model, reason, proj, freeing, cpu_loads, notes)
        return
    if kind is PlacementKind.DEVICE:
        target: int | None = placement.device_index
        if target not in gpus:
            notes.append(f"{model.name}: {placement} does not exist; left as it is")
            return
    else:
        if model.resident and model.on_gpu:
            return  # already on a GPU: a gpu / gpu_if_free wish is met
        target = pick_gpu(model, gpus, proj.free)
        if target is None:
            notes.append(f"{model.name}: no allowed GPU; left as it is")
            return
        if kind is PlacementKind.GPU_IF_FREE:
            room = proj.free.get(target, 0)
            if room <= placement.min_free_bytes or room < model.vram_bytes:
                _plan_cpu(
                    model, f"{reason} (not enough free VRAM)", proj, freeing, cpu_loads, notes
                )
                return
    device = gpu_device(target) if target is not None else CPU
    if model.resident and model.device == device:
        return
    if model.resident and model.can_move:
        if model.on_gpu:
            proj.release(model.device, model.vram_bytes)
        gpu_steps.append(PlanStep(StepAction.MOVE, model.name, device, reason))
    else:
        if model.state is not ModelState.UNLOADED:
            gpu_steps.append(PlanStep(StepAction.UNLOAD, model.name, model.device, reason))
            proj.release(model.device, model.vram_bytes)
        gpu_steps.append(PlanStep(StepAction.LOAD, model.name, device, reason))
    proj.take(device, model.vram_bytes)


# --------------------------------------------------------------------------- eviction


def eviction_score(model: ModelView) -> float:
    """Lower is evicted first: cheap to reload, low priority, long idle."""
    return model.reload_cost_s * (1 + model.priority_rank) / (1.0 + max(0.0, model.idle_s))


@dataclass(frozen=True, slots=True)
class Evict:
    """Unload ``victims`` (in order) to free ``freed_bytes``; empty when it already fits."""

    victims: tuple[str, ...]
    freed_bytes: int


@dataclass(frozen=True, slots=True)
class NoRoom:
    """It cannot fit, even after evicting every model that may be evicted."""

    needed_bytes: int
    free_bytes: int
    #: Loaded models on the device a person could unload by hand to make room.
    unloadable: tuple[str, ...]
    #: Models in use that would make room once their users finish (the caller may wait).
    busy: tuple[str, ...] = ()
    #: Evicting these is allowed and is part of the plan if the busy ones free up.
    evictable: tuple[str, ...] = ()


def choose_evictions(
    loaded_on_device: Iterable[ModelView],
    *,
    needed_bytes: int,
    free_bytes: int,
    priority_rank: int,
) -> Evict | NoRoom:
    """Pick the fewest cheap victims so that ``free + freed >= needed``.

    Eligible: not in use, not never-evict, priority at most ``priority_rank``. Chosen by
    :func:`eviction_score`, then victims that turn out unnecessary are dropped again.
    """
    if free_bytes >= needed_bytes:
        return Evict((), 0)
    models = [m for m in loaded_on_device if m.vram_bytes > 0]
    eligible = sorted(
        (
            m
            for m in models
            if not m.in_use and not m.never_evict and m.priority_rank <= priority_rank
        ),
        key=lambda m: (eviction_score(m), m.name),
    )
    chosen: list[ModelView] = []
    freed = 0
    for model in eligible:
        if free_bytes + freed >= needed_bytes:
            break
        chosen.append(model)
        freed += model.vram_bytes
    if free_bytes + freed < needed_bytes:
        busy = sorted(
            (
                m
                for m in models
                if m.in_use and not m.never_evict and m.priority_rank <= priority_rank
            ),
            key=lambda m: (eviction_score(m), m.name),
        )
        return NoRoom(
            needed_bytes=needed_bytes,
            free_bytes=free_bytes,
            unloadable=tuple(sorted(m.name for m in models)),
            busy=_enough(busy, needed_bytes - free_bytes - freed),
            evictable=tuple(m.name for m in chosen),
        )
    for model in sorted(chosen, key=lambda m: -eviction_score(m)):  # drop unneeded victims
        if free_bytes + freed - model.vram_bytes >= needed_bytes:
            chosen.remove(model)
            freed -= model.vram_bytes
    return Evict(tuple(m.name for m in chosen), freed)


def _enough(models: Sequence[ModelView], missing: int) -> tuple[str, ...]:
    """The first of ``models`` that together cover ``missing`` bytes, or () if they cannot."""
    names: list[str] = []
    total = 0
    for model in models:
        if total >= missing:
            break
        names.append(model.name)
        total += model.vram_bytes
    return tuple(names) if total >= missing else ()


# --------------------------------------------------------------------------- load queue


@dataclass(frozen=True, slots=True)
class Waiting:
    """A request waiting for ``model`` since ``since`` (monotonic seconds)."""

    model: str
    since: float


def next_group(waiting: Sequence[Waiting], now: float, max_wait_s: float) -> str | None:
    """The model a device's queue loads next.

    Any request that waited ``max_wait_s`` or more: the model of the oldest such request.
    Otherwise the model with the most requests waiting (one load serves them all), ties going
    to the one waiting longest. None when nothing waits.
    """
    if not waiting:
        return None
    oldest = min(waiting, key=lambda w: w.since)
    if now - oldest.since >= max_wait_s:
        return oldest.model
    counts: dict[str, int] = {}
    first: dict[str, float] = {}
    for item in waiting:
        counts[item.model] = counts.get(item.model, 0) + 1
        first[item.model] = min(first.get(item.model, item.since), item.since)
    return min(counts, key=lambda m: (-counts[m], first[m], m))


# --------------------------------------------------------------------------- optimize


class OptimizeKind(StrEnum):
    """What ``optimize()`` does to one model."""

    #: Unload a model idle for longer than ``optimize_idle_s``.
    UNLOAD_IDLE = "unload_idle"
    #: Unload the least recently used model of a GPU under pressure.
    UNLOAD_LRU = "unload_lru"
    #: Replace a model by its configured smaller variant (re-quantization).
    SMALLER_VARIANT = "smaller_variant"


@dataclass(frozen=True, slots=True)
class OptimizeAction:
    kind: OptimizeKind
    model: str
    freed_bytes: int


@dataclass(frozen=True, slots=True)
class GpuUsage:
    used_bytes: int
    total_bytes: int


def plan_optimize(
    models: Sequence[ModelView],
    gpus: Mapping[int, GpuUsage],
    *,
    idle_after_s: float,
    pressure_ratio: float,
) -> list[OptimizeAction]:
    """Idle models go first; then, on each GPU still above ``pressure_ratio``, smaller
    variants replace big models and the least recently used are unloaded until it is not."""
    actions: list[OptimizeAction] = []
    done: set[str] = set()
    used = {i: g.used_bytes for i, g in gpus.items()}
    movable = [m for m in models if m.resident and not m.in_use and not m.never_evict]
    for model in sorted(movable, key=lambda m: (-m.idle_s, m.name)):
        if model.idle_s >= idle_after_s:
            actions.append(OptimizeAction(OptimizeKind.UNLOAD_IDLE, model.name, model.vram_bytes))
            done.add(model.name)
            _free(used, model)
    for index, usage in sorted(gpus.items()):
        if usage.total_bytes <= 0:
            continue
        here = [m for m in movable if m.name not in done and gpu_index(m.device) == index]
        here.sort(key=lambda m: (-m.idle_s, m.name))  # least recently used first
        for model in _variant_first(here):
            if used[index] / usage.total_bytes <= pressure_ratio:
                break
            saving = _variant_saving(model)
            if saving > 0:
                actions.append(OptimizeAction(OptimizeKind.SMALLER_VARIANT, model.name, saving))
                used[index] -= saving
            else:
                actions.append(
                    OptimizeAction(OptimizeKind.UNLOAD_LRU, model.name, model.vram_bytes)
                )
                used[index] -= model.vram_bytes
            done.add(model.name)
    return actions


def _variant_first(models: list[ModelView]) -> list[ModelView]:
    return [m for m in models if _variant_saving(m) > 0] + [
        m for m in models if _variant_saving(m) <= 0
    ]


def _variant_saving(model: ModelView) -> int:
    if model.smaller_variant is None or model.variant_active:
        return 0
    if model.smaller_vram_bytes is None:
        return max(1, model.vram_bytes // 2)  # unknown until measured: assume it helps
    return max(0, model.vram_bytes - model.smaller_vram_bytes)


def _free(used: dict[int, int], model: ModelView) -> None:
    index = gpu_index(model.device)
    if index is not None and index in used:
        used[index] -= model.vram_bytes


# --------------------------------------------------------------------------- reload cost


@dataclass
class LoadBandwidth:
    """Load bandwidth (bytes/s) learned from past loads, per backend: a moving average.

    ``cost_s(backend, size)`` is the eviction policy's reload cost. Before any measurement the
    ``default_bytes_per_s`` is assumed.
    """

    default_bytes_per_s: float
    measured: dict[str, float] = field(default_factory=dict)

    def observe(self, backend: str, size_bytes: int, seconds: float) -> None:
        if size_bytes <= 0 or seconds <= 0:
            return
        rate = size_bytes / seconds
        old = self.measured.get(backend)
        self.measured[backend] = (
            rate if old is None else (1 - BANDWIDTH_ALPHA) * old + BANDWIDTH_ALPHA * rate
        )

    def bytes_per_s(self, backend: str) -> float:
        return self.measured.get(backend, self.default_bytes_per_s)

    def cost_s(self, backend: str, size_bytes: int) -> float:
        return max(size_bytes, 1) / max(self.bytes_per_s(backend), 1.0)
