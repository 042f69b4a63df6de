"""Settings of ``[ollama]``, ``[[models]]``, ``[gpu_manager]`` and ``[profiles.*]``.

Every section forbids unknown keys so a typo stops start-up with a message naming the key.
Cross-section checks (a profile naming a model that is not in ``[[models]]``) happen when the
settings load, in ``Settings``' own validator (``vramancer.config.model_problems``).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from vramancer.models.types import read_device
from vramancer.units import GIB, Size, parse_size

Priority = Literal["background", "normal", "high", "user_facing"]
BackendName = Literal["ollama", "torch", "process"]
WorkloadName = Literal["llm", "image", "video", "embedding", "other"]

_PLACEMENT_FORMS = (
    "'gpu', 'cpu', 'unloaded', 'gpu:N' or 'gpu_if_free:SIZE' (e.g. 'gpu_if_free:1GiB')"
)


def check_device(value: str) -> str:
    """Accept a device name as written in config (``cpu``, ``gpu``, ``cuda``, ``cuda:0``,
    ``gpu:1``) and return its one form: ``cpu``, ``gpu`` (any GPU) or ``gpu:N``."""
    return read_device(value)


def check_placement(value: str) -> str:
    """Accept a profile placement (see ``_PLACEMENT_FORMS``); returns it normalised."""
    text = value.strip().lower()
    if text in ("gpu", "cpu", "unloaded"):
        return text
    if text.startswith("gpu_if_free:"):
        size = value.strip()[len("gpu_if_free:") :]
        try:
            parse_size(size)
        except ValueError:
            raise ValueError(f"expected {_PLACEMENT_FORMS}, got {value!r}") from None
        return "gpu_if_free:" + size.strip()
    try:
        device = read_device(text)
    except ValueError:
        device = "cpu"
    if device != "cpu":
        return device
    raise ValueError(f"expected {_PLACEMENT_FORMS}, got {value!r}")


_GO_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_GO_DURATION_RE = re.compile(rf"[+-]?(?:{_GO_NUMBER}(?:ns|us|µs|μs|ms|s|m|h))+")


def check_keep_alive(value: object) -> str | int:
    """Ollama's ``keep_alive`` as Ollama's JSON decoder takes it: a number of seconds (negative:
    forever) or a Go duration string with units (``"10m"``, ``"1h30m"``, ``"-1m"``). Ollama
    answers 400 ("missing unit in duration") to a string such as ``"-1"``, so a string that is
    only a number is turned into that number here."""
    if isinstance(value, bool):
        raise ValueError(f"expected seconds or a duration such as '10m', got {value!r}")
    if isinstance(value, int | float):
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"expected seconds or a duration such as '10m', got {value!r}")
    text = value.strip()
    try:
        return int(float(text))
    except ValueError:
        pass
    if not _GO_DURATION_RE.fullmatch(text):
        raise ValueError(
            f"expected seconds (-1: until VRAMancer unloads it) or a duration such as '10m', "
            f"'1h30m', got {value!r}"
        )
    return text


DeviceName = Annotated[str, AfterValidator(check_device)]
KeepAlive = Annotated[str | int, BeforeValidator(check_keep_alive)]
PlacementName = Annotated[str, AfterValidator(check_placement)]
#: ``[profiles.NAME]``: model name -> placement.
ProfilesSettings = dict[str, dict[str, PlacementName]]


class OllamaSettings(BaseModel):
    """How VRAMancer talks to Ollama's HTTP API."""

    model_config = ConfigDict(extra="forbid")

    endpoint: str = "http://127.0.0.1:11434"
    #: While Ollama is unreachable (degraded mode), probe it this often.
    retry_interval_s: float = Field(default=30.0, gt=0)
    #: TCP connect timeout of every request.
    connect_timeout_s: float = Field(default=2.0, gt=0)
    #: Timeout of the quick calls (``/api/version``, ``/api/ps``).
    request_timeout_s: float = Field(default=10.0, gt=0)
    #: ``keep_alive`` sent with a load when the model sets none. ``-1``: keep it loaded until
    #: VRAMancer unloads it (VRAMancer's idle reaper decides, not Ollama's 5 minute default).
    keep_alive: KeepAlive = -1


class ModelSpec(BaseModel):
    """One managed model (``[[models]]``)."""

    model_config = ConfigDict(extra="forbid")

    #: Unique name. For Ollama, the model tag Ollama knows (``qwen3-vl:8b``).
    name: str = Field(min_length=1)
    backend: BackendName
    #: Expected VRAM when on a GPU. None: measured at the first load (torch, Ollama's /api/ps).
    vram: Size | None = None
    #: Unload after this long without use. None: ``[gpu_manager] idle_timeout_s``.
    idle_timeout_s: float | None = Field(default=None, gt=0)
    priority: Priority = "normal"
    #: What the arbiter books the memory as. None: llm for Ollama, embedding for torch, else other.
    workload_type: WorkloadName | None = None
    #: torch: ``module:function`` returning an ``nn.Module`` or a pipeline object.
    factory: str | None = None
    #: Where the model may live, in order of preference: ``gpu``, ``gpu:N``, ``cpu``.
    allowed_devices: list[DeviceName] = Field(default_factory=lambda: ["gpu", "cpu"])
    #: Always load on this device (``gpu:N`` or ``cpu``).
    pinned_device: DeviceName | None = None
    #: Never unloaded to make room for another model, by the idle reaper or by optimize.
    never_evict: bool = False
    #: Re-quantized variant used under memory pressure (Ollama tag, or torch factory).
    smaller_variant: str | None = None
    #: VRAM of ``smaller_variant``. None: measured when it loads.
    smaller_variant_vram: Size | None = None
    #: Ollama ``keep_alive`` for loads (``"10m"``, ``-1``). None: ``[ollama] keep_alive``.
    keep_alive: KeepAlive | None = None
    #: process: the command that starts the model server (argv list).
    command: list[str] | None = None
    #: process: environment added to the command's.
    env: dict[str, str] = Field(default_factory=dict)
    #: process: polled until it answers 2xx after a start.
    health_url: str | None = None
    #: None: the ``[gpu_manager]`` defaults.
    load_timeout_s: float | None = Field(default=None, gt=0)
    unload_timeout_s: float | None = Field(default=None, gt=0)
    max_load_retries: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _backend_fields(self) -> ModelSpec:
        if self.backend == "torch" and not self.factory:
            raise ValueError(
                f"model {self.name!r}: backend 'torch' needs factory='module:function'"
            )
        if self.factory is not None and ":" not in self.factory:
            raise ValueError(
                f"model {self.name!r}: factory must be 'module:function', got {self.factory!r}"
            )
        if self.backend == "process" and (not self.command or not self.health_url):
            raise ValueError(f"model {self.name!r}: backend 'process' needs command and health_url")
        if self.backend != "process" and (self.command or self.health_url):
            raise ValueError(f"model {self.name!r}: command/health_url are for backend 'process'")
        if self.backend == "process" and self.smaller_variant:
            raise ValueError(f"model {self.name!r}: smaller_variant is not supported for 'process'")
        if self.pinned_device == "gpu":
            raise ValueError(f"model {self.name!r}: pinned_device must name one device (gpu:N)")
        if not self.allowed_devices:
            raise ValueError(f"model {self.name!r}: allowed_devices cannot be empty")
        return self


class GpuManagerSettings(BaseModel):
    """``[gpu_manager]``: which models play the VLM and CLIP roles, timeouts, swap behaviour."""

    model_config = ConfigDict(extra="forbid")

    #: Managed model that plays the VLM role (built-in profiles, ``/v1/gpu/status``).
    vlm_model: str | None = None
    #: Managed model that plays the CLIP role.
    clip_model: str | None = None
    #: Default idle timeout of every model (5 minutes).
    idle_timeout_s: float = Field(default=300.0, gt=0)
    #: ``autopilot`` puts CLIP on the GPU only when more than this is free.
    vram_threshold_for_clip_gpu: Size = GIB
    #: Loading the VLM onto a GPU first moves CLIP off it to the CPU, even when both would fit:
    #: the VLM is the bigger, user-facing model, and CLIP runs well enough on the CPU.
    clip_yields_to_vlm: bool = True
    max_load_retries: int = Field(default=3, ge=0, le=20)
    load_timeout_s: float = Field(default=30.0, gt=0)
    unload_timeout_s: float = Field(default=5.0, gt=0)
    #: Pause between two attempts of a failed load or unload.
    retry_backoff_s: float = Field(default=0.5, ge=0)
    #: After an unload, wait at most this long for the device's free VRAM to come back.
    vram_recovery_timeout_s: float = Field(default=10.0, ge=0)
    vram_recovery_poll_s: float = Field(default=0.1, gt=0)
    #: A request waiting for a model that is not loaded is served within this, whatever else
    #: is queued (requests are otherwise served grouped by model).
    queue_max_wait_s: float = Field(default=30.0, gt=0)
    #: Background loop period (idle reaper, degraded-mode probe).
    tick_s: float = Field(default=1.0, gt=0)
    #: Profile applied at start. None: nothing is loaded at start; the mode reads ``idle``.
    initial_profile: str | None = None
    #: ``optimize()`` unloads models idle for at least this long.
    optimize_idle_s: float = Field(default=60.0, ge=0)
    #: ``optimize()`` acts on a GPU above this used/total ratio.
    pressure_ratio: float = Field(default=0.85, gt=0, le=1)
    #: Load bandwidth assumed before any load was measured (bytes per second).
    default_load_bandwidth: Size = GIB
    #: Add the built-in ``idle``, ``recording`` and ``autopilot`` profiles.
    builtin_profiles: bool = True
    #: VRAM assumed for a model whose ``vram`` is not configured and not yet measured.
    default_vram: Size = GIB
    #: Unload every loaded model when VRAMancer stops (model-server processes always stop).
    unload_on_stop: bool = True
