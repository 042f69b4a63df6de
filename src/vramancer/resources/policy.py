"""Pure resource policies: can a model be loaded, and which quantization to use.

No I/O here: every function takes a frozen snapshot or :class:`PlatformFacts` and returns a
decision record ("no room" is a value, not an exception), so each branch is unit-tested and the
orchestrator only gathers inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vramancer.devices.ids import DeviceId
from vramancer.devices.types import GpuSnapshot, SystemSnapshot
from vramancer.resources.platform import PlatformFacts
from vramancer.units import format_size

#: MLX is chosen when available memory > required (f16) × this: its quantized conversions
#: need well under the f16 size.
MLX_MEMORY_FACTOR = 0.8
#: On a GPU, int8 when free memory > required (f16) × this (int8 weights are about half of
#: f16, plus room for the KV cache), else int4.
CUDA_INT8_FACTOR = 0.6
#: Model families mlx-lm runs (names are matched case-insensitively inside the model id).
MLX_FAMILIES = (
    "mlx", "llama", "mistral", "mixtral", "qwen", "phi", "gemma", "starcoder", "deepseek",
    "olmo", "internlm", "minicpm", "cohere", "stablelm",
)  # fmt: skip
#: llama.cpp Metal defaults per Apple chip generation (later chips offload more layers).
METAL_GPU_LAYERS = {"M1": 24, "M2": 32}
METAL_GPU_LAYERS_LATER = 48  # M3, M4 and later; also offload_kqv


@dataclass(frozen=True, slots=True)
class LoadDecision:
    """Whether a model of ``required_bytes`` fits now, where, and why (or why not).

    Truthy when it fits (``if orchestrator.can_load_model(...)`` reads naturally) and
    unpacks as ``can_load, reason = ...``.
    """

    can_load: bool
    reason: str
    required_bytes: int
    #: ``gpu:N`` (the GPU's public name) or ``cpu``; None when it fits nowhere.
    device: str | None = None
    device_index: int | None = None
    #: Room left under the threshold on the chosen (or, when refused, the roomiest) device.
    available_bytes: int = 0

    def __bool__(self) -> bool:
        return self.can_load

    def __iter__(self) -> Iterator[Any]:
        return iter((self.can_load, self.reason))

    def as_dict(self) -> dict[str, Any]:
        return {
            "can_load": self.can_load,
            "reason": self.reason,
            "required_bytes": self.required_bytes,
            "device": self.device,
            "device_index": self.device_index,
            "available_bytes": self.available_bytes,
        }


def gpu_headroom(gpu: GpuSnapshot, threshold: float) -> int:
    """Bytes that can still be used before the GPU passes ``threshold`` of its memory."""
    return int(gpu.memory_total_bytes * threshold) - gpu.memory_used_bytes


def host_headroom(snapshot: SystemSnapshot, threshold: float) -> int:
    """Bytes of host RAM usable before usage passes ``threshold`` (used = total - available)."""
    host = snapshot.host
    used = host.memory_total_bytes - host.memory_available_bytes
    return int(host.memory_total_bytes * threshold) - used


def _device_name(gpu: GpuSnapshot) -> str:
    """A GPU's public name (``gpu:N``), the same in every answer; simulated or not, NVIDIA,
    AMD or Apple (the snapshot's ``torch_device`` keeps torch's own form)."""
    return str(DeviceId.gpu(gpu.index))


def decide_can_load(
    snapshot: SystemSnapshot,
    required_bytes: int,
    *,
    memory_threshold: float,
    gpu_memory_threshold: float,
) -> LoadDecision:
    """Whether a model fits now (``can_load_model``): the roomiest GPU if the model keeps it under
    ``gpu_memory_threshold``, else host RAM if it keeps it under ``memory_threshold``.

    Monotone: a larger model never fits where a smaller one did not, and more free memory
    never turns a yes into a no.
    """
    need = format_size(required_bytes)
    gpus = sorted(
        (g for g in snapshot.gpus if g.error is None),
        key=lambda g: (-gpu_headroom(g, gpu_memory_threshold), g.index),
    )
    best = gpus[0] if gpus else None
    best_room = gpu_headroom(best, gpu_memory_threshold) if best else 0
    if best is not None and required_bytes <= best_room:
        return LoadDecision(
            True,
            f"fits on GPU {best.index} ({best.name}): {need} needed, {format_size(best_room)} "
            f"usable under the {gpu_memory_threshold:.0%} GPU memory threshold",
            required_bytes,
            device=_device_name(best),
            device_index=best.index,
            available_bytes=best_room,
        )
    host_room = host_headroom(snapshot, memory_threshold)
    if required_bytes <= host_room:
        where = "no GPU" if best is None else f"no GPU has room ({format_size(best_room)} at best)"
        return LoadDecision(
            True,
            f"fits in host RAM on the CPU ({where}): {need} needed, {format_size(host_room)} "
            f"usable under the {memory_threshold:.0%} memory threshold",
            required_bytes,
            device="cpu",
            available_bytes=host_room,
        )
    gpu_part = (
        f"the roomiest GPU ({best.index}, {best.name}) has {format_size(max(0, best_room))} "
        f"usable under the {gpu_memory_threshold:.0%} threshold; "
        if best is not None
        else ""
    )
    return LoadDecision(
        False,
        f"not enough memory: {need} needed; {gpu_part}host RAM has "
        f"{format_size(max(0, host_room))} usable under the {memory_threshold:.0%} threshold",
        required_bytes,
        available_bytes=max(0, best_room, host_room),
    )


@dataclass(frozen=True, slots=True)
class Recommendation:
    """A quantization method and why, plus llama.cpp Metal defaults on Apple Silicon."""

    method: str
    reason: str
    #: ``apple_silicon``, ``gpu`` or ``cpu``: which rule set applied.
    platform: str
    #: The model's full-precision (f16) need, when known: what the rules compare with.
    required_bytes: int | None = None
    available_bytes: int | None = None
    n_gpu_layers: int | None = None
    offload_kqv: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "reason": self.reason,
            "platform": self.platform,
            "required_bytes": self.required_bytes,
            "available_bytes": self.available_bytes,
            "n_gpu_layers": self.n_gpu_layers,
            "offload_kqv": self.offload_kqv,
        }


def is_mlx_compatible(model_id: str) -> bool:
    """An MLX conversion exists for this family (``mlx-community/...`` or a known family)."""
    lowered = model_id.lower()
    return any(family in lowered for family in MLX_FAMILIES)


def is_gguf_model(model_id: str) -> bool:
    """The model is distributed as GGUF (``...-GGUF`` repositories, ``.gguf`` files)."""
    return "gguf" in model_id.lower()


def metal_defaults(chip: str | None) -> tuple[int, bool]:
    """llama.cpp Metal settings per chip: M1 24 GPU layers, M2 32, M3/M4 and later 48 with
    ``offload_kqv``. An unrecognised chip gets the M1 values (the safe side)."""
    if chip in METAL_GPU_LAYERS:
        return METAL_GPU_LAYERS[chip], False
    if chip is None or not chip[1:].isdigit():
        return METAL_GPU_LAYERS["M1"], False
    return METAL_GPU_LAYERS_LATER, True


def recommend_quantization(
    facts: PlatformFacts,
    model_id: str,
    *,
    required_bytes: int | None,
    gguf: bool = False,
) -> Recommendation:
    """The quantization advice for ``model_id`` on the machine ``facts`` describes."""
    gguf = gguf or is_gguf_model(model_id)
    if facts.is_apple_silicon:
        return _recommend_apple(facts, model_id, required_bytes, gguf)
    if facts.cuda_available or facts.gpu_total_bytes > 0:
        return _recommend_gpu(facts, required_bytes)
    return Recommendation(
        "q4_k_m",
        "no GPU: a GGUF q4_k_m model run by llama.cpp on the CPU balances speed and quality",
        "cpu",
        required_bytes=required_bytes,
        available_bytes=facts.host_available_bytes,
    )


def _recommend_apple(
    facts: PlatformFacts, model_id: str, required: int | None, gguf: bool
) -> Recommendation:
    available = (
        facts.gpu_free_bytes
        if facts.has_mps and facts.gpu_vendor == "apple"
        else facts.host_available_bytes
    )
    layers, kqv = metal_defaults(facts.chip)
    chip = facts.chip or "Apple Silicon"

    def rec(method: str, reason: str) -> Recommendation:
        return Recommendation(method, reason, "apple_silicon", required, available, layers, kqv)

    if facts.mlx_available and is_mlx_compatible(model_id):
        if required is None:
            return rec("mlx", f"MLX 4-bit is optimal on {chip} (model size unknown)")
        if available > required * MLX_MEMORY_FACTOR:
            return rec(
                "mlx",
                f"MLX 4-bit is optimal on {chip}: {format_size(available)} available > "
                f"{MLX_MEMORY_FACTOR} × {format_size(required)} required",
            )
    if facts.coreml_available:
        return rec("coreml", f"Core ML is available on {chip}")
    if gguf:
        return rec("q4_k_m", f"GGUF model with llama.cpp on Metal ({chip}): q4_k_m balances "
                   "performance and quality")  # fmt: skip
    return rec("int8", f"default on {chip} without MLX, Core ML or a GGUF build")


def _recommend_gpu(facts: PlatformFacts, required: int | None) -> Recommendation:
    vendor = "simulated" if facts.gpu_simulated else facts.gpu_vendor
    label = f"{vendor} GPU" if vendor else "GPU"
    free = facts.gpu_free_bytes
    if required is None:
        return Recommendation(
            "int8",
            f"{label}: model size unknown (give params or a file); int8 is the balanced choice",
            "gpu",
            None,
            free,
        )
    if free > required * CUDA_INT8_FACTOR:
        return Recommendation(
            "int8",
            f"{label}: {format_size(free)} free > {CUDA_INT8_FACTOR} × {format_size(required)} "
            "required, int8 keeps quality",
            "gpu",
            required,
            free,
        )
    return Recommendation(
        "int4",
        f"{label}: {format_size(free)} free ≤ {CUDA_INT8_FACTOR} × {format_size(required)} "
        "required, int4 saves memory",
        "gpu",
        required,
        free,
    )
