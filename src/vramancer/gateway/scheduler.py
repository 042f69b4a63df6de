"""The gateway's pure decision: which waiting requests go now, which model loads next, which
model makes room for it. No I/O, no clock (``now`` is given), no locks.

Rules of :func:`plan`:

* A request for a resident model is admitted at once, up to the model's ``max_concurrent``
  requests in flight (the others wait in its queue, oldest first).
* A model that is not resident is loaded when its GPU can take it: at once if there is room,
  else by evicting idle resident models (no request in flight, none waiting), chosen by the
  model manager's rule (``models.policy.choose_evictions``: cheap to reload, low priority
  first). While a resident model still has requests, the others wait: a group of requests
  for the resident model is served before a swap.
* No starvation: once a request has waited ``max_wait_s``, its model goes first; resident
  models it needs evicted stop taking requests that arrived after it (``draining``) and,
  once the older ones are served and none is in flight, are evicted. A model with requests
  in flight is never evicted. So the oldest request always makes progress, and a model just
  loaded serves the requests that waited for it before anything newer evicts it.
* One load per GPU at a time; loads onto the CPU do not wait for a GPU.
* Among models waiting for a GPU: overdue first (oldest first), then the one with the most
  requests waiting (one load serves them all), then the one waiting longest.
* A model that cannot fit on its GPU even with every evictable model gone is ``unfit``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vramancer.models.policy import Evict, ModelView, NoRoom, choose_evictions
from vramancer.models.types import CPU, ModelState


@dataclass(frozen=True, slots=True)
class Pending:
    """A request waiting for ``model`` since ``since`` (monotonic seconds)."""

    id: int
    model: str
    since: float


@dataclass(frozen=True, slots=True)
class ModelSlot:
    """What the plan knows of one managed model."""

    name: str
    #: Where it is (resident) or would be loaded: ``gpu:N`` or ``cpu``; None: nowhere allowed.
    target: str | None
    #: Loaded and usable now.
    resident: bool = False
    #: Being loaded, unloaded or evicted right now (neither admitted nor loaded).
    busy: bool = False
    vram_bytes: int = 0
    #: Requests being served by it now (gateway requests and any other user).
    in_flight: int = 0
    max_concurrent: int = 4
    reload_cost_s: float = 1.0
    priority_rank: int = 1
    never_evict: bool = False


@dataclass(frozen=True, slots=True)
class GpuSlot:
    """One GPU: its free bytes with every resident (or loading) model accounted."""

    device: str
    free_bytes: int
    #: A load onto it is under way.
    loading: bool = False


@dataclass(frozen=True, slots=True)
class Load:
    """Evict ``evict`` (in order), then load ``model`` on ``device``."""

    model: str
    device: str
    evict: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Unfit:
    """``model`` cannot fit on ``device`` whatever is evicted."""

    model: str
    device: str | None
    needed_bytes: int
    free_bytes: int
    #: Resident models of that GPU a person could unload by hand.
    unloadable: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class GatewayPlan:
    #: Request ids that go now (their model is resident and has room for them).
    admit: tuple[int, ...] = ()
    loads: tuple[Load, ...] = ()
    #: Resident models that take no new request until a waiting model has replaced them.
    draining: tuple[str, ...] = ()
    unfit: tuple[Unfit, ...] = ()


def _groups(pending: Sequence[Pending]) -> dict[str, list[Pending]]:
    groups: dict[str, list[Pending]] = {}
    for item in sorted(pending, key=lambda p: (p.since, p.id)):
        groups.setdefault(item.model, []).append(item)
    return groups


def _view(slot: ModelSlot, in_use: bool) -> ModelView:
    return ModelView(
        name=slot.name,
        backend="gateway",
        state=ModelState.LOADED,
        device=slot.target,
        vram_bytes=slot.vram_bytes,
        priority_rank=slot.priority_rank,
        in_use=in_use,
        never_evict=slot.never_evict,
        reload_cost_s=slot.reload_cost_s,
    )


def load_order(groups: Mapping[str, Sequence[Pending]], now: float, max_wait_s: float) -> list[str]:
    """Models waiting to load, in the order they get a GPU (see the module docstring)."""

    def key(name: str) -> tuple[int, float, int, str]:
        oldest = groups[name][0].since
        if now - oldest >= max_wait_s:
            return (0, oldest, 0, name)
        return (1, 0.0, -len(groups[name]), f"{oldest:020.6f}{name}")

    return sorted(groups, key=key)


def plan(
    pending: Sequence[Pending],
    models: Mapping[str, ModelSlot],
    gpus: Mapping[str, GpuSlot],
    now: float,
    max_wait_s: float,
) -> GatewayPlan:
    """The next steps (see the module docstring). Requests for unknown models are ignored."""
    groups = {m: g for m, g in _groups(pending).items() if m in models}
    loads: list[Load] = []
    unfit: list[Unfit] = []
    draining: dict[str, float] = {}  # model -> requests arrived from then on wait
    taken = {device for device, gpu in gpus.items() if gpu.loading}
    waiting = {m: g for m, g in groups.items() if not models[m].resident and not models[m].busy}
    for name in load_order(waiting, now, max_wait_s):
        slot = models[name]
        device = slot.target
        if device is None:
            unfit.append(Unfit(name, None, slot.vram_bytes, 0))
            continue
        if device == CPU or device not in gpus:
            loads.append(Load(name, device))
            continue
        if device in taken:
            continue
        oldest = waiting[name][0].since
        cutoff = oldest if now - oldest >= max_wait_s else None
        step = _place(slot, models, gpus[device], groups, cutoff)
        if isinstance(step, Unfit):
            unfit.append(step)
        elif isinstance(step, Load):
            loads.append(step)
            taken.add(device)
        elif step is not None and cutoff is not None:
            for held in step:
                draining[held] = min(draining.get(held, cutoff), cutoff)
            taken.add(device)  # nobody jumps ahead of an overdue model on its GPU
    for load in loads:
        draining.update(dict.fromkeys(load.evict, float("-inf")))
    admit = _admit(groups, models, draining)
    drained = tuple(sorted(n for n, t in draining.items() if t != float("-inf")))
    return GatewayPlan(tuple(admit), tuple(loads), drained, tuple(unfit))


def _place(
    slot: ModelSlot,
    models: Mapping[str, ModelSlot],
    gpu: GpuSlot,
    groups: Mapping[str, Sequence[Pending]],
    cutoff: float | None,
) -> Load | Unfit | tuple[str, ...] | None:
    """A load of ``slot`` on ``gpu``; an ``Unfit``; the resident models to drain first (it is
    overdue: ``cutoff`` is when its oldest request arrived); or None (it waits for the
    resident models' requests)."""
    residents = [
        m
        for m in models.values()
        if m.name != slot.name and m.target == gpu.device and (m.resident or m.busy)
    ]
    ever = choose_evictions(
        [_view(m, m.busy) for m in residents],
        needed_bytes=slot.vram_bytes,
        free_bytes=gpu.free_bytes,
        priority_rank=slot.priority_rank,
    )
    if isinstance(ever, NoRoom) and not ever.busy:
        unloadable = tuple(sorted(m.name for m in residents if not m.never_evict))
        return Unfit(slot.name, gpu.device, slot.vram_bytes, gpu.free_bytes, unloadable)

    def held(m: ModelSlot) -> bool:
        """Busy, serving, or with requests that come first (all of them when ``slot`` is not
        overdue, those older than its oldest when it is)."""
        older = m.name in groups and (cutoff is None or groups[m.name][0].since < cutoff)
        return m.busy or m.in_flight > 0 or older

    decision = choose_evictions(
        [_view(m, held(m)) for m in residents],
        needed_bytes=slot.vram_bytes,
        free_bytes=gpu.free_bytes,
        priority_rank=slot.priority_rank,
    )
    if isinstance(decision, Evict):
        return Load(slot.name, gpu.device, decision.victims)
    if cutoff is None:
        return None
    return decision.busy or tuple(m.name for m in residents if held(m) and not m.busy)


def _admit(
    groups: Mapping[str, Sequence[Pending]],
    models: Mapping[str, ModelSlot],
    draining: Mapping[str, float],
) -> list[int]:
    """Requests of resident models, oldest first, up to their concurrency; a draining model
    takes only those that arrived before its cutoff (none when it is being evicted)."""
    admit: list[int] = []
    for name, group in groups.items():
        slot = models[name]
        if not slot.resident or slot.busy:
            continue
        cutoff = draining.get(name)
        allowed = [p for p in group if cutoff is None or p.since < cutoff]
        room = max(0, slot.max_concurrent - slot.in_flight)
        admit.extend(p.id for p in allowed[:room])
    return sorted(admit)
