"""Extensions from configuration: ``[memory] placement_strategy``, ``hotness_model``,
``compression_manager`` (dotted paths), loaded into a real store."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tests.unit.memory.plugin_support import CountingHotness, SlowestFirst
from tests.unit.memory.store_support import StoreKit, make_settings
from vramancer.config import Settings
from vramancer.errors import InvalidInput
from vramancer.memory.compression import NoCompression
from vramancer.memory.plugins import load_compression, load_object, load_policy
from vramancer.memory.settings import MemorySettings

SUPPORT = "tests.unit.memory.plugin_support"


def memory_settings(**keys: str) -> MemorySettings:
    """``[memory]`` as ``vramancer.config.Settings`` reads it, small tiers and the given keys."""
    base = make_settings().model_dump()
    return Settings(memory={**base, **keys}).memory


def test_a_place_only_strategy_from_a_dotted_path_places_every_block(tmp_path: Path) -> None:
    settings = memory_settings(placement_strategy=f"{SUPPORT}:SlowestFirst")
    kit = StoreKit(tmp_path, settings)
    store = kit.store
    assert store.put("a", b"x" * 100) == "L6"
    assert store.put("b", b"y" * 100, hint="kv") == "L6"
    assert store.get("a") == b"x" * 100  # a first read: nothing to observe on the strategy
    assert store.get("b") == b"y" * 100
    assert store.locate("a") in ("L4", "L5", "L6")
    store.close()


@pytest.mark.parametrize("attr", ["SlowestFirst", "make_strategy", "STRATEGY"])
def test_a_class_is_made_a_factory_called_an_instance_used(attr: str) -> None:
    bundle = load_policy(memory_settings(placement_strategy=f"{SUPPORT}:{attr}"))
    assert isinstance(bundle.placement, SlowestFirst)


def test_a_hotness_model_decides_and_hears_every_hit(tmp_path: Path) -> None:
    settings = memory_settings(hotness_model=f"{SUPPORT}:CountingHotness")
    kit = StoreKit(tmp_path, settings)
    store = kit.store
    store.put("a", b"x" * 100)
    store.get("a")
    store.get("a")
    assert store.info("a")["hotness"] == 2.0
    bundle = load_policy(settings)
    assert isinstance(bundle.scorer, CountingHotness)
    store.close()


def test_a_compression_manager_from_a_dotted_path() -> None:
    manager = load_compression(
        memory_settings(compression_manager="vramancer.memory.compression:NoCompression")
    )
    assert isinstance(manager, NoCompression)
    assert load_compression(MemorySettings()) is None


def test_bad_paths_are_refused_with_the_key_named() -> None:
    with pytest.raises(ValidationError):
        MemorySettings(placement_strategy="no colon here")
    with pytest.raises(InvalidInput, match=r"placement_strategy.*cannot load"):
        load_object(f"{SUPPORT}:Missing", method="place", key="placement_strategy")
    with pytest.raises(InvalidInput, match="cannot load"):
        load_object("no_such_module_xyz:thing", method="place", key="placement_strategy")
    with pytest.raises(InvalidInput, match=r"has no place\(\) method"):
        load_object(f"{SUPPORT}:NOT_A_STRATEGY", method="place", key="placement_strategy")
