"""The registry of managed models and profiles, checked across sections.

``[[models]]`` gives the models; ``[profiles.NAME]`` maps model names to placements; the
built-in profiles reproduce seed 002's execution modes from ``[gpu_manager] vlm_model`` and
``clip_model``:

* ``idle`` - nothing needs the GPU: the VLM and CLIP are unloaded;
* ``recording`` - the VLM on the GPU, CLIP on the CPU;
* ``autopilot`` - the VLM unloaded, CLIP on the GPU when more than
  ``vram_threshold_for_clip_gpu`` (1 GiB) is free, else on the CPU.

A profile in the config with a built-in's name replaces it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vramancer.errors import ConfigError
from vramancer.models.settings import GpuManagerSettings, ModelSpec
from vramancer.models.types import Placement, PlacementKind

if TYPE_CHECKING:
    from vramancer.config import Settings

IDLE = "idle"
RECORDING = "recording"
AUTOPILOT = "autopilot"


def builtin_profiles(gm: GpuManagerSettings) -> dict[str, dict[str, Placement]]:
    """Seed 002's modes for the models named in ``[gpu_manager]`` (empty when none is)."""
    if not gm.builtin_profiles or (gm.vlm_model is None and gm.clip_model is None):
        return {}
    idle: dict[str, Placement] = {}
    recording: dict[str, Placement] = {}
    autopilot: dict[str, Placement] = {}
    if gm.vlm_model is not None:
        idle[gm.vlm_model] = Placement(PlacementKind.UNLOADED)
        recording[gm.vlm_model] = Placement(PlacementKind.GPU)
        autopilot[gm.vlm_model] = Placement(PlacementKind.UNLOADED)
    if gm.clip_model is not None:
        idle[gm.clip_model] = Placement(PlacementKind.UNLOADED)
        recording[gm.clip_model] = Placement(PlacementKind.CPU)
        autopilot[gm.clip_model] = Placement(
            PlacementKind.GPU_IF_FREE, min_free_bytes=gm.vram_threshold_for_clip_gpu
        )
    return {IDLE: idle, RECORDING: recording, AUTOPILOT: autopilot}


def all_profiles(settings: Settings) -> dict[str, dict[str, Placement]]:
    """Built-in profiles overlaid with ``[profiles.*]``."""
    profiles = builtin_profiles(settings.gpu_manager)
    for name, mapping in settings.profiles.items():
        profiles[name] = {model: Placement.parse(value) for model, value in mapping.items()}
    if IDLE not in profiles:
        profiles[IDLE] = {}
    return profiles


def validate_model_settings(settings: Settings) -> dict[str, ModelSpec]:
    """Check what one section cannot check alone; ``ConfigError`` names the key."""
    specs: dict[str, ModelSpec] = {}
    problems: list[str] = []
    for i, spec in enumerate(settings.models):
        if spec.name in specs:
            problems.append(f"models.{i}.name: {spec.name!r} is declared twice")
        specs[spec.name] = spec
    known = ", ".join(sorted(specs)) or "none"
    gm = settings.gpu_manager
    for key in ("vlm_model", "clip_model"):
        value = getattr(gm, key)
        if value is not None and value not in specs:
            problems.append(
                f"gpu_manager.{key}: {value!r} is not a configured model (models: {known})"
            )
    for profile, mapping in settings.profiles.items():
        for model, value in mapping.items():
            found = specs.get(model)
            if found is None:
                problems.append(
                    f"profiles.{profile}.{model}: not a configured model (models: {known})"
                )
            elif (
                Placement.parse(value).kind is PlacementKind.CPU
                and "cpu" not in found.allowed_devices
            ):
                problems.append(
                    f"profiles.{profile}.{model}: 'cpu', but the model's allowed_devices "
                    f"{found.allowed_devices} exclude it"
                )
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    profiles = all_profiles(settings)
    if gm.initial_profile is not None and gm.initial_profile not in profiles:
        raise ConfigError(
            f"invalid configuration:\n  gpu_manager.initial_profile: {gm.initial_profile!r} is "
            f"not a profile (profiles: {', '.join(sorted(profiles))})"
        )
    return specs
