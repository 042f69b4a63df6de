"""``[[models]]``, ``[profiles]``, ``[gpu_manager]``: validation that names the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from vramancer.config import Settings
from vramancer.errors import ConfigError
from vramancer.models.registry import all_profiles, builtin_profiles
from vramancer.models.settings import GpuManagerSettings, ModelSpec
from vramancer.models.types import Placement, PlacementKind
from vramancer.units import GIB


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return Settings.load(path, data_dir=tmp_path)


def test_contract_example_loads(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        """
[ollama]
endpoint = "http://127.0.0.1:11434"
[[models]]
name = "qwen3-vl:8b"
backend = "ollama"
vram = "10.5GiB"
idle_timeout_s = 300
priority = "user_facing"
[[models]]
name = "clip"
backend = "torch"
factory = "mypackage.models:load_clip"
vram = "500MiB"
idle_timeout_s = 600
allowed_devices = ["cuda", "gpu:1", "CPU"]
[gpu_manager]
vlm_model = "qwen3-vl:8b"
clip_model = "clip"
[profiles.recording]
"qwen3-vl:8b" = "gpu"
clip = "cpu"
[profiles.autopilot]
"qwen3-vl:8b" = "unloaded"
clip = "gpu_if_free:1GiB"
""",
    )
    assert s.models[0].vram == int(10.5 * GIB)
    assert s.models[1].allowed_devices == ["gpu", "gpu:1", "cpu"]  # canonical forms
    assert s.ollama.retry_interval_s == 30.0
    assert s.gpu_manager.max_load_retries == 3
    assert s.gpu_manager.load_timeout_s == 30.0
    assert s.gpu_manager.unload_timeout_s == 5.0
    assert s.gpu_manager.idle_timeout_s == 300.0
    assert {m.name for m in s.models} == {"qwen3-vl:8b", "clip"}
    profiles = all_profiles(s)
    assert profiles["autopilot"]["clip"] == Placement(PlacementKind.GPU_IF_FREE, GIB)
    assert set(profiles) == {"idle", "recording", "autopilot"}


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[[models]]\nname = "x"\nbackend = "torch"\n', "needs factory"),
        ('[[models]]\nname = "x"\nbackend = "torch"\nfactory = "nocolon"\n', "module:function"),
        ('[[models]]\nname = "x"\nbackend = "process"\n', "needs command and health_url"),
        ('[[models]]\nname = "x"\nbackend = "ollama"\ncommand = ["a"]\n', "are for backend"),
        ('[[models]]\nname = "x"\nbackend = "vllm"\n', "models.0.backend"),
        (
            '[[models]]\nname = "x"\nbackend = "ollama"\nallowed_devices = ["tpu"]\n',
            "models.0.allowed_devices.0",
        ),
        ('[[models]]\nname = "x"\nbackend = "ollama"\npinned_device = "gpu"\n', "name one device"),
        (
            '[[models]]\nname = "x"\nbackend = "ollama"\nflavour = 1\n',
            "models.0.flavour: unknown key",
        ),
        ('[profiles.p]\nx = "somewhere"\n', "profiles.p.x"),
        ("[gpu_manager]\nload_timeout_s = 0\n", "gpu_manager.load_timeout_s"),
        ("[ollama]\nretry_interval_s = -1\n", "ollama.retry_interval_s"),
    ],
)
def test_bad_model_settings_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(tmp_path, toml)


def test_builtin_profiles_follow_seed_002() -> None:
    gm = GpuManagerSettings(vlm_model="v", clip_model="c", vram_threshold_for_clip_gpu=2 * GIB)
    profiles = builtin_profiles(gm)
    assert profiles["recording"] == {
        "v": Placement(PlacementKind.GPU),
        "c": Placement(PlacementKind.CPU),
    }
    assert profiles["autopilot"] == {
        "v": Placement(PlacementKind.UNLOADED),
        "c": Placement(PlacementKind.GPU_IF_FREE, 2 * GIB),
    }
    assert profiles["idle"] == {
        "v": Placement(PlacementKind.UNLOADED),
        "c": Placement(PlacementKind.UNLOADED),
    }
    # Without a VLM or CLIP model named, the built-in modes exist and place nothing.
    assert builtin_profiles(GpuManagerSettings()) == {"idle": {}, "recording": {}, "autopilot": {}}
    assert builtin_profiles(GpuManagerSettings(vlm_model="v", builtin_profiles=False)) == {}


def test_config_profile_replaces_a_builtin(tmp_path: Path) -> None:
    s = Settings(
        data_dir=tmp_path,
        models=[ModelSpec(name="v", backend="ollama"), ModelSpec(name="c", backend="ollama")],
        gpu_manager={"vlm_model": "v", "clip_model": "c"},
        profiles={"recording": {"v": "cuda:0"}},
    )
    profiles = all_profiles(s)
    assert profiles["recording"] == {"v": Placement(PlacementKind.DEVICE, device_index=0)}
    assert "autopilot" in profiles


def test_models_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRM_OLLAMA__ENDPOINT", "http://ollama.lan:11434")
    monkeypatch.setenv("VRM_GPU_MANAGER__IDLE_TIMEOUT_S", "42")
    s = Settings.load(None, data_dir=tmp_path)
    assert s.ollama.endpoint == "http://ollama.lan:11434"
    assert s.gpu_manager.idle_timeout_s == 42.0


def test_keep_alive_is_what_ollamas_decoder_accepts(tmp_path: Path) -> None:
    """Ollama parses a string keep_alive with Go's time.ParseDuration, which refuses "-1"
    (no unit): a number-only string becomes that number; a duration keeps its units."""
    s = load(
        tmp_path,
        '[ollama]\nkeep_alive = "-1"\n'
        '[[models]]\nname = "a"\nbackend = "ollama"\nkeep_alive = "10m"\n'
        '[[models]]\nname = "b"\nbackend = "ollama"\nkeep_alive = "300"\n',
    )
    assert s.ollama.keep_alive == -1
    assert [m.keep_alive for m in s.models] == ["10m", 300]
    assert Settings().ollama.keep_alive == -1
    for bad in ('"soon"', '"1d"', "true"):
        with pytest.raises(ConfigError, match="keep_alive"):
            load(tmp_path, f"[ollama]\nkeep_alive = {bad}\n")
