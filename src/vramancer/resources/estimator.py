"""How much memory a model needs: weights + KV cache + overhead.

* Weights: parameter count × bits per weight (a quantization name maps to bits; GGUF and
  safetensors headers give the exact stored size).
* KV cache: ``2 (K and V) × layers × context × KV heads × head dim × bytes per element ×
  batch``; encoder-only models keep none.
* Overhead: runtime buffers and allocator slack, ``overhead_fixed_bytes + overhead_ratio ×
  weights``.

All functions are pure except :func:`estimate_from_file`, which reads a file header (never the
weights). Unknown quantization names and impossible numbers raise ``InvalidInput``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vramancer.errors import InvalidInput
from vramancer.resources.fileheaders import ModelShape, WeightsInfo, read_weights_info
from vramancer.units import parse_param_count

MIB = 1024 * 1024

#: Average bits per weight, block scales included. llama.cpp's K-quant "_M"/"_S" files mix
#: block types; these are the averages llama.cpp's quantize tool reports for Llama-class models.
QUANT_BITS: dict[str, float] = {
    "f32": 32.0,
    "f16": 16.0,
    "bf16": 16.0,
    "fp8": 8.0,
    "int8": 8.0,
    "q8_0": 8.5,
    "q6_k": 6.5625,
    "q5_k_m": 5.69,
    "q5_k_s": 5.54,
    "q5_1": 6.0,
    "q5_0": 5.5,
    "q4_k_m": 4.85,
    "q4_k_s": 4.58,
    "q4_1": 5.0,
    "q4_0": 4.5,
    "iq4_xs": 4.25,
    "q3_k_l": 4.27,
    "q3_k_m": 3.91,
    "q3_k_s": 3.5,
    "q2_k": 3.35,
    "int4": 4.0,
    #: bitsandbytes NF4 with double-quantized absmax constants.
    "nf4": 4.13,
    #: GPTQ / AWQ 4-bit with group size 128 (f16 scale and zero per group).
    "gptq": 4.25,
    "awq": 4.25,
    #: MLX 4-bit, group size 64, f16 scale and bias per group.
    "mlx": 4.5,
    #: Core ML palettized/linear 8-bit weights.
    "coreml": 8.0,
}
#: Other spellings people use for the same thing.
QUANT_ALIASES: dict[str, str] = {
    "fp32": "f32",
    "float32": "f32",
    "fp16": "f16",
    "float16": "f16",
    "half": "f16",
    "bfloat16": "bf16",
    "8bit": "int8",
    "8_bit": "int8",
    "q8": "q8_0",
    "4bit": "int4",
    "4_bit": "int4",
    "bnb_4bit": "nf4",
    "q4_k": "q4_k_m",
    "q5_k": "q5_k_m",
    "q3_k": "q3_k_m",
    "mlx_4bit": "mlx",
}

#: Context length assumed when none is given (llama.cpp's and Ollama's usual default is
#: 2048-4096; 4096 is the safe side).
DEFAULT_CONTEXT_LENGTH = 4096
DEFAULT_OVERHEAD_RATIO = 0.10
DEFAULT_OVERHEAD_FIXED_BYTES = 128 * MIB

#: Attention shapes assumed when only a parameter count is known: (upper bound on params,
#: layers, attention heads, KV heads, head dim), modelled on Llama 3 / Qwen 2.5 (grouped-query
#: attention with 8 KV heads).
_ASSUMED_SHAPES: tuple[tuple[float, int, int, int, int], ...] = (
    (2e9, 16, 32, 8, 64),
    (5e9, 28, 24, 8, 128),
    (10e9, 32, 32, 8, 128),
    (20e9, 48, 40, 8, 128),
    (40e9, 64, 40, 8, 128),
    (100e9, 80, 64, 8, 128),
    (float("inf"), 126, 128, 8, 128),
)

_PARAMS_IN_NAME = re.compile(r"(?<![\w.])(?:(\d+)x)?(\d+(?:\.\d+)?)([bm])(?![a-z0-9])", re.I)


def normalize_quantization(name: str) -> str:
    """The canonical name (``q4_k_m``) of a quantization, or ``InvalidInput`` listing them."""
    key = name.strip().lower().replace("-", "_")
    key = QUANT_ALIASES.get(key, key)
    if key not in QUANT_BITS:
        known = ", ".join(sorted(QUANT_BITS))
        raise InvalidInput(f"quantization: unknown {name!r}; known: {known}", field="quantization")
    return key


def bits_per_weight(quantization: str) -> float:
    return QUANT_BITS[normalize_quantization(quantization)]


def params_from_model_id(model_id: str) -> int | None:
    """A parameter count read from a model name: ``Mistral-7B-v0.1`` → 7e9,
    ``mixtral-8x7b`` → 56e9, ``gpt2-345m`` → 345e6; the largest if several; None if none."""
    best: int | None = None
    for experts, number, unit in _PARAMS_IN_NAME.findall(model_id):
        value = float(number) * (10**9 if unit.lower() == "b" else 10**6)
        if experts:
            value *= int(experts)
        if value >= 1e6 and (best is None or value > best):
            best = int(value)
    return best


def parse_params(value: str | int) -> int:
    """A parameter count from ``7B`` / ``350M`` / an integer; ``InvalidInput`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool):
        count = value
    else:
        try:
            count = parse_param_count(str(value))
        except ValueError as exc:
            raise InvalidInput(f"params: {exc}", field="params") from None
    if count <= 0:
        raise InvalidInput(f"params: must be more than 0 (got {value!r})", field="params")
    return count


def assumed_shape(params: int) -> ModelShape:
    """A Llama-like attention shape for a model of ``params`` parameters (see the table)."""
    for bound, layers, heads, kv_heads, head_dim in _ASSUMED_SHAPES:
        if params < bound:
            return ModelShape(layers, heads, kv_heads, head_dim, architecture="assumed")
    raise AssertionError("unreachable: the last bound is infinite")  # pragma: no cover


def kv_cache_bytes(
    shape: ModelShape, context_length: int, *, batch: int = 1, kv_bits: float = 16.0
) -> int:
    """Bytes of K and V for ``context_length`` tokens × ``batch`` sequences."""
    if shape.encoder_only:
        return 0
    per_token = 2 * shape.n_layers * shape.n_kv_heads * shape.head_dim * kv_bits / 8
    return int(per_token * context_length * batch)


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """A model's memory need, by part. ``total_bytes`` is what to reserve."""

    params: int
    bits_per_weight: float
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    context_length: int
    #: Where the numbers come from: ``params``, ``gguf`` or ``safetensors``.
    source: str
    quantization: str | None
    shape: ModelShape | None
    #: True when the attention shape was assumed from the parameter count.
    shape_assumed: bool

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.overhead_bytes

    @property
    def total_mb(self) -> float:
        """Total in MiB (the ``estimated_size_mb`` that ``can_load_model`` takes)."""
        return self.total_bytes / MIB

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["total_bytes"] = self.total_bytes
        data["total_mb"] = round(self.total_mb, 1)
        return data


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise InvalidInput(f"{name}: must be more than 0 (got {value!r})", field=name)


def estimate_memory(
    params: int,
    quantization: str = "f16",
    *,
    context_length: int = DEFAULT_CONTEXT_LENGTH,
    shape: ModelShape | None = None,
    batch: int = 1,
    kv_bits: float = 16.0,
    overhead_ratio: float = DEFAULT_OVERHEAD_RATIO,
    overhead_fixed_bytes: int = DEFAULT_OVERHEAD_FIXED_BYTES,
) -> MemoryEstimate:
    """Estimate from a parameter count and a quantization (shape assumed if not given)."""
    _check_positive("params", params)
    _check_positive("context_length", context_length)
    _check_positive("batch", batch)
    quant = normalize_quantization(quantization)
    bits = QUANT_BITS[quant]
    weights = int(params * bits / 8)
    return _finish(
        params, bits, weights, quant, "params", shape, context_length, batch, kv_bits,
        overhead_ratio, overhead_fixed_bytes,
    )  # fmt: skip


def estimate_from_weights(
    info: WeightsInfo,
    *,
    quantization: str | None = None,
    context_length: int | None = None,
    batch: int = 1,
    kv_bits: float = 16.0,
    overhead_ratio: float = DEFAULT_OVERHEAD_RATIO,
    overhead_fixed_bytes: int = DEFAULT_OVERHEAD_FIXED_BYTES,
) -> MemoryEstimate:
    """Estimate from a file header: the stored size, or ``quantization`` if re-quantized.

    ``context_length`` defaults to :data:`DEFAULT_CONTEXT_LENGTH`, capped at what the model was
    trained for.
    """
    if info.params <= 0:
        raise InvalidInput(f"{info.path}: the file holds no tensors", file=info.path)
    if quantization is None:
        quant, weights, bits = info.quantization, info.weights_bytes, info.bits_per_weight
    else:
        quant = normalize_quantization(quantization)
        bits = QUANT_BITS[quant]
        weights = int(info.params * bits / 8)
    ctx = context_length
    if ctx is None:
        trained = info.shape.max_context_length if info.shape else None
        ctx = min(DEFAULT_CONTEXT_LENGTH, trained) if trained else DEFAULT_CONTEXT_LENGTH
    _check_positive("context_length", ctx)
    _check_positive("batch", batch)
    return _finish(
        info.params, bits, weights, quant, info.format, info.shape, ctx, batch, kv_bits,
        overhead_ratio, overhead_fixed_bytes,
    )  # fmt: skip


def estimate_from_file(path: str | Path, **kwargs: Any) -> MemoryEstimate:
    """Read a GGUF / safetensors header (never the weights) and estimate from it."""
    return estimate_from_weights(read_weights_info(path), **kwargs)


def _finish(
    params: int,
    bits: float,
    weights: int,
    quant: str | None,
    source: str,
    shape: ModelShape | None,
    context_length: int,
    batch: int,
    kv_bits: float,
    overhead_ratio: float,
    overhead_fixed_bytes: int,
) -> MemoryEstimate:
    assumed = shape is None
    used_shape = shape if shape is not None else assumed_shape(params)
    return MemoryEstimate(
        params=params,
        bits_per_weight=round(bits, 4),
        weights_bytes=weights,
        kv_cache_bytes=kv_cache_bytes(used_shape, context_length, batch=batch, kv_bits=kv_bits),
        overhead_bytes=int(overhead_fixed_bytes + overhead_ratio * weights),
        context_length=context_length,
        source=source,
        quantization=quant,
        shape=used_shape,
        shape_assumed=assumed,
    )
