"""Read model file headers (GGUF, safetensors, Hugging Face ``config.json``) without the weights.

GGUF (llama.cpp): magic ``GGUF``, version, tensor and key/value counts, the key/value metadata,
then one info record per tensor (name, dimensions, ggml type, offset); weights follow and are
never read. Sizes come from each tensor's element count and its ggml type's block layout.

safetensors: an 8-byte little-endian header length, a JSON header naming every tensor's dtype,
shape and byte range; weights follow and are never read.

A header that lies (impossible counts, lengths past the end of the file) raises
:class:`~vramancer.errors.InvalidInput` naming the file, never a crash or a huge allocation.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from vramancer.errors import InvalidInput

GGUF_MAGIC = b"GGUF"

#: ggml tensor type id -> (elements per block, bytes per block). Mirrors ggml.h / gguf-py.
GGML_TYPE_SIZES: dict[int, tuple[int, int]] = {
    0: (1, 4),  # F32
    1: (1, 2),  # F16
    2: (32, 18),  # Q4_0
    3: (32, 20),  # Q4_1
    6: (32, 22),  # Q5_0
    7: (32, 24),  # Q5_1
    8: (32, 34),  # Q8_0
    9: (32, 40),  # Q8_1
    10: (256, 84),  # Q2_K
    11: (256, 110),  # Q3_K
    12: (256, 144),  # Q4_K
    13: (256, 176),  # Q5_K
    14: (256, 210),  # Q6_K
    15: (256, 292),  # Q8_K
    16: (256, 66),  # IQ2_XXS
    17: (256, 74),  # IQ2_XS
    18: (256, 98),  # IQ3_XXS
    19: (256, 50),  # IQ1_S
    20: (32, 18),  # IQ4_NL
    21: (256, 110),  # IQ3_S
    22: (256, 82),  # IQ2_S
    23: (256, 136),  # IQ4_XS
    24: (1, 1),  # I8
    25: (1, 2),  # I16
    26: (1, 4),  # I32
    27: (1, 8),  # I64
    28: (1, 8),  # F64
    29: (256, 56),  # IQ1_M
    30: (1, 2),  # BF16
    34: (256, 54),  # TQ1_0
    35: (256, 66),  # TQ2_0
    39: (32, 17),  # MXFP4
    40: (64, 36),  # NVFP4
    41: (128, 18),  # Q1_0
}

#: ``general.file_type`` (llama.cpp's LLAMA_FTYPE) -> quantization name.
GGUF_FILE_TYPES: dict[int, str] = {
    0: "f32",
    1: "f16",
    2: "q4_0",
    3: "q4_1",
    7: "q8_0",
    8: "q5_0",
    9: "q5_1",
    10: "q2_k",
    11: "q3_k_s",
    12: "q3_k_m",
    13: "q3_k_l",
    14: "q4_k_s",
    15: "q4_k_m",
    16: "q5_k_s",
    17: "q5_k_m",
    18: "q6_k",
    30: "iq4_xs",
    32: "bf16",
}

# GGUF metadata value types: id -> struct format (scalars); 8 = string, 9 = array.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                   11: "q", 12: "d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
#: Arrays longer than this are skipped, not kept in the metadata (tokenizer vocabularies).
_KEEP_ARRAY_MAX = 64
_MAX_STRING = 64 * 1024 * 1024
_MAX_COUNT = 10_000_000
_MAX_DIMS = 8

#: safetensors dtype -> bytes per element.
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
    "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}  # fmt: skip
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024

#: Hugging Face ``model_type`` values of encoder-only models (no KV cache when serving).
ENCODER_ONLY_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "deberta", "deberta-v2",
     "electra", "albert", "camembert", "nomic_bert", "modernbert", "clip_text_model"}
)  # fmt: skip
#: GGUF ``general.architecture`` values of encoder-only models.
GGUF_ENCODER_ARCHITECTURES = frozenset(
    {"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2", "t5encoder", "modern-bert"}
)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the KV cache depends on. ``head_dim`` is the per-head key/value width."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    #: The context length the model was trained for, when the file says.
    max_context_length: int | None = None
    architecture: str | None = None
    #: Encoder-only models (BERT and kin) keep no KV cache.
    encoder_only: bool = False


@dataclass(frozen=True, slots=True)
class WeightsInfo:
    """What a header says about the weights."""

    path: str
    format: str  # "gguf" | "safetensors"
    params: int
    weights_bytes: int
    tensor_count: int
    #: Quantization as stored (``q4_k_m``, ``f16``...), when known.
    quantization: str | None
    shape: ModelShape | None
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return self.weights_bytes * 8 / self.params if self.params else 0.0


class _Reader:
    """Bounded reads from a header; every failure names the file."""

    def __init__(self, fh: BinaryIO, path: Path, size: int, endian: str) -> None:
        self.fh, self.path, self.size, self.endian = fh, path, size, endian

    def bad(self, what: str) -> InvalidInput:
        return InvalidInput(f"{self.path}: not a valid GGUF file ({what})", file=str(self.path))

    def take(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise self.bad("the header ends early")
        return data

    def unpack(self, fmt: str) -> Any:
        fmt = self.endian + fmt
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def count(self, what: str) -> int:
        n = int(self.unpack("Q"))
        if n > _MAX_COUNT:
            raise self.bad(f"{what} of {n} is not plausible")
        return n

    def string(self) -> str:
        n = int(self.unpack("Q"))
        if n > _MAX_STRING or self.fh.tell() + n > self.size:
            raise self.bad(f"a string of {n} bytes runs past the end")
        return self.take(n).decode("utf-8", errors="replace")

    def skip(self, n: int) -> None:
        if self.fh.tell() + n > self.size:
            raise self.bad("an array runs past the end of the file")
        self.fh.seek(n, 1)

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item_type = int(self.unpack("I"))
            n = self.count("an array length")
            if n > _KEEP_ARRAY_MAX:
                self.skip_items(item_type, n)
                return None
            return [self.value(item_type) for _ in range(n)]
        raise self.bad(f"unknown metadata type {vtype}")

    def skip_items(self, item_type: int, n: int) -> None:
        if item_type in _SCALAR_FORMATS:
            self.skip(n * struct.calcsize(_SCALAR_FORMATS[item_type]))
        elif item_type == _STRING:
            for _ in range(n):
                self.skip(int(self.unpack("Q")))
        else:
            for _ in range(n):
                self.value(item_type)


def read_gguf(path: str | Path) -> WeightsInfo:
    """Parse a GGUF file's metadata and tensor infos (v2 and v3, either byte order)."""
    path = Path(path)
    size = _file_size(path)
    with open(path, "rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise InvalidInput(f"{path}: not a GGUF file (no GGUF magic)", file=str(path))
        raw_version = fh.read(4)
        endian = "<" if struct.unpack("<I", raw_version.ljust(4, b"\0"))[0] < 0x10000 else ">"
        r = _Reader(fh, path, size, endian)
        version = struct.unpack(endian + "I", raw_version.ljust(4, b"\0"))[0]
        if version not in (2, 3):
            raise r.bad(f"version {version} is not supported; 2 and 3 are")
        n_tensors = r.count("a tensor count")
        n_kv = r.count("a metadata count")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            metadata[key] = r.value(int(r.unpack("I")))
        params = weights = 0
        for _ in range(n_tensors):
            r.string()  # name
            n_dims = int(r.unpack("I"))
            if n_dims > _MAX_DIMS:
                raise r.bad(f"a tensor with {n_dims} dimensions")
            elements = math.prod(int(r.unpack("Q")) for _ in range(n_dims))
            ggml_type = int(r.unpack("I"))
            r.unpack("Q")  # offset
            if ggml_type not in GGML_TYPE_SIZES:
                raise r.bad(f"unknown ggml tensor type {ggml_type}")
            block, block_bytes = GGML_TYPE_SIZES[ggml_type]
            params += elements
            weights += -(-elements // block) * block_bytes
    file_type = metadata.get("general.file_type")
    return WeightsInfo(
        path=str(path),
        format="gguf",
        params=params,
        weights_bytes=weights,
        tensor_count=n_tensors,
        quantization=GGUF_FILE_TYPES.get(file_type) if isinstance(file_type, int) else None,
        shape=_gguf_shape(metadata),
        metadata={k: v for k, v in metadata.items() if v is not None},
    )


def _first_int(value: Any) -> int | None:
    """A metadata number, or the largest of a per-layer list of numbers."""
    if isinstance(value, list):
        numbers = [v for v in value if isinstance(v, int)]
        return max(numbers) if numbers else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _gguf_shape(meta: dict[str, Any]) -> ModelShape | None:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        return None
    layers = _first_int(meta.get(f"{arch}.block_count"))
    heads = _first_int(meta.get(f"{arch}.attention.head_count"))
    if not layers or not heads:
        return None
    kv_heads = _first_int(meta.get(f"{arch}.attention.head_count_kv")) or heads
    embedding = _first_int(meta.get(f"{arch}.embedding_length"))
    head_dim = _first_int(meta.get(f"{arch}.attention.key_length")) or (
        embedding // heads if embedding else 0
    )
    if not head_dim:
        return None
    return ModelShape(
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv_heads,
        head_dim=head_dim,
        max_context_length=_first_int(meta.get(f"{arch}.context_length")),
        architecture=arch,
        encoder_only=arch in GGUF_ENCODER_ARCHITECTURES,
    )


def read_safetensors(path: str | Path) -> WeightsInfo:
    """Parse a ``.safetensors`` file's header, or every shard of a model directory.

    The shape comes from a ``config.json`` beside the weights (Hugging Face layout) when
    there is one.
    """
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise InvalidInput(f"{path}: no .safetensors files in this directory", file=str(path))
    params = weights = tensors = 0
    dtypes: Counter[str] = Counter()
    metadata: dict[str, Any] = {}
    for file in files:
        header = _safetensors_header(file)
        for name, info in header.items():
            if name == "__metadata__":
                if isinstance(info, dict):
                    metadata.update(info)
                continue
            n, nbytes, dtype = _safetensors_tensor(file, name, info)
            params += n
            weights += nbytes
            tensors += 1
            dtypes[dtype] += n
    config = (path if path.is_dir() else path.parent) / "config.json"
    shape = read_hf_config(config) if config.is_file() else None
    dominant = dtypes.most_common(1)[0][0].lower() if dtypes else None
    return WeightsInfo(
        path=str(path),
        format="safetensors",
        params=params,
        weights_bytes=weights,
        tensor_count=tensors,
        quantization=dominant,
        shape=shape,
        metadata=metadata,
    )


def _safetensors_header(file: Path) -> dict[str, Any]:
    size = _file_size(file)
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) != 8:
            raise InvalidInput(f"{file}: not a safetensors file (too short)", file=str(file))
        n = struct.unpack("<Q", raw)[0]
        if n > _SAFETENSORS_MAX_HEADER or 8 + n > size:
            raise InvalidInput(
                f"{file}: not a safetensors file (header length {n} is not plausible)",
                file=str(file),
            )
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidInput(f"{file}: safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise InvalidInput(f"{file}: safetensors header is not a JSON object", file=str(file))
    return header


def _safetensors_tensor(file: Path, name: str, info: Any) -> tuple[int, int, str]:
    try:
        dtype = str(info["dtype"])
        shape = [int(d) for d in info["shape"]]
        start, end = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise InvalidInput(f"{file}: tensor {name!r} has a malformed header entry") from None
    if dtype not in SAFETENSORS_DTYPE_BYTES or any(d < 0 for d in shape) or end < start:
        raise InvalidInput(f"{file}: tensor {name!r} has dtype {dtype!r} or bad offsets")
    return math.prod(shape), end - start, dtype


def read_hf_config(path: str | Path) -> ModelShape | None:
    """The attention shape from a Hugging Face ``config.json``; None if it lacks one."""
    try:
        cfg = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(cfg, dict):
        return None
    text_cfg = cfg.get("text_config")
    if isinstance(text_cfg, dict) and "num_hidden_layers" in text_cfg:
        cfg = {**cfg, **text_cfg}  # multimodal models nest the language model's shape
    layers, heads = cfg.get("num_hidden_layers"), cfg.get("num_attention_heads")
    hidden = cfg.get("hidden_size")
    if not isinstance(layers, int) or not isinstance(heads, int) or heads <= 0:
        return None
    head_dim = cfg.get("head_dim")
    if not isinstance(head_dim, int):
        head_dim = hidden // heads if isinstance(hidden, int) else 0
    if head_dim <= 0:
        return None
    kv = cfg.get("num_key_value_heads")
    model_type = cfg.get("model_type")
    max_ctx = cfg.get("max_position_embeddings")
    return ModelShape(
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv if isinstance(kv, int) and kv > 0 else heads,
        head_dim=head_dim,
        max_context_length=max_ctx if isinstance(max_ctx, int) else None,
        architecture=model_type if isinstance(model_type, str) else None,
        encoder_only=model_type in ENCODER_ONLY_MODEL_TYPES,
    )


def read_weights_info(path: str | Path) -> WeightsInfo:
    """GGUF or safetensors (a file, or a directory of shards), chosen by content."""
    path = Path(path)
    if path.is_dir():
        return read_safetensors(path)
    _file_size(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == GGUF_MAGIC:
        return read_gguf(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    raise InvalidInput(
        f"{path}: neither a GGUF file nor a .safetensors file (or a directory of them)",
        file=str(path),
    )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file", file=str(path)) from None
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot be read ({exc.strerror})", file=str(path)) from None
