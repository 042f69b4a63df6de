"""GPU tiers (L1 VRAM, L3 pinned host): real CUDA tensors; run wherever an NVIDIA GPU is."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit.memory.store_support import StoreKit, make_settings
from vramancer.memory.settings import TierSettings

pytestmark = pytest.mark.gpu

MIB = 1024 * 1024


@pytest.fixture
def kit(tmp_path: Path) -> StoreKit:
    settings = make_settings(l4=64 * MIB, l5=128 * MIB, l6=256 * MIB)
    settings.tiers["L1"] = TierSettings(capacity=64 * MIB)
    settings.tiers["L3"] = TierSettings(capacity=64 * MIB)
    return StoreKit(tmp_path / "data", settings)


def test_gpu_tiers_are_present(kit: StoreKit) -> None:
    tiers = kit.store.tiers
    assert tiers[0] == "L1" and "L3" in tiers and tiers[-3:] == ["L4", "L5", "L6"]


DATA: dict[str, Callable[[], object]] = {
    "bytes": lambda: (
        np.random.default_rng(0).integers(0, 256, 3 * MIB + 5, dtype=np.uint8).tobytes()
    ),
    "numpy": lambda: np.random.default_rng(1).standard_normal((256, 513)).astype(np.float32),
    "torch-cpu": lambda: torch.randn(1024, 1000).to(torch.bfloat16),
    "torch-cuda": lambda: torch.randn(64, 64, device="cuda").to(torch.float16),
}


@pytest.mark.parametrize("name", sorted(DATA))
def test_round_trip_through_l1_and_l3(kit: StoreKit, name: str) -> None:
    data = DATA[name]()
    store = kit.store
    expected = data.cpu().clone() if isinstance(data, torch.Tensor) else data
    store.put("b", data)
    for tier in ("L1", "L3", "L4", "L5", "L6", "L3", "L1"):
        current = store.locate("b")
        if current != tier:
            moved = store.promote("b", tier) if _faster(tier, current) else store.demote("b", tier)
            assert moved == tier
        assert store.locate("b") == tier
        got = store.get("b")
        if isinstance(expected, torch.Tensor):
            assert isinstance(got, torch.Tensor)
            assert got.is_cuda == (tier == "L1")
            assert torch.equal(got.cpu(), expected)
        elif isinstance(expected, np.ndarray):
            assert (got == expected).all() and got.dtype == expected.dtype
        else:
            assert got == expected
    kit.check_invariants()


def _faster(tier: str, than: str) -> bool:
    return tier < than  # "L1" < "L3" < ... < "L6"


def test_l1_pressure_demotes_to_l3(kit: StoreKit) -> None:
    store = kit.store
    store.set_capacity("L1", 8 * MIB)
    blocks = {f"g{i}": torch.full((MIB,), i, dtype=torch.uint8) for i in range(12)}
    for key, value in blocks.items():
        store.put(key, value)
        kit.check_invariants()
    for key, value in blocks.items():
        assert torch.equal(store.get(key).cpu(), value)
    assert any(store.locate(k) != "L1" for k in blocks)
