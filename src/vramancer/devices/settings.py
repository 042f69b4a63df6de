"""Settings of the ``[devices]`` section."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from vramancer.units import Size, format_size

#: Real vendors the device manager can probe.
RealBackendName = Literal["nvidia", "amd", "apple"]
ALL_REAL_BACKENDS: tuple[RealBackendName, ...] = ("nvidia", "amd", "apple")


class SimulatedDevice(BaseModel):
    """A GPU declared in config for demos and tests (``[[devices.simulated]]``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    memory: Size
    #: Memory already in use on the simulated device at start.
    used: Size = 0
    utilization: float = Field(default=0.0, ge=0.0, le=1.0)
    temperature_celsius: float = 40.0

    @model_validator(mode="after")
    def _used_fits(self) -> SimulatedDevice:
        if self.memory <= 0:
            raise ValueError(f"memory must be more than 0 bytes (got {self.memory})")
        if self.used > self.memory:
            raise ValueError(
                f"used ({format_size(self.used)}) must not be more than memory "
                f"({format_size(self.memory)})"
            )
        return self


class DevicesSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    poll_interval_s: float = Field(default=1.0, gt=0, le=3600)
    #: Which real vendors to probe; simulated devices are always added.
    backends: list[RealBackendName] = Field(default_factory=lambda: list(ALL_REAL_BACKENDS))
    simulated: list[SimulatedDevice] = Field(default_factory=list)
    #: VRAM monitor: a callback fires when free memory moves by more than this.
    vram_change_threshold: Size = 100 * 1024 * 1024

    @model_validator(mode="after")
    def _unique_names(self) -> DevicesSettings:
        names = [d.name for d in self.simulated]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"simulated device names must be unique (repeated: {repeated})")
        return self
