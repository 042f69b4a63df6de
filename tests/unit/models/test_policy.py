"""The pure decisions of the model manager: profile plans, evictions, queue order, optimize."""

from __future__ import annotations

import pytest

from vramancer.errors import InvalidInput
from vramancer.models import policy
from vramancer.models.policy import Evict, GpuUsage, ModelView, NoRoom, OptimizeKind, Waiting
from vramancer.models.types import (
    ModelState,
    Placement,
    PlacementKind,
    normalize_device,
)
from vramancer.units import GIB, MIB

L, U = ModelState.LOADED, ModelState.UNLOADED


def view(name: str, state: ModelState = U, device: str | None = None, **kw: object) -> ModelView:
    return ModelView(
        name=name,
        backend=str(kw.pop("backend", "torch")),
        state=state,
        device=device,
        vram_bytes=int(kw.pop("vram", GIB)),
        **kw,
    )  # type: ignore[arg-type]


def steps(plan: policy.ProfilePlan) -> list[tuple[str, str, str | None]]:
    return [(s.action.value, s.model, s.device) for s in plan.steps]


# --------------------------------------------------------------------------- placements


def test_placement_parse_every_form() -> None:
    assert Placement.parse("gpu") == Placement(PlacementKind.GPU)
    assert Placement.parse(" CPU ") == Placement(PlacementKind.CPU)
    assert Placement.parse("unloaded") == Placement(PlacementKind.UNLOADED)
    assert Placement.parse("gpu:1") == Placement(PlacementKind.DEVICE, device_index=1)
    assert Placement.parse("gpu_if_free:1GiB") == Placement(PlacementKind.GPU_IF_FREE, GIB)
    with pytest.raises(InvalidInput, match="placement"):
        Placement.parse("gpu_if_free:lots")
    with pytest.raises(InvalidInput, match="placement must be"):
        Placement.parse("tpu")


def test_placements_print_as_they_are_written_and_parse_back() -> None:
    for text in ("gpu", "cpu", "unloaded", "gpu:1", "gpu_if_free:1GiB", "gpu_if_free:1536MiB"):
        assert str(Placement.parse(text)) == text
    odd = Placement(PlacementKind.GPU_IF_FREE, 1000)
    assert str(odd) == "gpu_if_free:1000" and Placement.parse(str(odd)) == odd


def test_normalize_device_forms_and_errors() -> None:
    assert normalize_device("CPU", [0]) == "cpu"
    assert normalize_device("cuda", [0, 1]) == "gpu"
    assert normalize_device("gpu:1", [0, 1]) == "gpu:1"
    with pytest.raises(InvalidInput, match="does not exist; GPUs: gpu:0"):
        normalize_device("gpu:3", [0])
    with pytest.raises(InvalidInput, match="CPU-only"):
        normalize_device("gpu:0", [])
    with pytest.raises(InvalidInput, match="device must be"):
        normalize_device("mps", [0])


# --------------------------------------------------------------------------- profile plans


VLM = view("vlm", backend="ollama", vram=10 * GIB, priority_rank=3, allowed=("gpu",))
CLIP = view("clip", vram=512 * MIB, can_move=True)


def test_recording_moves_clip_off_the_gpu_before_loading_the_vlm() -> None:
    clip_on_gpu = view("clip", L, "gpu:0", vram=512 * MIB, can_move=True)
    plan = policy.plan_profile(
        "recording",
        {"vlm": Placement.parse("gpu"), "clip": Placement.parse("cpu")},
        {"vlm": VLM, "clip": clip_on_gpu},
        {0: 11 * GIB},
    )
    assert steps(plan) == [("move", "clip", "cpu"), ("load", "vlm", "gpu:0")]


def test_autopilot_unloads_the_vlm_then_puts_clip_on_the_gpu_when_enough_is_freed() -> None:
    vlm_on = view("vlm", L, "gpu:0", backend="ollama", vram=10 * GIB, priority_rank=3)
    clip_cpu = view("clip", L, "cpu", vram=512 * MIB, can_move=True)
    placements = {"vlm": Placement.parse("unloaded"), "clip": Placement.parse("gpu_if_free:1GiB")}
    # 1 GiB free before; 11 GiB after the VLM is gone: CLIP goes to the GPU.
    plan = policy.plan_profile("autopilot", placements, {"vlm": vlm_on, "clip": clip_cpu}, {0: GIB})
    assert steps(plan) == [("unload", "vlm", "gpu:0"), ("move", "clip", "gpu:0")]
    # Without the VLM to unload, 1 GiB free is not "more than 1 GiB": CLIP stays on the CPU.
    plan = policy.plan_profile("autopilot", placements, {"vlm": VLM, "clip": clip_cpu}, {0: GIB})
    assert steps(plan) == []
    # Unloaded CLIP and no room: it is loaded on the CPU.
    plan = policy.plan_profile("autopilot", placements, {"vlm": VLM, "clip": CLIP}, {0: GIB})
    assert steps(plan) == [("load", "clip", "cpu")]


def test_every_freeing_step_comes_before_every_loading_step() -> None:
    models = {
        "a": view("a", L, "gpu:0", vram=4 * GIB),
        "b": view("b", L, "gpu:0", vram=4 * GIB, backend="ollama"),
        "c": view("c", vram=6 * GIB, priority_rank=2),
        "d": view("d", vram=GIB, priority_rank=0),
        "e": view("e", L, "cpu", can_move=True, vram=GIB),
    }
    placements = {
        "a": Placement.parse("unloaded"),
        "b": Placement.parse("cpu"),
        "c": Placement.parse("gpu"),
        "d": Placement.parse("gpu"),
        "e": Placement.parse("gpu:0"),
    }
    plan = policy.plan_profile("p", placements, models, {0: 0})
    assert steps(plan) == [
        ("unload", "a", "gpu:0"),
        ("unload", "b", "gpu:0"),
        ("load", "b", "cpu"),
        ("load", "c", "gpu:0"),  # higher priority first
        ("move", "e", "gpu:0"),
        ("load", "d", "gpu:0"),
    ]


def test_cpu_only_machine_puts_gpu_wishes_on_the_cpu_and_says_so() -> None:
    plan = policy.plan_profile("recording", {"clip": Placement.parse("gpu")}, {"clip": CLIP}, {})
    assert steps(plan) == [("load", "clip", "cpu")]
    assert plan.notes == ("clip: no GPU (CPU-only mode); placed on the CPU",)


def test_plan_leaves_unnamed_models_alone_and_notes_unknown_ones() -> None:
    plan = policy.plan_profile(
        "p", {"ghost": Placement.parse("gpu")}, {"clip": view("clip", L, "gpu:0")}, {0: 0}
    )
    assert plan.steps == ()
    assert plan.notes == ("ghost: not a managed model; ignored",)


def test_cpu_placement_for_a_gpu_only_model_is_a_note_not_a_step() -> None:
    plan = policy.plan_profile("p", {"vlm": Placement.parse("cpu")}, {"vlm": VLM}, {0: 0})
    assert plan.steps == ()
    assert "cpu is not in allowed_devices" in plan.notes[0]


def test_pinned_model_goes_to_its_gpu() -> None:
    pinned = view("m", pinned="gpu:1", vram=GIB)
    plan = policy.plan_profile(
        "p", {"m": Placement.parse("gpu")}, {"m": pinned}, {0: 20 * GIB, 1: 0}
    )
    assert steps(plan) == [("load", "m", "gpu:1")]


def test_pick_gpu_prefers_the_one_with_room() -> None:
    m = view("m", vram=4 * GIB)
    assert policy.pick_gpu(m, [0, 1], {0: 2 * GIB, 1: 8 * GIB}) == 1
    assert policy.pick_gpu(m, [0, 1], {0: 2 * GIB, 1: 3 * GIB}) == 0  # fits nowhere: first
    only_1 = view("m", allowed=("gpu:1", "cpu"))
    assert policy.gpu_candidates(only_1, [0, 1]) == [1]
    assert policy.pick_gpu(view("m", allowed=("cpu",)), [0], {0: GIB}) is None


# --------------------------------------------------------------------------- eviction


def test_eviction_prefers_idle_then_low_priority_then_cheap() -> None:
    models = [
        view("busy-recent", L, "gpu:0", vram=2 * GIB, idle_s=1, reload_cost_s=1),
        view("idle", L, "gpu:0", vram=2 * GIB, idle_s=600, reload_cost_s=1),
        view("low-prio", L, "gpu:0", vram=2 * GIB, idle_s=1, priority_rank=0, reload_cost_s=1),
        view("expensive", L, "gpu:0", vram=2 * GIB, idle_s=1, reload_cost_s=50),
    ]
    first = policy.choose_evictions(models, needed_bytes=2 * GIB, free_bytes=0, priority_rank=2)
    assert first == Evict(("idle",), 2 * GIB)
    two = policy.choose_evictions(models, needed_bytes=4 * GIB, free_bytes=0, priority_rank=2)
    assert two == Evict(("idle", "low-prio"), 4 * GIB)
    everything = policy.choose_evictions(
        models, needed_bytes=8 * GIB, free_bytes=0, priority_rank=2
    )
    assert isinstance(everything, Evict)
    assert everything.victims[-1] == "expensive"


def test_eviction_never_takes_in_use_never_evict_or_higher_priority() -> None:
    models = [
        view("used", L, "gpu:0", vram=4 * GIB, in_use=True),
        view("sacred", L, "gpu:0", vram=4 * GIB, never_evict=True),
        view("boss", L, "gpu:0", vram=4 * GIB, priority_rank=3),
        view("small", L, "gpu:0", vram=GIB),
    ]
    decision = policy.choose_evictions(
        models, needed_bytes=3 * GIB, free_bytes=GIB, priority_rank=1
    )
    assert isinstance(decision, NoRoom)
    assert decision.needed_bytes == 3 * GIB
    assert decision.free_bytes == GIB
    assert decision.unloadable == ("boss", "sacred", "small", "used")
    assert decision.busy == ("used",)  # waiting for its user would make room
    assert decision.evictable == ("small",)


def test_eviction_is_empty_when_it_already_fits_and_drops_unneeded_victims() -> None:
    models = [view("a", L, "gpu:0", vram=GIB, idle_s=100), view("b", L, "gpu:0", vram=8 * GIB)]
    assert policy.choose_evictions(
        models, needed_bytes=GIB, free_bytes=GIB, priority_rank=1
    ) == Evict((), 0)
    # "a" scores first but is too small; once "b" is taken "a" is not needed any more.
    decision = policy.choose_evictions(models, needed_bytes=6 * GIB, free_bytes=0, priority_rank=1)
    assert decision == Evict(("b",), 8 * GIB)


# --------------------------------------------------------------------------- queue


def test_next_group_serves_the_biggest_group_then_the_oldest() -> None:
    waiting = [Waiting("a", 10.0), Waiting("b", 11.0), Waiting("b", 12.0), Waiting("c", 9.0)]
    assert policy.next_group(waiting, now=13.0, max_wait_s=30) == "b"
    tie = [Waiting("a", 10.0), Waiting("b", 9.0)]
    assert policy.next_group(tie, now=13.0, max_wait_s=30) == "b"
    assert policy.next_group([], now=0.0, max_wait_s=30) is None


def test_next_group_never_starves_a_request_past_the_maximum_wait() -> None:
    waiting = [Waiting("lonely", 0.0)] + [Waiting("popular", 20.0 + i) for i in range(5)]
    assert policy.next_group(waiting, now=29.9, max_wait_s=30) == "popular"
    assert policy.next_group(waiting, now=30.0, max_wait_s=30) == "lonely"


# --------------------------------------------------------------------------- optimize, bandwidth


def test_optimize_unloads_idle_then_relieves_pressure_with_variants_then_lru() -> None:
    models = [
        view("idle", L, "gpu:0", vram=2 * GIB, idle_s=120),
        view(
            "big",
            L,
            "gpu:0",
            vram=10 * GIB,
            idle_s=5,
            smaller_variant="big:q4",
            smaller_vram_bytes=5 * GIB,
        ),
        view("old", L, "gpu:0", vram=4 * GIB, idle_s=30),
        view("new", L, "gpu:0", vram=4 * GIB, idle_s=1),
        view("used", L, "gpu:0", vram=GIB, idle_s=500, in_use=True),
        view("cpu", L, "cpu", vram=0, idle_s=90),
    ]
    gpus = {0: GpuUsage(used_bytes=21 * GIB, total_bytes=24 * GIB)}
    actions = policy.plan_optimize(models, gpus, idle_after_s=60, pressure_ratio=0.5)
    assert [(a.kind, a.model) for a in actions] == [
        (OptimizeKind.UNLOAD_IDLE, "idle"),
        (OptimizeKind.UNLOAD_IDLE, "cpu"),
        (OptimizeKind.SMALLER_VARIANT, "big"),  # 19 -> 14 GiB of 24: still above 0.5
        (OptimizeKind.UNLOAD_LRU, "old"),  # 14 -> 10 GiB: 0.42, done
    ]
    calm = {0: GpuUsage(used_bytes=GIB, total_bytes=24 * GIB)}
    assert [
        a.model for a in policy.plan_optimize(models, calm, idle_after_s=60, pressure_ratio=0.5)
    ] == ["idle", "cpu"]


def test_load_bandwidth_learns_a_moving_average() -> None:
    bw = policy.LoadBandwidth(default_bytes_per_s=1e9)
    assert bw.cost_s("torch", 2_000_000_000) == pytest.approx(2.0)
    bw.observe("torch", 1_000_000, 0.01)  # 100 MB/s
    assert bw.bytes_per_s("torch") == pytest.approx(1e8)
    bw.observe("torch", 1_000_000, 0.005)  # 200 MB/s
    assert bw.bytes_per_s("torch") == pytest.approx(0.7 * 1e8 + 0.3 * 2e8)
    bw.observe("torch", 0, 1.0)  # ignored
    assert bw.bytes_per_s("ollama") == 1e9
