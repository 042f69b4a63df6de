"""ResourceOrchestrator over a real DeviceManager with simulated devices."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests.promtext import metric_value
from tests.unit.resources.ggufutil import write_llama_gguf
from vramancer.clock import ManualClock
from vramancer.devices.manager import DeviceManager
from vramancer.devices.settings import DevicesSettings
from vramancer.errors import InvalidInput
from vramancer.events import EventBus
from vramancer.observability.metrics import Metrics
from vramancer.resources.actions import ModelAction, ModelActionKind
from vramancer.resources.orchestrator import ResourceOrchestrator, release_caches
from vramancer.resources.platform import PlatformFacts
from vramancer.resources.ports import ModelsOptimizer
from vramancer.resources.settings import ResourcesSettings

GIB = 1024**3


def build(
    simulated: list[dict[str, Any]] | None = None,
    facts: PlatformFacts | None = None,
    models: ModelsOptimizer | None = None,
    **res: Any,
) -> ResourceOrchestrator:
    devices = DeviceManager(
        DevicesSettings(backends=[], simulated=simulated or []),
        events=EventBus(),
        metrics=Metrics(node="n1"),
        clock=ManualClock(),
    )
    return ResourceOrchestrator(
        ResourcesSettings(**res),
        devices,
        metrics=devices.metrics,
        models=models,
        platform_facts=facts,
    )


def test_check_resources_reports_host_and_gpus_from_the_cached_snapshot() -> None:
    orch = build([{"name": "sim0", "memory": "24GiB", "used": "22GiB"}])
    report = orch.check_resources()
    assert report["node"] == "n1" and report["cpu_only"] is False
    (g,) = report["gpus"]
    assert (g["uuid"], g["backend"], g["simulated"]) == ("sim-sim0", "simulated", True)
    assert g["memory_used_ratio"] == pytest.approx(22 / 24, abs=1e-4)
    assert g["over_threshold"] is True and report["needs_optimization"] is True
    assert report["thresholds"] == {"memory_threshold": 0.8, "gpu_memory_threshold": 0.85}
    assert report["memory"]["total_bytes"] > 0
    assert orch.check_resources() is report  # same snapshot: not rebuilt
    orch.devices.adjust_simulated(0, -20 * GIB)
    fresh = orch.check_resources()
    assert fresh is not report and fresh["gpus"][0]["over_threshold"] is False


def test_custom_thresholds_apply() -> None:
    orch = build([{"name": "s", "memory": "10GiB"}], gpu_memory_threshold=0.5)
    assert orch.can_load_model("m", 5 * 1024).device == "gpu:0"
    decision = orch.can_load_model("m", 5 * 1024 + 1)
    assert decision.device != "gpu:0"


def test_can_load_model_in_mib_and_counts_answers() -> None:
    orch = build([{"name": "sim0", "memory": "24GiB"}])
    yes = orch.can_load_model("mistral-7b", 14000)
    assert yes.can_load and yes.device == "gpu:0" and yes.required_bytes == 14000 * 1024**2
    host_bytes = orch.devices.snapshot().host.memory_total_bytes
    no = orch.can_load_model("huge", (host_bytes + 30 * GIB) / 1024**2)
    assert not no.can_load
    assert no.as_dict()["can_load"] is False and "not enough memory" in no.reason
    m = orch.get_metrics()
    assert (m["can_load_checks_total"], m["can_load_refusals_total"]) == (2, 1)
    text = orch.metrics.render()
    assert metric_value(text, "vramancer_resources_can_load_checks_total", result="no") == 1


@pytest.mark.parametrize("size", [-1, float("nan"), float("inf"), 1e30])
def test_can_load_model_refuses_bad_sizes(size: float) -> None:
    with pytest.raises(InvalidInput, match="estimated_size_mb"):
        build().can_load_model("m", size)


def test_can_load_model_refuses_an_empty_model_id() -> None:
    with pytest.raises(InvalidInput, match="model_id"):
        build().can_load_model("  ", 1)


NVIDIA_80 = PlatformFacts(cuda_available=True, gpu_free_bytes=10 * 1024**3,
                          gpu_total_bytes=80 * 1024**3, gpu_vendor="nvidia")  # fmt: skip


def test_recommend_takes_the_size_from_params_then_the_model_id() -> None:
    orch = build(facts=NVIDIA_80)
    small = orch.recommend_quantization_method("whatever", params="3B")
    assert small.method == "int8" and small.required_bytes is not None
    big = orch.recommend_quantization_method("whatever", params="70B")
    assert big.method == "int4"
    assert orch.recommend_quantization_method("Llama-3-70B").method == "int4"
    unknown = orch.recommend_quantization_method("clip")
    assert unknown.required_bytes is None and unknown.method == "int8"
    with pytest.raises(InvalidInput, match="params"):
        orch.recommend_quantization_method("m", params="lots")


def test_recommend_reads_a_gguf_file(tmp_path: Path) -> None:
    path = write_llama_gguf(tmp_path / "tiny.gguf")
    apple = PlatformFacts(is_apple_silicon=True, chip="M1", host_available_bytes=GIB)
    rec = build(facts=apple).recommend_quantization_method("my-model", file=path)
    assert rec.method == "q4_k_m"  # a GGUF file on Metal without MLX or Core ML
    assert rec.n_gpu_layers == 24
    with pytest.raises(InvalidInput, match="no such file"):
        build(facts=apple).recommend_quantization_method("m", file=tmp_path / "nope.gguf")


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-Apple path")
def test_recommend_on_this_machine_without_injected_facts() -> None:
    orch = build()  # no GPU, not a Mac (this CI machine)
    rec = orch.recommend_quantization_method("llama-7b")
    assert (rec.method, rec.platform) == ("q4_k_m", "cpu")


FAILED, SWITCHED = ModelActionKind.FAILED, ModelActionKind.SWITCHED
UNLOADED_CLIP = ModelAction(
    ModelActionKind.UNLOADED, "clip", "unloaded clip from cuda:0 (idle, 500.0 MiB)"
)


class FakeModels:
    def __init__(self, actions: list[ModelAction]) -> None:
        self.actions = actions
        self.calls = 0

    async def optimize(self) -> list[ModelAction]:
        self.calls += 1
        return self.actions


async def test_optimize_runs_gc_and_asks_the_model_manager() -> None:
    models = FakeModels([UNLOADED_CLIP, ModelAction(SWITCHED, "qwen", "switched qwen to q4")])
    orch = build([{"name": "sim0", "memory": "24GiB"}], models=models)
    result = await orch.optimize_resources()
    assert set(result) >= {"optimized", "actions_taken", "memory_before", "memory_after"}
    assert result["actions_taken"][0].startswith("gc: collected")
    assert result["actions_taken"][-2:] == [str(a) for a in models.actions]
    assert result["optimized"] is True  # a model was unloaded
    assert models.calls == 1
    for key in ("process_rss_bytes", "host_used_bytes", "gpu_used_bytes"):
        assert isinstance(result["memory_before"][key], int)
    metrics = orch.get_metrics()
    assert metrics["optimizations_total"] == 1 and metrics["models_unloaded_total"] == 1
    text = orch.metrics.render()
    assert metric_value(text, "vramancer_resources_optimizations_total", node="n1") == 1


def _fixed_memory(orch: ResourceOrchestrator, rss_before: int, rss_after: int) -> None:
    """Replace the RSS readings around optimize (the real ones move by a few pages)."""
    readings = iter((rss_before, rss_after))

    async def state() -> dict[str, int]:
        return {"process_rss_bytes": next(readings), "host_used_bytes": 0,
                "host_available_bytes": 0, "gpu_used_bytes": 0}  # fmt: skip

    orch._memory_state = state  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("freed", "model_actions", "optimized", "unloaded"),
    [
        (4096, [], False, 0),  # page-sized RSS noise is not an optimisation
        (2 * 1024 * 1024, [], True, 0),
        (0, [ModelAction(FAILED, "clip", "could not optimize clip: refused to unload")], False, 0),
        (0, [UNLOADED_CLIP], True, 1),
        (0, [ModelAction(SWITCHED, "qwen", "switched qwen to qwen:q4 on cuda:0")], True, 0),
    ],
)
async def test_optimized_means_something_was_freed_or_done(
    freed: int, model_actions: list[ModelAction], optimized: bool, unloaded: int
) -> None:
    orch = build([{"name": "sim0", "memory": "24GiB"}], models=FakeModels(model_actions))
    _fixed_memory(orch, 100 * 1024 * 1024, 100 * 1024 * 1024 - freed)
    result = await orch.optimize_resources()
    assert result["optimized"] is optimized
    assert result["reclaimed_bytes"]["host"] == freed
    assert orch.get_metrics()["models_unloaded_total"] == unloaded


async def test_optimize_without_a_model_manager() -> None:
    orch = build()  # no models (the CLI's local reading): only the caches are released
    result = await orch.optimize_resources()
    assert all(not a.startswith("unload") for a in result["actions_taken"])
    assert isinstance(result["optimized"], bool)


def test_release_caches_touches_torch_only_when_already_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    actions = release_caches()
    assert actions[0].startswith("gc: collected")
    assert "torch" not in sys.modules
    assert not any(a.startswith("torch") for a in actions)


def test_get_metrics_averages_follow_polls() -> None:
    orch = build([{"name": "sim0", "memory": "10GiB"}])
    orch.devices.refresh()
    first = orch.get_metrics()["average_gpu_memory_used_ratio"]
    assert first == 0.0
    orch.devices.set_simulated(0, used_bytes=10 * GIB)
    avg = orch.get_metrics()["average_gpu_memory_used_ratio"]
    assert avg == pytest.approx(0.1)  # EWMA with alpha 0.1 from 0 towards 1
    assert 0.0 < orch.get_metrics()["average_host_memory_used_ratio"] < 1.0
