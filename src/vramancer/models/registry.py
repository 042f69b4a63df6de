"""The registry of managed models and profiles (checked across sections by ``Settings``).

``[[models]]`` gives the models; ``[profiles.NAME]`` maps model names to placements; the
built-in profiles are the usual execution modes of a VLM beside a CLIP model, from
``[gpu_manager] vlm_model`` and ``clip_model``:

* ``idle`` - nothing needs the GPU: the VLM and CLIP are unloaded;
* ``recording`` - the VLM on the GPU, CLIP on the CPU;
* ``autopilot`` - the VLM unloaded, CLIP on the GPU when more than
  ``vram_threshold_for_clip_gpu`` (1 GiB) is free, else on the CPU.

They exist whenever ``builtin_profiles`` is on, even before ``[gpu_manager]`` names a model:
then they place nothing, and switching to one is a valid switch that moves nothing (its plan
says why). A profile in the config with a built-in's name replaces it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vramancer.models.settings import GpuManagerSettings
from vramancer.models.types import Placement, PlacementKind

if TYPE_CHECKING:
    from vramancer.config import Settings

IDLE = "idle"
RECORDING = "recording"
AUTOPILOT = "autopilot"


def builtin_profiles(gm: GpuManagerSettings) -> dict[str, dict[str, Placement]]:
    """The built-in modes for the models named in ``[gpu_manager]`` (none when
    ``builtin_profiles`` is off; modes that place nothing when no model is named)."""
    if not gm.builtin_profiles:
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


def empty_profile_note(name: str) -> str:
    """What a plan of a profile that places no model says: nothing moves, and for a built-in
    profile, how to give it models."""
    note = f"profile {name!r} places no model, so nothing moves"
    if name in (IDLE, RECORDING, AUTOPILOT):
        note += (
            "; the built-in profiles place the models named by [gpu_manager] vlm_model and "
            "clip_model (see docs/configuration.md)"
        )
    return note


def all_profiles(settings: Settings) -> dict[str, dict[str, Placement]]:
    """Built-in profiles overlaid with ``[profiles.*]``."""
    profiles = builtin_profiles(settings.gpu_manager)
    for name, mapping in settings.profiles.items():
        profiles[name] = {model: Placement.parse(value) for model, value in mapping.items()}
    if IDLE not in profiles:
        profiles[IDLE] = {}
    return profiles
