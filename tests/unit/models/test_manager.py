"""The model manager over the real device manager (simulated GPUs), the real arbiter, the fake
Ollama server and small torch models, on a manual clock."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.ollama import FakeOllama
from tests.promtext import metric_value
from tests.unit.models import tiny
from tests.unit.models.conftest import CLIP, TINY, VLM, VLM_SIZE, harness, seed_settings
from vramancer.arbiter.types import AllocationRequest, Priority, WorkloadType
from vramancer.devices.ids import DeviceId
from vramancer.errors import (
    BackendUnavailable,
    InsufficientMemory,
    InvalidInput,
    NotFound,
    OperationTimeout,
)
from vramancer.models.errors import BackendError, ModelNotInBackend
from vramancer.models.types import ModelState
from vramancer.resources.actions import ModelActionKind
from vramancer.units import GIB, MIB

CLIP_BYTES = 500 * MIB


def ollama(name: str, vram: int | str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "backend": "ollama", "vram": vram, **kw}


def torch_model(name: str, factory: str = TINY, **kw: Any) -> dict[str, Any]:
    return {"name": name, "backend": "torch", "factory": factory, **kw}


def sample(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {name}{labels}")


def owners(h: Any) -> dict[str, int]:
    return {a.owner: a.memory_bytes for a in h.arbiter.state().allocations}


async def test_load_and_unload_on_a_simulated_gpu_show_in_telemetry_and_arbiter(
    fake_ollama: FakeOllama,
) -> None:
    async with harness(seed_settings(fake_ollama.url)) as h:
        m = h.models
        status = await m.ensure_loaded(VLM)
        assert (status.state, status.device, status.runs_on, status.simulated) == (
            ModelState.LOADED,
            "gpu:0",
            "cpu",
            True,
        )
        assert status.used_vram_bytes == VLM_SIZE
        assert h.gpu_used() == VLM_SIZE
        assert owners(h) == {f"model:{VLM}": VLM_SIZE}
        assert m.is_loaded(VLM) and m.device(VLM) == "gpu:0"
        loaded = h.of("model_loaded")[0].data
        assert loaded["model"] == VLM and loaded["device"] == "gpu:0" and loaded["simulated"]
        status = await m.ensure_unloaded(VLM)
        assert status.state is ModelState.UNLOADED and status.device is None
        assert h.gpu_used() == 0
        assert owners(h) == {}
        unloaded = h.of("model_unloaded")[0].data
        assert unloaded["freed_bytes"] == VLM_SIZE and unloaded["reason"] == "request"
        assert fake_ollama.loaded == {}
        assert m.device(VLM) == "cpu"


async def test_use_loads_on_demand_and_holds_against_the_idle_reaper(
    fake_ollama: FakeOllama,
) -> None:
    settings = seed_settings(fake_ollama.url, models=[ollama(VLM, VLM_SIZE, idle_timeout_s=60)])
    async with harness(settings) as h:
        m = h.models
        async with m.use(VLM) as handle:
            assert handle.device == "gpu:0" and handle.endpoint == fake_ollama.url
            assert (handle.backend_model, handle.obj) == (VLM, None)
            assert m.status(VLM).in_use == 1
            h.clock.advance(1000)
            assert await m.reap_once() == []
            assert m.is_loaded(VLM)
        assert m.status(VLM).in_use == 0
        assert m.status(VLM).last_used == h.clock.time()
        h.clock.advance(59.9)
        assert await m.reap_once() == []
        h.clock.advance(0.1)
        assert await m.reap_once() == [VLM]
        assert m.state(VLM) is ModelState.UNLOADED
        event = h.of("idle_unload")[0].data
        assert event["model"] == VLM and event["idle_timeout_s"] == 60
        assert h.of("model_unloaded")[0].data["reason"] == "idle"


async def test_touch_resets_the_idle_timer_and_never_evict_is_not_reaped(
    fake_ollama: FakeOllama,
) -> None:
    settings = seed_settings(
        fake_ollama.url,
        models=[
            ollama(VLM, 4 * GIB, idle_timeout_s=10),
            ollama("small:1b", GIB, idle_timeout_s=10, never_evict=True),
        ],
    )
    async with harness(settings) as h:
        m = h.models
        await m.ensure_loaded(VLM)
        await m.ensure_loaded("small:1b")
        h.clock.advance(8)
        m.touch(VLM)
        h.clock.advance(8)
        assert await m.reap_once() == []
        h.clock.advance(2)
        assert await m.reap_once() == [VLM]
        h.clock.advance(1000)
        assert await m.reap_once() == []
        assert m.is_loaded("small:1b")


async def test_torch_model_moves_between_cpu_and_a_simulated_gpu(fake_ollama: FakeOllama) -> None:
    async with harness(seed_settings(fake_ollama.url)) as h:
        m = h.models
        await m.ensure_loaded(CLIP, "cpu")
        x = torch.ones(1, 16)
        before = m.handle(CLIP)(x).detach()
        status = await m.migrate(CLIP, "gpu:0")
        assert (status.device, status.runs_on, status.simulated) == ("gpu:0", "cpu", True)
        assert h.gpu_used() == CLIP_BYTES
        assert owners(h) == {f"model:{CLIP}": CLIP_BYTES}
        assert torch.equal(m.handle(CLIP)(x).detach(), before)
        status = await m.migrate(CLIP, "cpu")
        assert status.device == "cpu" and h.gpu_used() == 0 and owners(h) == {}
        assert h.of("model_migrated")[-1].data["from"] == "gpu:0"
        kinds = [e.data["event_type"] for e in h.of("resource_changed")]
        assert kinds == ["model_loaded", "device_changed", "device_changed"]
        with pytest.raises(InvalidInput, match="does not exist"):
            await m.migrate(CLIP, "gpu:7")
        with pytest.raises(InvalidInput, match="device must be"):
            await m.migrate(CLIP, "tpu")
        with pytest.raises(NotFound, match="no managed model 'nope'"):
            await m.migrate("nope", "cpu")


async def test_pipeline_objects_are_moved_and_reinitialised(fake_ollama: FakeOllama) -> None:
    settings = seed_settings(
        fake_ollama.url,
        models=[
            torch_model("pipe", "tests.unit.models.tiny:pipeline", vram="100MiB"),
            torch_model("dev", "tests.unit.models.tiny:with_device"),
        ],
    )
    async with harness(settings) as h:
        m = h.models
        await m.ensure_loaded("pipe", "cpu")
        pipe = m.handle("pipe")
        assert isinstance(pipe, tiny.Pipeline) and pipe.reinitialized == 1
        await m.migrate("pipe", "gpu:0")
        await m.migrate("pipe", "cpu")
        assert pipe.reinitialized == 3
        assert str(pipe.device) == "cpu"
        status = await m.ensure_loaded("dev")
        assert status.device == "gpu:0" and status.runs_on == "cpu"
        assert status.used_vram_bytes == 2 * 2 * 4 + 2 * 4  # measured: no vram configured


async def test_ollama_load_timeout_retries_then_error_with_an_event(
    fake_ollama: FakeOllama,
) -> None:
    settings = seed_settings(
        fake_ollama.url, gpu_manager={"load_timeout_s": 0.15, "max_load_retries": 2}
    )
    fake_ollama.load_delay_s = 0.6
    async with harness(settings) as h:
        m = h.models
        with pytest.raises(OperationTimeout, match=r"timed out after 0.15 s \(3 attempts\)"):
            await m.ensure_loaded(VLM)
        assert m.state(VLM) is ModelState.ERROR
        assert "timed out" in (m.status(VLM).error or "")
        assert fake_ollama.loads_of(VLM) == 3
        error = h.of("model_error")[0].data
        assert error["model"] == VLM and error["operation"] == "load" and error["code"] == "timeout"
        assert h.gpu_used() == 0 and owners(h) == {}
        await asyncio.sleep(0.7)  # the fake finishes its slow loads
        fake_ollama.load_delay_s = 0.0
        status = await m.ensure_loaded(VLM)  # ERROR -> LOADED on the next request
        assert status.state is ModelState.LOADED and status.error is None


async def test_http_500_is_retried_and_a_missing_model_is_not(fake_ollama: FakeOllama) -> None:
    settings = seed_settings(
        fake_ollama.url, models=[ollama(VLM, VLM_SIZE), ollama("ghost:7b", GIB)]
    )
    async with harness(settings) as h:
        fake_ollama.fail_next_loads = 1
        await h.models.ensure_loaded(VLM)
        assert fake_ollama.loads_of(VLM) == 2
        with pytest.raises(ModelNotInBackend, match="try pulling it first"):
            await h.models.ensure_loaded("ghost:7b")
        assert fake_ollama.loads_of("ghost:7b") == 1
        assert h.models.state("ghost:7b") is ModelState.ERROR


async def test_torch_factory_timeout_and_failure(fake_ollama: FakeOllama) -> None:
    settings = seed_settings(
        fake_ollama.url,
        models=[
            torch_model(
                "slow", "tests.unit.models.tiny:slow", load_timeout_s=0.2, max_load_retries=0
            ),
            torch_model("broken", "tests.unit.models.tiny:broken", max_load_retries=1),
            torch_model("odd", "tests.unit.models.tiny:not_a_model", max_load_retries=0),
            torch_model("missing", "tests.unit.models.nowhere:f", max_load_retries=0),
        ],
    )
    async with harness(settings) as h:
        m = h.models
        with pytest.raises(OperationTimeout):
            await m.ensure_loaded("slow", "cpu")
        builds = tiny.BUILDS.get("broken", 0)
        with pytest.raises(BackendError, match="RuntimeError: weights are corrupt"):
            await m.ensure_loaded("broken", "cpu")
        assert tiny.BUILDS["broken"] == builds + 2
        with pytest.raises(BackendError, match=r"neither \.to"):
            await m.ensure_loaded("odd", "cpu")
        with pytest.raises(BackendError, match="cannot import"):
            await m.ensure_loaded("missing", "cpu")
        assert {s.name: s.state for s in m.list_models()} == {
            "slow": ModelState.ERROR,
            "broken": ModelState.ERROR,
            "odd": ModelState.ERROR,
            "missing": ModelState.ERROR,
        }


async def test_ollama_down_at_start_degrades_and_other_models_keep_working(
    fake_ollama: FakeOllama,
) -> None:
    fake_ollama.go_down()
    async with harness(seed_settings(fake_ollama.url)) as h:
        m = h.models
        status = m.gpu_status()
        assert status.degraded_mode is True
        assert status.degraded_reason is not None and "unreachable" in status.degraded_reason
        assert h.of("degraded_mode")[0].data["degraded"] is True
        with pytest.raises(BackendUnavailable):
            await m.ensure_loaded(VLM)
        assert m.state(VLM) is ModelState.UNLOADED
        assert "unreachable" in (m.status(VLM).error or "")  # why the load failed
        assert (await m.ensure_loaded(CLIP)).state is ModelState.LOADED  # CLIP keeps working
        fake_ollama.come_back()
        h.clock.advance(29)
        assert await m.probe_backends() is False  # not probed again before 30 s
        assert m.degraded
        h.clock.advance(1)
        assert await m.probe_backends() is True
        assert not m.degraded and m.gpu_status().degraded_reason is None
        assert m.status(VLM).error is None  # the old "unreachable" is not shown any more
        assert [e.data["degraded"] for e in h.of("degraded_mode")] == [True, False]
        assert (await m.ensure_loaded(VLM)).state is ModelState.LOADED


async def test_ollama_dies_mid_load_leaves_nothing_accounted(fake_ollama: FakeOllama) -> None:
    async with harness(seed_settings(fake_ollama.url)) as h:
        m = h.models
        fake_ollama.die_on_next_load()
        with pytest.raises(BackendUnavailable, match="lost"):
            await m.ensure_loaded(VLM)
        assert m.state(VLM) is ModelState.UNLOADED
        assert h.gpu_used() == 0 and owners(h) == {}
        assert m.degraded
        assert fake_ollama.loads_of(VLM) == 1  # an unreachable backend is not retried
        fake_ollama.come_back()
        assert (await m.ensure_loaded(VLM)).state is ModelState.LOADED
        assert not m.degraded  # a successful call clears it without waiting for the probe


async def test_not_enough_vram_says_free_needed_and_what_could_be_unloaded(
    fake_ollama: FakeOllama,
) -> None:
    fake_ollama.add_model("big:14b", 11 * GIB)
    settings = seed_settings(
        fake_ollama.url,
        models=[
            ollama(VLM, VLM_SIZE, priority="user_facing"),
            ollama("big:14b", 11 * GIB, allowed_devices=["gpu"]),
        ],
    )
    async with harness(settings) as h:
        await h.models.ensure_loaded(VLM)
        with pytest.raises(InsufficientMemory) as info:
            await h.models.ensure_loaded("big:14b")
        err = info.value
        assert "needs 11.0 GiB, 307.2 MiB free" in err.message
        assert VLM in err.message
        assert err.details["needed_mb"] == 11264
        assert err.details["free_mb"] <= 1536
        assert err.details["could_unload"] == [VLM]
        assert h.models.state("big:14b") is ModelState.UNLOADED
        assert h.models.is_loaded(VLM)


async def test_eviction_prefers_idle_low_priority_models(fake_ollama: FakeOllama) -> None:
    fake_ollama.add_model("a:4b", 4 * GIB)
    fake_ollama.add_model("b:4b", 4 * GIB)
    fake_ollama.add_model("c:4b", 4 * GIB)
    settings = seed_settings(
        fake_ollama.url,
        models=[
            ollama("a:4b", 4 * GIB),
            ollama("b:4b", 4 * GIB, priority="high"),
            ollama("c:4b", 4 * GIB),
        ],
    )
    async with harness(settings) as h:
        m = h.models
        await m.ensure_loaded("a:4b")
        await m.ensure_loaded("b:4b")
        h.clock.advance(5)
        m.touch("a:4b")  # a is recent, b is idle but high priority
        await m.ensure_loaded("c:4b")
        assert m.state("a:4b") is ModelState.UNLOADED  # normal < high, despite being recent
        assert m.is_loaded("b:4b") and m.is_loaded("c:4b")
        unloaded = h.of("model_unloaded")[0].data
        assert unloaded["model"] == "a:4b" and unloaded["reason"] == "evicted"
        assert h.gpu_used() == 8 * GIB


async def test_a_model_in_use_is_not_evicted_under_its_user(fake_ollama: FakeOllama) -> None:
    fake_ollama.add_model("a:8b", 8 * GIB)
    fake_ollama.add_model("b:8b", 8 * GIB)
    settings = seed_settings(
        fake_ollama.url, models=[ollama("a:8b", 8 * GIB), ollama("b:8b", 8 * GIB)]
    )
    async with harness(settings) as h:
        m = h.models
        order: list[str] = []

        async def user() -> None:
            async with m.use("a:8b"):
                await asyncio.sleep(0.2)
                order.append("a done")
                assert m.is_loaded("a:8b")

        task = asyncio.create_task(user())
        await asyncio.sleep(0.05)
        await m.ensure_loaded("b:8b")  # waits for a's user, then evicts a
        order.append("b loaded")
        await task
        assert order == ["a done", "b loaded"]
        assert m.state("a:8b") is ModelState.UNLOADED


async def test_a_user_that_never_finishes_blocks_with_a_clear_error(
    fake_ollama: FakeOllama,
) -> None:
    fake_ollama.add_model("a:8b", 8 * GIB)
    fake_ollama.add_model("b:8b", 8 * GIB)
    settings = seed_settings(
        fake_ollama.url,
        models=[ollama("a:8b", 8 * GIB), ollama("b:8b", 8 * GIB)],
        gpu_manager={"queue_max_wait_s": 0.1},
    )
    async with harness(settings) as h:
        async with h.models.use("a:8b"):
            with pytest.raises(InsufficientMemory, match="unloading a:8b could make room"):
                await h.models.ensure_loaded("b:8b")
            assert h.models.is_loaded("a:8b")
        await h.models.ensure_loaded("b:8b")


async def test_vram_changing_operations_are_serialised_per_device(fake_ollama: FakeOllama) -> None:
    fake_ollama.add_model("mid:4b", 4 * GIB)
    settings = seed_settings(
        fake_ollama.url,
        models=[
            ollama("mid:4b", 4 * GIB),
            ollama("small:1b", GIB),
            ollama("tiny:0.5b", 512 * MIB),
        ],
    )
    fake_ollama.load_delay_s = 0.03
    async with harness(settings) as h:
        m = h.models
        ops = [
            m.ensure_loaded("mid:4b"),
            m.ensure_loaded("small:1b"),
            m.ensure_loaded("tiny:0.5b"),
            m.ensure_unloaded("small:1b"),
            m.ensure_loaded("mid:4b"),
            m.ensure_loaded("small:1b"),
        ]
        await asyncio.gather(*ops)
        assert fake_ollama.max_concurrent_loads == 1
        loaded = [s for s in m.list_models() if s.state is ModelState.LOADED]
        assert h.gpu_used() == sum(s.used_vram_bytes for s in loaded)
        assert sum(owners(h).values()) == h.gpu_used()


async def test_waiting_requests_are_served_grouped_by_model(fake_ollama: FakeOllama) -> None:
    fake_ollama.add_model("a:3b", 3 * GIB)
    fake_ollama.add_model("b:3b", 3 * GIB)
    fake_ollama.add_model("c:3b", 3 * GIB)
    settings = seed_settings(
        fake_ollama.url,
        models=[
            ollama("a:3b", 3 * GIB),
            ollama("b:3b", 3 * GIB),
            ollama("c:3b", 3 * GIB),
        ],
    )
    fake_ollama.load_delay_s = 0.05
    async with harness(settings) as h:
        m = h.models
        first = asyncio.create_task(m.ensure_loaded("a:3b"))
        await asyncio.sleep(0.01)  # a's load holds the GPU
        rest = [asyncio.create_task(m.ensure_loaded(n)) for n in ("c:3b", "b:3b", "b:3b", "b:3b")]
        await asyncio.gather(first, *rest)
        loads = [
            r.body["model"]
            for r in fake_ollama.requests
            if r.path == "/api/generate" and r.body.get("keep_alive") != 0
        ]
        assert loads == ["a:3b", "b:3b", "c:3b"]  # b's three requests share one load, first


async def test_arbiter_preemption_moves_clip_to_the_cpu(fake_ollama: FakeOllama) -> None:
    async with harness(seed_settings(fake_ollama.url)) as h:
        m = h.models
        await m.ensure_loaded(CLIP, "gpu:0")
        budget = h.arbiter.state().budget_bytes
        grab = h.arbiter.allocate(
            AllocationRequest(
                WorkloadType.IMAGE,
                Priority.USER_FACING,
                budget,
                device=DeviceId(0),
                owner="diffusion",
            )
        )
        for _ in range(50):
            await asyncio.sleep(0.01)
            if m.device(CLIP) == "cpu":
                break
        assert m.device(CLIP) == "cpu" and m.is_loaded(CLIP)
        assert h.of("model_preempted")[0].data["model"] == CLIP
        assert h.gpu_used() == 0
        assert owners(h) == {"diffusion": budget}
        h.arbiter.release_allocation(grab.id)


async def test_loading_the_vlm_first_moves_clip_off_the_gpu(fake_ollama: FakeOllama) -> None:
    settings = seed_settings(
        fake_ollama.url, devices={"backends": [], "simulated": [{"name": "big", "memory": "48GiB"}]}
    )
    async with harness(settings) as h:
        m = h.models
        await m.ensure_loaded(CLIP, "gpu:0")
        await m.ensure_loaded(VLM)  # fits beside CLIP, but seed property 6 moves CLIP first
        assert m.device(CLIP) == "cpu"
        kinds = [e.kind for e in h.seen if e.kind in ("model_migrated", "model_loaded")]
        assert kinds == ["model_loaded", "model_migrated", "model_loaded"]


async def test_pinned_and_allowed_devices(fake_ollama: FakeOllama) -> None:
    settings = seed_settings(
        fake_ollama.url,
        devices={
            "backends": [],
            "simulated": [{"name": "s0", "memory": "12GiB"}, {"name": "s1", "memory": "12GiB"}],
        },
        models=[
            ollama("small:1b", GIB, pinned_device="gpu:1"),
            ollama("tiny:0.5b", 512 * MIB, allowed_devices=["gpu:1"]),
            torch_model(CLIP, vram="100MiB", allowed_devices=["cpu"]),
        ],
    )
    async with harness(settings) as h:
        m = h.models
        assert (await m.ensure_loaded("small:1b")).device == "gpu:1"
        assert (await m.ensure_loaded("tiny:0.5b")).device == "gpu:1"
        assert (await m.ensure_loaded(CLIP)).device == "cpu"
        with pytest.raises(InvalidInput, match="may not run on gpu:0"):
            await m.migrate("tiny:0.5b", "gpu:0")
        with pytest.raises(InvalidInput, match="may not run on cuda"):
            await m.migrate(CLIP, "cuda")
        assert h.gpu_used(1) == GIB + 512 * MIB and h.gpu_used(0) == 0


async def test_optimize_unloads_idle_models_and_switches_to_a_smaller_variant(
    fake_ollama: FakeOllama,
) -> None:
    settings = seed_settings(
        fake_ollama.url,
        models=[
            ollama(VLM, VLM_SIZE, smaller_variant="small:1b", smaller_variant_vram=GIB),
            torch_model(CLIP, vram="500MiB"),
        ],
        gpu_manager={"optimize_idle_s": 60, "pressure_ratio": 0.5},
    )
    async with harness(settings) as h:
        m = h.models
        await m.ensure_loaded(CLIP, "cpu")
        h.clock.advance(120)
        await m.ensure_loaded(VLM)
        actions = await m.optimize()
        assert [(a.kind, a.model) for a in actions] == [
            (ModelActionKind.UNLOADED, CLIP),
            (ModelActionKind.SWITCHED, VLM),
        ]
        assert str(actions[0]) == "unloaded clip from cpu (idle, 500.0 MiB)"
        assert str(actions[1]).startswith(
            "switched qwen3-vl:8b to smaller variant small:1b on gpu:0"
        )
        status = m.status(VLM)
        assert status.variant == "small:1b" and status.used_vram_bytes == GIB
        assert h.gpu_used() == GIB
        assert "small:1b" in fake_ollama.loaded and VLM not in fake_ollama.loaded
        async with m.use(VLM) as handle:  # what to name in requests to Ollama now
            assert (handle.backend_model, handle.keep_alive) == ("small:1b", -1)
            body = {"model": handle.backend_model, "prompt": "hi", "stream": False}
            httpx.post(f"{handle.endpoint}/api/generate", json={**body, "keep_alive": -1})
        assert set(fake_ollama.running()) == {"small:1b"}  # the full model stayed out
        await m.ensure_unloaded(VLM)
        assert m.status(VLM).variant is None  # the next load is the full model again
        assert await m.optimize() == []


async def test_cpu_only_machine_runs_everything_on_the_cpu(fake_ollama: FakeOllama) -> None:
    settings = seed_settings(fake_ollama.url, devices={"backends": []})
    async with harness(settings) as h:
        m = h.models
        assert (await m.ensure_loaded(VLM)).device == "cpu"  # forced, although gpu-only
        assert fake_ollama.requests[-2].body["options"] == {"num_gpu": 0}
        assert (await m.ensure_loaded(CLIP)).runs_on == "cpu"
        with pytest.raises(InvalidInput, match="CPU-only"):
            await m.migrate(CLIP, "gpu:0")
        status = m.gpu_status()
        assert status.cpu_only and status.vram.gpu_name == "none (CPU-only)"
        assert status.vram.total_mb == 0 and status.clip_device == "cpu"


async def test_builtin_profiles_without_models_switch_and_say_nothing_moves(
    fake_ollama: FakeOllama,
) -> None:
    async with harness(seed_settings(fake_ollama.url, models=[])) as h:
        m = h.models
        assert m.profiles() == {"idle": {}, "recording": {}, "autopilot": {}}
        plan = m.plan_profile("recording")
        assert plan.steps == () and len(plan.notes) == 1
        assert "places no model" in plan.notes[0] and "[gpu_manager] vlm_model" in plan.notes[0]
        report = await m.switch_profile("recording", strict=True)
        assert report.ok and report.steps == () and report.notes == plan.notes
        assert (m.profile, report.previous) == ("recording", "idle")
        assert [e.data["mode"] for e in h.of("mode_changed")] == ["recording"]
        with pytest.raises(NotFound, match="no profile 'recordnig'"):
            m.plan_profile("recordnig")


async def test_gpu_status_has_every_field(fake_ollama: FakeOllama) -> None:
    async with harness(seed_settings(fake_ollama.url)) as h:
        m = h.models
        async with m.use(VLM):
            pass
        d = m.gpu_status().as_dict()
        assert d["execution_mode"] == "idle"
        assert d["vlm_state"] == "loaded" and d["vlm_model"] == VLM
        assert d["clip_device"] == "cpu"
        assert d["vram"] == {
            "total_mb": 12288,
            "used_mb": 10752,
            "free_mb": 1536,
            "gpu_name": "Simulated GPU sim0",
            "gpu_utilization_percent": 0,
        }
        assert d["idle_timeout_seconds"] == 300
        assert d["last_vlm_request"] == "2023-11-14T22:30:00+00:00"
        assert d["degraded_mode"] is False and d["degraded_reason"] is None


async def test_models_ollama_already_has_are_adopted_and_external_unloads_noticed(
    fake_ollama: FakeOllama,
) -> None:
    fake_ollama.preload(VLM)
    async with harness(seed_settings(fake_ollama.url)) as h:
        m = h.models
        status = m.status(VLM)
        assert status.state is ModelState.LOADED and status.device == "gpu:0"
        assert h.gpu_used() == VLM_SIZE and owners(h) == {f"model:{VLM}": VLM_SIZE}
        fake_ollama.loaded.clear()  # Ollama's own keep_alive expired
        h.clock.advance(30)
        await m.probe_backends()
        assert m.state(VLM) is ModelState.UNLOADED
        assert h.gpu_used() == 0 and owners(h) == {}
        assert h.of("model_unloaded")[-1].data["reason"] == "external"


async def test_metrics_follow_the_states(fake_ollama: FakeOllama) -> None:
    async with harness(seed_settings(fake_ollama.url)) as h:
        await h.models.ensure_loaded(VLM)
        text = h.metrics.render().decode()
        state = "vramancer_model_state"
        assert metric_value(text, state, backend="ollama", model=VLM, state="loaded") == 1
        assert metric_value(text, state, backend="ollama", model=VLM, state="unloaded") == 0
        loads = "vramancer_model_loads_total"
        assert metric_value(text, loads, backend="ollama", model=VLM, result="ok") == 1
        assert sample(text, "vramancer_model_vram_bytes", model=VLM, backend="ollama") == VLM_SIZE
        assert "vramancer_model_load_duration_seconds_count" in text
        await h.models.switch_profile("recording")
        text = h.metrics.render().decode()
        assert metric_value(text, "vramancer_execution_mode", mode="recording") == 1


async def test_stop_unloads_everything(fake_ollama: FakeOllama) -> None:
    async with harness(seed_settings(fake_ollama.url)) as h:
        await h.models.ensure_loaded(VLM)
        await h.models.ensure_loaded(CLIP, "cpu")
    assert fake_ollama.loaded == {}
    assert h.models.state(CLIP) is ModelState.UNLOADED and h.models.handle(CLIP) is None
    assert h.gpu_used() == 0


async def test_direct_ollama_requests_count_as_activity(fake_ollama: FakeOllama) -> None:
    settings = seed_settings(fake_ollama.url, models=[ollama(VLM, VLM_SIZE, idle_timeout_s=60)])
    async with harness(settings) as h:
        m = h.models
        await m.ensure_loaded(VLM)
        await m.probe_backends(force=True)  # remembers Ollama's expires_at
        h.clock.advance(50)
        # A client asks Ollama directly with its default keep_alive: the expiry moves.
        httpx.post(
            fake_ollama.url + "/api/generate", json={"model": VLM, "prompt": "hi", "stream": False}
        )
        await m.probe_backends(force=True)
        assert m.status(VLM).last_used == h.clock.time()
        h.clock.advance(50)
        assert await m.reap_once() == []  # 50 s since the direct request, not 100 s
        h.clock.advance(10)
        assert await m.reap_once() == [VLM]


async def test_direct_requests_with_vramancers_keep_alive_count_as_activity(
    fake_ollama: FakeOllama,
) -> None:
    """keep_alive -1 is Go's largest duration from each request on: the expiry still moves."""
    settings = seed_settings(fake_ollama.url, models=[ollama(VLM, VLM_SIZE, idle_timeout_s=60)])
    async with harness(settings) as h:
        m = h.models
        async with m.use(VLM) as handle:
            keep = handle.keep_alive
        assert keep == -1
        await m.probe_backends(force=True)
        h.clock.advance(50)
        body = {"model": VLM, "prompt": "hi", "stream": False, "keep_alive": keep}
        httpx.post(fake_ollama.url + "/api/generate", json=body)
        await m.probe_backends(force=True)
        assert m.status(VLM).last_used == h.clock.time()
        h.clock.advance(59)
        assert await m.reap_once() == []
        h.clock.advance(1)
        assert await m.reap_once() == [VLM]


async def test_ensure_loaded_counts_as_activity(fake_ollama: FakeOllama) -> None:
    settings = seed_settings(fake_ollama.url, models=[ollama(VLM, VLM_SIZE, idle_timeout_s=60)])
    async with harness(settings) as h:
        await h.models.ensure_loaded(VLM)
        h.clock.advance(59)
        await h.models.ensure_loaded(VLM)  # already loaded: still a request for it
        h.clock.advance(59)
        assert await h.models.reap_once() == []
        assert h.models.gpu_status().last_vlm_request is not None


async def test_ollama_size_is_estimated_before_the_first_load_then_measured(
    fake_ollama: FakeOllama,
) -> None:
    fake_ollama.add_model("est:7b", 5 * GIB, parameter_size="7.6B", quantization_level="Q4_K_M")
    settings = seed_settings(fake_ollama.url, models=[ollama("est:7b", None)])
    async with harness(settings) as h:
        m = h.models
        estimate = m.status("est:7b").vram_bytes
        assert 4 * GIB < estimate < 6 * GIB  # 7.6 B x 4.9 bits + KV cache + overhead
        assert estimate != h.settings.gpu_manager.default_vram
        await m.ensure_loaded("est:7b")
        assert m.status("est:7b").vram_bytes == 5 * GIB  # what Ollama's /api/ps said
        assert owners(h) == {"model:est:7b": 5 * GIB}  # re-booked at the measured size


async def test_ensure_unloaded_waits_until_ollama_really_let_go(fake_ollama: FakeOllama) -> None:
    """Property 11 against Ollama's asynchronous unload: the model lingers in /api/ps after the
    unload answer; ensure_unloaded returns only once it is gone, and the next probe does not
    adopt it back."""
    fake_ollama.unload_lag_s = 0.2
    async with harness(seed_settings(fake_ollama.url)) as h:
        m = h.models
        await m.ensure_loaded(VLM)
        await m.ensure_unloaded(VLM)
        assert fake_ollama.running() == {}
        h.clock.advance(30)
        await m.probe_backends()
        assert m.state(VLM) is ModelState.UNLOADED and owners(h) == {}
        assert [e.data["reason"] for e in h.of("model_loaded")] == ["request"]


async def test_unload_timeout_retries_then_error_with_an_event(fake_ollama: FakeOllama) -> None:
    """The unload timeout: Ollama never lets go within unload_timeout_s; the unload is
    retried max_load_retries times, then the model is ERROR and model_error is published."""
    settings = seed_settings(
        fake_ollama.url, gpu_manager={"unload_timeout_s": 0.1, "max_load_retries": 1}
    )
    async with harness(settings) as h:
        m = h.models
        await m.ensure_loaded(VLM)
        fake_ollama.unload_lag_s = 5.0
        with pytest.raises(
            OperationTimeout, match=r"unload of .* timed out after 0.1 s \(2 attempts\)"
        ):
            await m.ensure_unloaded(VLM)
        assert fake_ollama.unloads_of(VLM) == 2
        assert m.state(VLM) is ModelState.ERROR
        error = h.of("model_error")[-1].data
        assert (error["model"], error["operation"], error["code"]) == (VLM, "unload", "timeout")
        fake_ollama.unload_lag_s = 0.0
        assert (await m.ensure_unloaded(VLM)).state is ModelState.UNLOADED
        assert h.gpu_used() == 0 and owners(h) == {}


async def test_a_model_named_without_its_tag_is_tracked(fake_ollama: FakeOllama) -> None:
    """Ollama lists ``llama3`` as ``llama3:latest``: the probe must not take it for gone."""
    fake_ollama.add_model("llama3", 4 * GIB)
    settings = seed_settings(fake_ollama.url, models=[ollama("llama3", 4 * GIB)])
    async with harness(settings) as h:
        m = h.models
        assert (await m.ensure_loaded("llama3")).used_vram_bytes == 4 * GIB
        h.clock.advance(30)
        await m.probe_backends()
        assert m.is_loaded("llama3") and owners(h) == {"model:llama3": 4 * GIB}
        await m.ensure_unloaded("llama3")
        assert fake_ollama.running() == {}


async def test_a_user_facing_model_preempts_a_background_reservation(
    fake_ollama: FakeOllama,
) -> None:
    """The issue's headline: a user-facing workload beats a background one for memory, also
    when the background one is a reservation (a task, /v1/allocations), not a model."""
    async with harness(seed_settings(fake_ollama.url)) as h:
        told: list[str] = []
        batch = h.arbiter.allocate(
            AllocationRequest(
                WorkloadType.OTHER,
                Priority.BACKGROUND,
                8 * GIB,
                owner="batch",
                on_preempt=lambda a: told.append(a.id),
            )
        )
        status = await h.models.ensure_loaded(VLM)  # user_facing, 10.5 GiB of a 10.8 GiB budget
        assert status.device == "gpu:0"
        assert told == [batch.id]
        assert owners(h) == {f"model:{VLM}": VLM_SIZE}
        event = h.of("preempted")[0].data
        assert (event["owner"], event["by_owner"]) == ("batch", f"model:{VLM}")


async def test_not_enough_vram_names_the_other_allocations_holding_it(
    fake_ollama: FakeOllama,
) -> None:
    """A reservation of the same priority cannot be preempted: the 409 says who holds what."""
    async with harness(seed_settings(fake_ollama.url)) as h:
        h.arbiter.allocate(
            AllocationRequest(WorkloadType.LLM, Priority.USER_FACING, 9 * GIB, owner="chat")
        )
        with pytest.raises(InsufficientMemory) as info:
            await h.models.ensure_loaded(VLM)
        err = info.value
        assert "needs 10.5 GiB, 1.8 GiB free" in err.message
        assert "other allocations hold memory: chat 9.0 GiB (user_facing)" in err.message
        budget = h.arbiter.state().budget_bytes
        assert err.details["free_mb"] == (budget - 9 * GIB) // MIB
        assert [(d["owner"], d["memory_bytes"]) for d in err.details["held_by"]] == [
            ("chat", 9 * GIB)
        ]
        assert h.models.state(VLM) is ModelState.UNLOADED


async def test_ollama_restarting_forgets_what_it_held(fake_ollama: FakeOllama) -> None:
    """Ollama dies with the VLM loaded: an unload fails (ERROR, still accounted); once Ollama is
    back with nothing loaded the probe marks it unloaded, frees its accounting and clears the
    error."""
    async with harness(seed_settings(fake_ollama.url)) as h:
        m = h.models
        await m.ensure_loaded(VLM)
        fake_ollama.go_down()
        with pytest.raises(BackendUnavailable):
            await m.ensure_unloaded(VLM)
        assert m.state(VLM) is ModelState.ERROR and h.gpu_used() == VLM_SIZE
        fake_ollama.come_back()
        h.clock.advance(30)
        assert await m.probe_backends() is True
        status = m.status(VLM)
        assert (status.state, status.error, status.used_vram_bytes) == (
            ModelState.UNLOADED,
            None,
            0,
        )
        assert h.gpu_used() == 0 and owners(h) == {}


async def test_optimize_with_a_variant_ollama_lacks_keeps_the_full_model(
    fake_ollama: FakeOllama,
) -> None:
    """The smaller variant is not pulled: optimize says it could not switch, and the full
    model is loaded again where it was, nothing left half-done."""
    settings = seed_settings(
        fake_ollama.url,
        models=[ollama(VLM, VLM_SIZE, smaller_variant="qwen3-vl:2b", max_load_retries=0)],
        gpu_manager={"pressure_ratio": 0.5},
    )
    async with harness(settings) as h:
        m = h.models
        await m.ensure_loaded(VLM)
        (action,) = await m.optimize()
        assert (action.kind, action.model) == (ModelActionKind.FAILED, VLM)
        assert str(action).startswith("could not switch qwen3-vl:8b to qwen3-vl:2b: Ollama: model")
        status = m.status(VLM)
        assert (status.state, status.device, status.variant) == (ModelState.LOADED, "gpu:0", None)
        assert set(fake_ollama.running()) == {VLM}
        assert owners(h) == {f"model:{VLM}": VLM_SIZE} and h.gpu_used() == VLM_SIZE


async def test_a_model_in_use_is_not_preempted_under_its_user(fake_ollama: FakeOllama) -> None:
    """Preemption is an eviction too: while CLIP is inside use(), a higher-priority request
    cannot take its memory; once the user is done, it can (and CLIP moves to the CPU)."""
    async with harness(seed_settings(fake_ollama.url)) as h:
        m = h.models
        budget = h.arbiter.state().budget_bytes
        async with m.use(CLIP, "gpu:0"):
            with pytest.raises(InsufficientMemory):
                h.arbiter.allocate(
                    AllocationRequest(
                        WorkloadType.IMAGE, Priority.USER_FACING, budget, device=DeviceId(0)
                    )
                )
            await asyncio.sleep(0.05)
            assert m.device(CLIP) == "gpu:0" and h.of("model_preempted") == []
        grab = h.arbiter.allocate(
            AllocationRequest(WorkloadType.IMAGE, Priority.USER_FACING, budget, device=DeviceId(0))
        )
        for _ in range(50):
            await asyncio.sleep(0.01)
            if m.device(CLIP) == "cpu":
                break
        assert m.device(CLIP) == "cpu" and m.is_loaded(CLIP)
        h.arbiter.release_allocation(grab.id)
