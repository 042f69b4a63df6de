"""``[arbiter]`` settings: defaults, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vramancer.arbiter.settings import DEFAULT_MIN_QUALITY, ArbiterSettings
from vramancer.arbiter.types import WorkloadType
from vramancer.config import Settings
from vramancer.errors import ConfigError
from vramancer.units import GIB


def test_defaults_follow_seed_003() -> None:
    settings = ArbiterSettings()
    assert settings.budget is None
    assert settings.usable_fraction == 0.9
    assert settings.min_qualities()[WorkloadType.LLM] == 0.4
    assert settings.min_qualities()[WorkloadType.IMAGE] == 0.3
    assert settings.min_qualities()[WorkloadType.VIDEO] == 0.3
    assert set(settings.min_qualities()) == set(WorkloadType) == set(DEFAULT_MIN_QUALITY)


def test_toml_overrides_one_type_and_keeps_the_others(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[arbiter]\nbudget = "20GiB"\n[arbiter.min_quality]\nllm = 0.6\n')
    settings = Settings.load(config, data_dir=tmp_path).arbiter
    assert settings.budget == 20 * GIB
    assert settings.min_qualities()[WorkloadType.LLM] == 0.6
    assert settings.min_qualities()[WorkloadType.IMAGE] == 0.3


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("[arbiter.min_quality]\nllm = 1.5\n", "min_quality"),
        ("[arbiter.min_quality]\nchat = 0.5\n", "min_quality"),
        ("[arbiter]\nusable_fraction = 0\n", "usable_fraction"),
        ("[arbiter]\nbudgett = 1\n", "budgett"),
        ('[arbiter]\nbudget = "lots"\n', "budget"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, toml: str, needle: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    with pytest.raises(ConfigError, match=needle):
        Settings.load(config, data_dir=tmp_path)
