"""Settings of the ``[devices]`` section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from vramancer.units import Size


class SimulatedDevice(BaseModel):
    """A GPU declared in config for demos and tests (``[[devices.simulated]]``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    memory: Size
    #: Memory already in use on the simulated device at start.
    used: Size = 0
    utilization: float = Field(default=0.0, ge=0.0, le=1.0)
    temperature_celsius: float = 40.0


class DevicesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    poll_interval_s: float = Field(default=1.0, gt=0, le=3600)
    #: Which real vendors to probe; simulated devices are always added.
    backends: list[str] = Field(default_factory=lambda: ["nvidia", "amd", "apple"])
    simulated: list[SimulatedDevice] = Field(default_factory=list)
    #: VRAM monitor: a callback fires when free memory moves by more than this.
    vram_change_threshold: Size = 100 * 1024 * 1024
