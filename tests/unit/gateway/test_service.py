"""The gateway's executor against the real model manager (simulated 12 GiB GPU, fake Ollama),
with a manual clock for the waits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from tests.fakes.ollama import FakeOllama
from tests.unit.models.conftest import Harness, harness, seed_settings
from vramancer.gateway.service import Gateway, ModelTooLarge, QueueFull, QueueTimeout, UnknownModel
from vramancer.gateway.settings import GatewaySettings
from vramancer.models.types import ModelState
from vramancer.units import GIB

MODELS = [
    {"name": "a:8b", "backend": "ollama", "vram": "8GiB", "allowed_devices": ["gpu"]},
    {"name": "b:8b", "backend": "ollama", "vram": "8GiB", "allowed_devices": ["gpu"]},
    {"name": "huge:70b", "backend": "ollama", "vram": "40GiB", "allowed_devices": ["gpu"]},
]


@pytest.fixture
def fake() -> AsyncIterator[FakeOllama]:
    with FakeOllama({"a:8b": 8 * GIB, "b:8b": 8 * GIB, "huge:70b": 40 * GIB}) as server:
        yield server  # type: ignore[misc]


@asynccontextmanager
async def gateway(fake: FakeOllama, **kw: object) -> AsyncIterator[tuple[Gateway, Harness]]:
    async with harness(seed_settings(fake.url, models=MODELS)) as h:
        gw = Gateway(GatewaySettings(**kw), h.models, metrics=h.metrics, clock=h.clock)  # type: ignore[arg-type]
        await gw.start()
        try:
            yield gw, h
        finally:
            await gw.stop()


async def until(check: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_a_lease_loads_the_model_and_holds_it(fake: FakeOllama) -> None:
    async with gateway(fake) as (gw, h):
        async with gw.lease("a:8b") as handle:
            assert handle.backend_model == "a:8b" and handle.endpoint == fake.url
            assert h.models.status("a:8b").in_use == 1
        assert h.models.status("a:8b").in_use == 0 and h.models.is_loaded("a:8b")
        assert gw.metrics.swaps.labels(model="a:8b")._value.get() == 1


async def test_a_held_model_is_not_evicted_the_other_waits_then_swaps(fake: FakeOllama) -> None:
    async with gateway(fake, max_wait_s=5.0) as (gw, h):
        order: list[str] = []
        holding = asyncio.Event()
        release = asyncio.Event()

        async def use(name: str, hold: bool = False) -> None:
            async with gw.lease(name):
                order.append(name)
                if hold:
                    holding.set()
                    await release.wait()

        first = asyncio.create_task(use("a:8b", hold=True))
        await holding.wait()
        second = asyncio.create_task(use("b:8b"))
        await until(lambda: gw.waiting("b:8b") == 1)
        h.clock.advance(60.0)  # b is overdue: a drains, but is held, so it stays
        await asyncio.sleep(0.3)
        assert order == ["a:8b"] and h.models.is_loaded("a:8b") and gw.waiting("b:8b") == 1
        # a drains: a new request for a waits behind b
        third = asyncio.create_task(use("a:8b"))
        await asyncio.sleep(0.3)
        assert order == ["a:8b"]
        release.set()
        await asyncio.gather(first, second, third)
        assert order == ["a:8b", "b:8b", "a:8b"]
        assert fake.loads_of("a:8b") == 2 and fake.loads_of("b:8b") == 1


async def test_queues_show_each_models_waiting_and_in_flight_requests(fake: FakeOllama) -> None:
    async with gateway(fake, max_wait_s=30.0) as (gw, h):
        assert [(q.model, q.queued, q.in_flight, q.oldest_wait_s) for q in gw.queues()] == [
            ("a:8b", 0, 0, None),
            ("b:8b", 0, 0, None),
            ("huge:70b", 0, 0, None),
        ]
        holding, release = asyncio.Event(), asyncio.Event()

        async def hold_a() -> None:
            async with gw.lease("a:8b"):
                holding.set()
                await release.wait()

        async def use_b() -> None:
            async with gw.lease("b:8b"):
                pass

        first = asyncio.create_task(hold_a())
        await holding.wait()
        second = asyncio.create_task(use_b())
        await until(lambda: gw.waiting("b:8b") == 1)
        h.clock.advance(2.5)
        by_model = {q.model: q for q in gw.queues()}
        assert (by_model["a:8b"].queued, by_model["a:8b"].in_flight) == (0, 1)
        assert (by_model["b:8b"].queued, by_model["b:8b"].in_flight) == (1, 0)
        assert by_model["b:8b"].oldest_wait_s == pytest.approx(2.5, abs=0.01)
        release.set()
        await asyncio.gather(first, second)
        assert all(q.queued == 0 and q.in_flight == 0 for q in gw.queues())


async def test_unknown_too_large_full_queue_and_timeout(fake: FakeOllama) -> None:
    async with gateway(fake, queue_length=1, timeout_s=30.0) as (gw, h):
        with pytest.raises(UnknownModel):
            async with gw.lease("nope"):
                pass
        with pytest.raises(ModelTooLarge) as too_large:
            async with gw.lease("huge:70b"):
                pass
        assert too_large.value.details["needed_bytes"] == 40 * GIB
        assert too_large.value.http_status == 507
        release = asyncio.Event()

        async def hold() -> None:
            async with gw.lease("a:8b"):
                await release.wait()

        holder = asyncio.create_task(hold())
        await until(lambda: gw.in_flight("a:8b") == 1)
        waiting = asyncio.create_task(gw.lease("b:8b").__aenter__())
        await until(lambda: gw.waiting("b:8b") == 1)
        with pytest.raises(QueueFull):
            async with gw.lease("b:8b"):
                pass
        h.clock.advance(31.0)
        with pytest.raises(QueueTimeout):
            await waiting
        release.set()
        await holder
        assert h.models.state("b:8b") is ModelState.UNLOADED


async def test_a_cancelled_waiter_leaves_the_queue(fake: FakeOllama) -> None:
    async with gateway(fake) as (gw, _h):
        release = asyncio.Event()

        async def hold() -> None:
            async with gw.lease("a:8b"):
                await release.wait()

        holder = asyncio.create_task(hold())
        await until(lambda: gw.in_flight("a:8b") == 1)
        waiting = asyncio.create_task(gw.lease("b:8b").__aenter__())
        await until(lambda: gw.waiting("b:8b") == 1)
        waiting.cancel()
        await until(lambda: gw.waiting("b:8b") == 0)
        release.set()
        await holder
        assert gw.in_flight("a:8b") == 0 and fake.loads_of("b:8b") == 0


async def test_a_resident_model_takes_requests_up_to_its_concurrency(fake: FakeOllama) -> None:
    async with gateway(fake, max_concurrent=2) as (gw, h):
        async with gw.lease("a:8b"):  # loads it
            pass
        release = asyncio.Event()

        async def hold() -> None:
            async with gw.lease("a:8b"):
                await release.wait()

        holders = [asyncio.create_task(hold()) for _ in range(3)]
        await until(lambda: gw.in_flight("a:8b") == 2 and gw.waiting("a:8b") == 1)
        assert h.models.status("a:8b").in_use == 2
        release.set()
        await asyncio.gather(*holders)
        assert gw.in_flight("a:8b") == 0 and gw.waiting() == 0
        assert h.models.status("a:8b").in_use == 0 and fake.loads_of("a:8b") == 1
