"""The model manager's correctness properties as hypothesis tests.

Random sequences of profile switches and of concurrent load / unload / use / migrate requests,
with idle timeouts on a manual clock, over the real device manager (a simulated 12 GiB GPU), the
real arbiter, the fake Ollama server (the VLM, 10.5 GiB) and a small torch model (CLIP).
After every batch the bookkeeping must agree: what the simulated GPU shows as used is what the
loaded models account for, the arbiter holds exactly their allocations, and Ollama has loaded
exactly what the manager says.

These counters are the manager's own (it moves the simulated GPU's used memory itself), so they
show consistency, not that memory is really freed: "unloading frees VRAM" is measured on what a
(fake) NVIDIA GPU reports, in ``test_unload_frees.py``.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes.ollama import FakeOllama
from tests.unit.models.conftest import CLIP, VLM, VLM_SIZE, Harness, harness, seed_settings
from vramancer.errors import InsufficientMemory, InvalidInput
from vramancer.events import Event
from vramancer.models.backends.base import (
    LoadResult,
    ModelBackend,
    RequestInfo,
    RunningModel,
    Target,
)
from vramancer.models.errors import ModelBusy
from vramancer.models.types import ModelState
from vramancer.units import GIB


def examples(n: int) -> Any:
    """Hypothesis settings: ``n`` examples, derandomized (the same examples every run)."""
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


DEVICE_RE = re.compile(r"^(cpu|gpu:\d+)$")
#: Errors a random request may legitimately get (no room for CLIP beside the VLM, a user that
#: held a model past the wait); anything else fails the test.
ALLOWED_ERRORS = (InsufficientMemory, ModelBusy)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOllama]:
    with FakeOllama({VLM: VLM_SIZE}) as server:
        yield server


# --------------------------------------------------------------------------- property 13 probe


@dataclass
class Overlap:
    """Counts VRAM-changing backend calls in flight per GPU."""

    active: dict[str, int] = field(default_factory=dict)
    worst: int = 0

    def enter(self, *devices: str | None) -> list[str]:
        gpus = [d for d in devices if d is not None and d != "cpu"]
        for d in gpus:
            self.active[d] = self.active.get(d, 0) + 1
            self.worst = max(self.worst, self.active[d])
        return gpus

    def leave(self, gpus: list[str]) -> None:
        for d in gpus:
            self.active[d] -= 1


class Counted:
    """Wraps a backend; every load, move and unload is counted on the GPUs it touches."""

    def __init__(self, inner: ModelBackend, overlap: Overlap) -> None:
        self.inner = inner
        self.overlap = overlap
        self.kind = inner.kind
        self.can_move = inner.can_move
        self.reload_on_cpu = inner.reload_on_cpu
        self.service = inner.service
        self.device: str | None = None

    async def load(self, target: Target, variant: str | None = None) -> LoadResult:
        gpus = self.overlap.enter(target.device)
        try:
            await asyncio.sleep(0.001)  # give a racing operation the chance to overlap
            result = await self.inner.load(target, variant)
            self.device = target.device
            return result
        finally:
            self.overlap.leave(gpus)

    async def move(self, target: Target) -> LoadResult:
        gpus = self.overlap.enter(self.device, target.device)
        try:
            await asyncio.sleep(0.001)
            result = await self.inner.move(target)
            self.device = target.device
            return result
        finally:
            self.overlap.leave(gpus)

    async def unload(self) -> None:
        gpus = self.overlap.enter(self.device)
        try:
            await asyncio.sleep(0.001)
            await self.inner.unload()
            self.device = None
        finally:
            self.overlap.leave(gpus)

    def handle(self) -> Any:
        return self.inner.handle()

    def request_info(self) -> RequestInfo:
        return self.inner.request_info()

    def find_running(self, running: Sequence[RunningModel]) -> RunningModel | None:
        return self.inner.find_running(running)

    async def estimate_vram(self) -> int | None:
        return await self.inner.estimate_vram()

    async def close(self) -> None:
        await self.inner.close()


def count_overlaps(h: Harness) -> Overlap:
    overlap = Overlap()
    for entry in h.models._entries.values():
        entry.backend = Counted(entry.backend, overlap)
    return overlap


# --------------------------------------------------------------------------- invariants


def check_consistent(h: Harness, fake: FakeOllama) -> None:
    m = h.models
    statuses = {s.name: s for s in m.list_models()}
    for s in statuses.values():
        assert s.state in (ModelState.LOADED, ModelState.UNLOADED), s  # nothing half-done
        assert s.in_use == 0
        if s.state is ModelState.UNLOADED:
            assert s.device is None and s.used_vram_bytes == 0
        assert DEVICE_RE.match(m.device(s.name))  # property 12
    on_gpu = sum(s.used_vram_bytes for s in statuses.values() if s.device == "gpu:0")
    assert h.gpu_used() == on_gpu
    booked = {a.owner: a.memory_bytes for a in h.arbiter.state().allocations}
    expected = {
        f"model:{s.name}": s.used_vram_bytes for s in statuses.values() if s.device == "gpu:0"
    }
    assert booked == expected
    assert set(fake.loaded) == ({VLM} if statuses[VLM].state is ModelState.LOADED else set())
    status = m.gpu_status().as_dict()  # property 5: every field valid
    assert status["execution_mode"] in m.profiles()
    assert status["vlm_state"] in {s.value for s in ModelState}
    assert DEVICE_RE.match(status["clip_device"])
    assert status["vram"]["total_mb"] == 12288
    assert status["vram"]["used_mb"] + status["vram"]["free_mb"] == 12288
    assert status["idle_timeout_seconds"] > 0
    assert isinstance(status["degraded_mode"], bool)


# --------------------------------------------------------------------------- random requests

Op = tuple[str, str]

ops = st.one_of(
    st.tuples(st.just("switch"), st.sampled_from(["idle", "recording", "autopilot"])),
    st.tuples(st.sampled_from(["load", "unload", "use"]), st.sampled_from([VLM, CLIP])),
    st.tuples(st.just("migrate"), st.sampled_from(["cpu", "gpu:0"])),
    st.tuples(st.just("idle"), st.sampled_from(["100", "400", "1000"])),
)
batches = st.lists(st.lists(ops, min_size=1, max_size=3), min_size=1, max_size=6)


async def run_op(h: Harness, op: Op) -> None:
    m = h.models
    kind, arg = op
    try:
        if kind == "switch":
            await m.switch_profile(arg)
        elif kind == "load":
            await m.ensure_loaded(arg)
            assert m.is_loaded(arg)  # property 10: no await since it returned
        elif kind == "unload":
            await m.ensure_unloaded(arg)
            assert not m.is_loaded(arg)  # property 11
        elif kind == "use":
            async with m.use(arg) as handle:  # property 9: on demand, then it works
                assert m.is_loaded(arg) and handle.device == m.device(arg)
                await asyncio.sleep(0)
        elif kind == "migrate":
            await m.migrate(CLIP, arg)
        else:
            h.clock.advance(float(arg))
            await m.reap_once()
    except ALLOWED_ERRORS:
        pass


@pytest.mark.slow
@examples(20)
@given(batches=batches)
def test_random_concurrent_requests_keep_every_invariant(
    fake: FakeOllama, batches: list[list[Op]]
) -> None:
    """Properties 5, 9, 10, 11, 12 and 13 under random concurrent requests (property 4,
    unloading frees VRAM, is measured on the device in ``test_unload_frees.py``)."""
    fake.reset()

    async def scenario() -> None:
        async with harness(seed_settings(fake.url, models=_models())) as h:
            overlap = count_overlaps(h)
            for batch in batches:
                await asyncio.gather(*(run_op(h, op) for op in batch))
                check_consistent(h, fake)
            assert overlap.worst <= 1  # property 13: one VRAM change per GPU at a time
            assert fake.max_concurrent_loads <= 1

    asyncio.run(scenario())


def _models() -> list[dict[str, Any]]:
    return [
        {
            "name": VLM,
            "backend": "ollama",
            "vram": VLM_SIZE,
            "priority": "user_facing",
            "allowed_devices": ["gpu"],
            "idle_timeout_s": 300,
        },
        {
            "name": CLIP,
            "backend": "torch",
            "factory": "tests.unit.models.tiny:tiny",
            "vram": "500MiB",
            "idle_timeout_s": 600,
        },
    ]


# --------------------------------------------------------------------------- mode transitions

switches = st.lists(st.sampled_from(["idle", "recording", "autopilot"]), min_size=1, max_size=8)


@pytest.mark.slow
@examples(20)
@given(modes=switches, external_gib=st.sampled_from([0.0, 1.0, 10.9, 11.2, 11.6]))
def test_profile_switches_follow_the_execution_modes(
    fake: FakeOllama, modes: list[str], external_gib: float
) -> None:
    """Properties 1, 2, 3 and 6 over random sequences of mode switches, with some VRAM
    taken by another program: from 12 GiB free down to 0.4 GiB, so "more than 1 GB free" is
    sometimes false and the VLM sometimes cannot fit."""
    fake.reset()

    async def scenario() -> None:
        async with harness(seed_settings(fake.url, models=_models())) as h:
            m = h.models
            h.devices.set_simulated(0, used_bytes=int(external_gib * GIB))
            clip_when_vlm_loaded: list[str] = []

            def watch(event: Event) -> None:
                if event.data.get("model") == VLM:
                    clip_when_vlm_loaded.append(m.device(CLIP))

            h.events.subscribe(watch, "model_loaded")
            for mode in modes:
                clip_was_on_gpu = m.device(CLIP) == "gpu:0"
                started = time.monotonic()
                report = await m.switch_profile(mode)
                elapsed = time.monotonic() - started
                if mode == "recording" and external_gib + VLM_SIZE / GIB > 12:
                    assert not report.ok  # the VLM cannot fit: the report says which step
                    assert report.steps[report.failed_step or 0].step.model == VLM
                    assert m.profile != "recording"
                    continue
                assert report.ok, report.as_dict()
                assert m.profile == mode
                if mode == "autopilot":
                    assert not m.is_loaded(VLM) and elapsed < 5  # property 1
                    clip_on_gpu = m.device(CLIP) == "gpu:0"
                    assert m.is_loaded(CLIP)
                    # free VRAM with CLIP off the GPU, as the switch saw it
                    free_mb = m.gpu_status().vram.free_mb + (500 if clip_on_gpu else 0)
                    if free_mb > 1024:
                        assert clip_on_gpu  # property 3
                    elif not clip_was_on_gpu:
                        assert not clip_on_gpu  # "gpu if more than 1 GB free": the CPU
                if mode == "recording":
                    assert m.is_loaded(VLM) and elapsed < 30  # property 2
                    assert m.device(VLM) == "gpu:0" and m.device(CLIP) == "cpu"
                if mode == "idle":
                    assert not m.is_loaded(VLM) and not m.is_loaded(CLIP)
                check_consistent_external(h, fake, external_gib)
            assert all(d == "cpu" for d in clip_when_vlm_loaded)  # property 6

    asyncio.run(scenario())


def check_consistent_external(h: Harness, fake: FakeOllama, external_gib: float) -> None:
    on_gpu = sum(s.used_vram_bytes for s in h.models.list_models() if s.device == "gpu:0")
    assert h.gpu_used() == int(external_gib * GIB) + on_gpu
    assert set(fake.loaded) == ({VLM} if h.models.is_loaded(VLM) else set())


@examples(6)
@given(path=st.sampled_from(["switch", "ensure", "use"]), gpu=st.sampled_from(["12GiB", "48GiB"]))
def test_clip_leaves_the_gpu_before_the_vlm_finishes_loading(
    fake: FakeOllama, path: str, gpu: str
) -> None:
    """Property 6 for every way the VLM can be loaded while CLIP is on the GPU, whether or not
    both would fit."""
    fake.reset()
    devices = {"backends": [], "simulated": [{"name": "sim0", "memory": gpu}]}

    async def scenario() -> None:
        async with harness(seed_settings(fake.url, models=_models(), devices=devices)) as h:
            m = h.models
            await m.switch_profile("autopilot")
            assert m.device(CLIP) == "gpu:0"
            seen: list[str] = []
            h.events.subscribe(
                lambda e: seen.append(m.device(CLIP)) if e.data["model"] == VLM else None,
                "model_loaded",
            )
            if path == "switch":
                await m.switch_profile("recording")
            elif path == "ensure":
                await m.ensure_loaded(VLM)
            else:
                async with m.use(VLM):
                    pass
            assert seen == ["cpu"]
            assert m.is_loaded(CLIP)  # moved, not dropped

    asyncio.run(scenario())


# --------------------------------------------------------------------------- property 7


@pytest.mark.slow
@examples(12)
@given(moves=st.lists(st.sampled_from(["cpu", "gpu:0"]), min_size=1, max_size=5))
def test_outputs_agree_after_every_device_change(fake: FakeOllama, moves: list[str]) -> None:
    """Property 7 with a small model (the real MiniLM has its own test)."""
    fake.reset()

    async def scenario() -> None:
        async with harness(seed_settings(fake.url, models=_models())) as h:
            m = h.models
            x = torch.linspace(-1, 1, 16).reshape(1, 16)
            await m.ensure_loaded(CLIP, "cpu")
            reference = m.handle(CLIP)(x).detach()
            for device in moves:
                await m.migrate(CLIP, device)
                async with m.use(CLIP) as handle:
                    assert handle.device == device and handle.runs_on == "cpu"
                    out = handle.obj(x).detach()
                assert torch.isfinite(out).all()
                assert torch.allclose(out, reference)

    asyncio.run(scenario())


# --------------------------------------------------------------------------- property 8


@examples(20)
@given(
    timeout_s=st.floats(min_value=1.0, max_value=5000.0).filter(lambda t: abs(t - 300) > 1),
    early=st.floats(min_value=0.01, max_value=0.99),
)
def test_idle_timeout_is_the_configured_value(
    fake: FakeOllama, timeout_s: float, early: float
) -> None:
    """Property 8: unloaded after exactly the configured idle time, not the default 300 s."""
    fake.reset()
    models = _models()
    models[0]["idle_timeout_s"] = timeout_s

    async def scenario() -> None:
        async with harness(seed_settings(fake.url, models=models)) as h:
            m = h.models
            async with m.use(VLM):
                pass
            h.clock.advance(timeout_s * early)
            assert await m.reap_once() == []
            assert m.is_loaded(VLM)
            h.clock.advance(timeout_s * (1 - early) + 1e-6)
            assert await m.reap_once() == [VLM]
            assert not m.is_loaded(VLM)
            assert m.gpu_status().idle_timeout_seconds == round(timeout_s)

    asyncio.run(scenario())


# --------------------------------------------------------------------------- property 13, busy


def _many_models() -> list[dict[str, Any]]:
    return [
        {"name": "a:2b", "backend": "ollama", "vram": 2 * GIB},
        {"name": "b:3b", "backend": "ollama", "vram": 3 * GIB, "priority": "high"},
        {"name": "c:1b", "backend": "ollama", "vram": GIB, "allowed_devices": ["gpu:1", "cpu"]},
        {"name": "t", "backend": "torch", "factory": "tests.unit.models.tiny:tiny", "vram": "1GiB"},
    ]


many_ops = st.lists(
    st.tuples(
        st.sampled_from(["load", "unload", "use", "to"]),
        st.sampled_from(["a:2b", "b:3b", "c:1b", "t"]),
        st.sampled_from(["cpu", "gpu:0", "gpu:1"]),
    ),
    min_size=2,
    max_size=8,
)


@pytest.mark.slow
@examples(15)
@given(burst=many_ops)
def test_concurrent_operations_are_sequential_per_gpu(
    fake: FakeOllama, burst: list[tuple[str, str, str]]
) -> None:
    """Property 13: a burst of concurrent requests on two GPUs never has two VRAM-changing
    operations in flight on one GPU, and leaves every account consistent."""
    fake.reset()
    for name, size in (("a:2b", 2), ("b:3b", 3), ("c:1b", 1)):
        fake.add_model(name, size * GIB)
    fake.load_delay_s = 0.005
    devices = {
        "backends": [],
        "simulated": [{"name": "s0", "memory": "6GiB"}, {"name": "s1", "memory": "6GiB"}],
    }

    async def one(h: Harness, kind: str, name: str, device: str) -> None:
        m = h.models
        try:
            if kind == "load":
                await m.ensure_loaded(name)
                assert m.is_loaded(name)
            elif kind == "unload":
                await m.ensure_unloaded(name)
                assert not m.is_loaded(name)
            elif kind == "use":
                async with m.use(name):
                    await asyncio.sleep(0.002)
            else:
                await m.migrate(name, device)
        except (*ALLOWED_ERRORS, InvalidInput):
            pass

    async def scenario() -> None:
        settings_ = seed_settings(fake.url, models=_many_models(), devices=devices)
        async with harness(settings_) as h:
            overlap = count_overlaps(h)
            await asyncio.gather(*(one(h, *op) for op in burst))
            assert overlap.worst <= 1
            statuses = h.models.list_models()
            for index in (0, 1):
                here = [s for s in statuses if s.device == f"gpu:{index}"]
                assert h.gpu_used(index) == sum(s.used_vram_bytes for s in here)
            booked = {a.owner: a.memory_bytes for a in h.arbiter.state().allocations}
            assert booked == {
                f"model:{s.name}": s.used_vram_bytes
                for s in statuses
                if s.device not in (None, "cpu")
            }
            ollama_loaded = {
                s.name
                for s in statuses
                if s.backend.value == "ollama" and s.state is ModelState.LOADED
            }
            assert set(fake.loaded) == ollama_loaded

    asyncio.run(scenario())
