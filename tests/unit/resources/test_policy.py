"""can_load (thresholds, device choice, monotonicity) and the quantization advisor's rules."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.resources.snapshots import GIB, gpu, snapshot
from vramancer.devices.apple import AppleFacts
from vramancer.devices.types import DeviceVendor
from vramancer.resources.platform import PlatformFacts, gather_platform_facts
from vramancer.resources.policy import (
    decide_can_load,
    is_gguf_model,
    is_mlx_compatible,
    metal_defaults,
    recommend_quantization,
)

THRESHOLDS = {"memory_threshold": 0.8, "gpu_memory_threshold": 0.85}


def test_fits_on_the_roomiest_gpu_under_its_threshold() -> None:
    snap = snapshot(gpu(0, 24 * GIB, 20 * GIB), gpu(1, 24 * GIB, 4 * GIB))
    decision = decide_can_load(snap, 10 * GIB, **THRESHOLDS)
    assert decision.can_load and bool(decision)
    assert (decision.device, decision.device_index) == ("gpu:1", 1)
    assert decision.available_bytes == int(24 * GIB * 0.85) - 4 * GIB
    assert "GPU 1" in decision.reason and "85%" in decision.reason
    can, reason = decision
    assert can is True and reason == decision.reason


def test_the_gpu_threshold_is_inclusive_and_then_host_ram_is_used() -> None:
    snap = snapshot(gpu(0, 100 * GIB, 0), host_total=110 * GIB, host_available=110 * GIB)
    exactly = int(100 * GIB * 0.85)
    assert decide_can_load(snap, exactly, **THRESHOLDS).device == "gpu:0"
    over = decide_can_load(snap, exactly + 1, **THRESHOLDS)
    assert over.can_load and over.device == "cpu"  # 80% of 110 GiB host RAM = 88 GiB
    assert "no GPU has room" in over.reason
    too_big = decide_can_load(snap, 89 * GIB, **THRESHOLDS)
    assert not too_big.can_load and not bool(too_big)
    assert too_big.device is None
    assert "not enough memory" in too_big.reason and "80%" in too_big.reason


def test_cpu_only_uses_host_ram_under_the_memory_threshold() -> None:
    snap = snapshot(host_total=10 * GIB, host_available=5 * GIB)  # 5 GiB used
    assert decide_can_load(snap, 3 * GIB, **THRESHOLDS).device == "cpu"  # 8 GiB ≤ 80%
    refused = decide_can_load(snap, 3 * GIB + 1, **THRESHOLDS)
    assert not refused.can_load
    assert "GPU" not in refused.reason


def test_gpus_in_error_and_simulated_devices() -> None:
    snap = snapshot(
        gpu(0, 80 * GIB, 0, error="GPU is lost"),
        gpu(1, 24 * GIB, 0, vendor=DeviceVendor.SIMULATED),
        host_available=0,
    )
    decision = decide_can_load(snap, 20 * GIB, **THRESHOLDS)
    assert (decision.device, decision.device_index) == ("gpu:1", 1)
    assert not decide_can_load(snap, 21 * GIB, **THRESHOLDS).can_load


sizes = st.integers(min_value=0, max_value=200 * GIB)
used = st.integers(min_value=0, max_value=48 * GIB)


@settings(max_examples=300, deadline=None)
@given(small=sizes, extra=sizes, gpu_used=used, host_avail=st.integers(0, 64 * GIB))
def test_can_load_is_monotone_in_size(
    small: int, extra: int, gpu_used: int, host_avail: int
) -> None:
    snap = snapshot(gpu(0, 48 * GIB, gpu_used), host_total=64 * GIB, host_available=host_avail)
    if decide_can_load(snap, small + extra, **THRESHOLDS).can_load:
        assert decide_can_load(snap, small, **THRESHOLDS).can_load


@settings(max_examples=300, deadline=None)
@given(
    size=sizes,
    gpu_used=used,
    freed=st.integers(0, 48 * GIB),
    host_avail=st.integers(0, 32 * GIB),
    host_freed=st.integers(0, 32 * GIB),
)
def test_can_load_is_monotone_in_free_memory(
    size: int, gpu_used: int, freed: int, host_avail: int, host_freed: int
) -> None:
    tight = snapshot(gpu(0, 48 * GIB, gpu_used), host_total=64 * GIB, host_available=host_avail)
    roomier = snapshot(
        gpu(0, 48 * GIB, max(0, gpu_used - freed)),
        host_total=64 * GIB,
        host_available=host_avail + host_freed,
    )
    if decide_can_load(tight, size, **THRESHOLDS).can_load:
        assert decide_can_load(roomier, size, **THRESHOLDS).can_load


# -- quantization advice -------------------------------------------------------------------

APPLE = PlatformFacts(
    is_apple_silicon=True,
    chip="M2",
    has_mps=True,
    mlx_available=True,
    coreml_available=True,
    gpu_free_bytes=20 * GIB,
    gpu_total_bytes=24 * GIB,
    gpu_vendor="apple",
    host_available_bytes=10 * GIB,
    host_total_bytes=32 * GIB,
)


def test_apple_mlx_when_compatible_and_memory_allows() -> None:
    rec = recommend_quantization(APPLE, "mlx-community/Mistral-7B", required_bytes=24 * GIB)
    assert rec.method == "mlx" and rec.platform == "apple_silicon"
    assert (rec.n_gpu_layers, rec.offload_kqv) == (32, False)
    assert rec.available_bytes == 20 * GIB  # MPS free memory, not host RAM
    # 20 GiB > 0.8 × 25 GiB is false: falls through to Core ML
    assert recommend_quantization(APPLE, "llama-7b", required_bytes=25 * GIB).method == "coreml"
    assert recommend_quantization(APPLE, "llama", required_bytes=None).method == "mlx"


def test_apple_without_mlx_uses_coreml_then_gguf_q4_k_m_then_int8() -> None:
    no_mlx = PlatformFacts(**{**APPLE.as_dict(), "mlx_available": False})
    assert recommend_quantization(no_mlx, "llama-7b", required_bytes=GIB).method == "coreml"
    bare = PlatformFacts(**{**no_mlx.as_dict(), "coreml_available": False})
    assert recommend_quantization(bare, "TheBloke/Llama-2-7B-GGUF", required_bytes=GIB).method == (
        "q4_k_m"
    )
    assert (
        recommend_quantization(bare, "my-model", required_bytes=GIB, gguf=True).method == "q4_k_m"
    )
    assert recommend_quantization(bare, "whisper-large", required_bytes=GIB).method == "int8"
    # an incompatible family with MLX installed also skips MLX
    only_mlx = PlatformFacts(**{**APPLE.as_dict(), "coreml_available": False})
    assert recommend_quantization(only_mlx, "whisper-large", required_bytes=GIB).method == "int8"


def test_apple_without_mps_compares_against_host_ram() -> None:
    facts = PlatformFacts(**{**APPLE.as_dict(), "has_mps": False, "gpu_vendor": None})
    rec = recommend_quantization(facts, "llama-7b", required_bytes=12 * GIB)
    assert rec.available_bytes == 10 * GIB
    assert rec.method == "mlx"  # 10 GiB > 0.8 × 12 GiB


@pytest.mark.parametrize(
    ("chip", "layers", "kqv"),
    [("M1", 24, False), ("M2", 32, False), ("M3", 48, True), ("M4", 48, True), ("M5", 48, True),
     (None, 24, False)],
)  # fmt: skip
def test_metal_gpu_layer_defaults_per_chip(chip: str | None, layers: int, kqv: bool) -> None:
    assert metal_defaults(chip) == (layers, kqv)
    facts = PlatformFacts(**{**APPLE.as_dict(), "chip": chip})
    rec = recommend_quantization(facts, "llama", required_bytes=None)
    assert (rec.n_gpu_layers, rec.offload_kqv) == (layers, kqv)


def test_nvidia_int8_above_sixty_percent_of_required_else_int4() -> None:
    facts = PlatformFacts(cuda_available=True, gpu_free_bytes=60 * GIB, gpu_total_bytes=80 * GIB,
                          gpu_vendor="nvidia")  # fmt: skip
    assert recommend_quantization(facts, "m", required_bytes=99 * GIB).method == "int8"
    at_boundary = recommend_quantization(facts, "m", required_bytes=100 * GIB)
    assert at_boundary.method == "int4"  # 60 GiB is not more than 0.6 × 100 GiB
    assert at_boundary.platform == "gpu" and at_boundary.n_gpu_layers is None
    assert recommend_quantization(facts, "m", required_bytes=None).method == "int8"


def test_simulated_gpus_follow_the_gpu_rules_and_say_so() -> None:
    facts = PlatformFacts(gpu_free_bytes=GIB, gpu_total_bytes=24 * GIB, gpu_vendor="simulated",
                          gpu_simulated=True)  # fmt: skip
    rec = recommend_quantization(facts, "m", required_bytes=10 * GIB)
    assert rec.method == "int4" and rec.reason.startswith("simulated GPU: ")


def test_cpu_only_gets_gguf_q4_k_m() -> None:
    rec = recommend_quantization(PlatformFacts(host_available_bytes=GIB), "m", required_bytes=GIB)
    assert (rec.method, rec.platform) == ("q4_k_m", "cpu")
    assert rec.as_dict()["method"] == "q4_k_m"


def test_model_id_classifiers() -> None:
    assert is_mlx_compatible("mlx-community/whatever") and is_mlx_compatible("Qwen2.5-7B")
    assert not is_mlx_compatible("openai/whisper-large-v3")
    assert is_gguf_model("TheBloke/Llama-2-7B-GGUF") and is_gguf_model("model.gguf")
    assert not is_gguf_model("meta-llama/Llama-2-7b")


def test_platform_facts_from_a_snapshot() -> None:
    linux = AppleFacts(system="Linux", machine="x86_64", cpu_brand=None, mps_available=False)
    snap = snapshot(
        gpu(0, 24 * GIB, 20 * GIB),
        gpu(1, 24 * GIB, 2 * GIB),
        gpu(2, 80 * GIB, 0, vendor=DeviceVendor.SIMULATED),
    )
    facts = gather_platform_facts(snap, apple=linux)
    assert facts.cuda_available and not facts.is_apple_silicon
    assert (facts.gpu_free_bytes, facts.gpu_vendor) == (22 * GIB, "nvidia")  # real GPUs first
    assert not facts.mlx_available and not facts.coreml_available
    sim_only = gather_platform_facts(snapshot(gpu(0, 8 * GIB, 0, DeviceVendor.SIMULATED)), linux)
    assert not sim_only.cuda_available and sim_only.gpu_simulated
    mac = AppleFacts(system="Darwin", machine="arm64", cpu_brand="Apple M3 Pro", mps_available=True)
    apple = gather_platform_facts(snapshot(), apple=mac)
    assert (apple.is_apple_silicon, apple.chip, apple.has_mps) == (True, "M3", True)
