"""The byte-plane shuffle: byte ``j`` of every element together, plane after plane (as blosc
does), so the codec sees the regular exponent bytes of fp16/bf16/fp32 weights apart from their
noisy mantissas; and the element size a hint names (``dtype=bf16``)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

#: What the byte-plane helpers accept: any contiguous buffer numpy can view as bytes.
_Bytes = bytes | bytearray | memoryview | np.ndarray[Any, Any]

#: Largest element size the byte-plane shuffle splits (wider elements are stored unshuffled;
#: the common ones are 2, 4 and 8, and 3 for RGB pixels or 16 for complex128 also work).
MAX_SHUFFLE_ITEMSIZE = 64
#: Rows per step of the blocked transpose in :func:`shuffle` (fits the L2 cache).
_SHUFFLE_ROWS = 32_768
#: Element size of the dtype names a hint may carry (``dtype=bf16``).
DTYPE_ITEMSIZES: dict[str, int] = {
    "bf16": 2,
    "bfloat16": 2,
    "fp16": 2,
    "f16": 2,
    "float16": 2,
    "half": 2,
    "int16": 2,
    "i16": 2,
    "uint16": 2,
    "fp32": 4,
    "f32": 4,
    "float32": 4,
    "float": 4,
    "int32": 4,
    "i32": 4,
    "uint32": 4,
    "fp64": 8,
    "f64": 8,
    "float64": 8,
    "double": 8,
    "int64": 8,
    "i64": 8,
    "uint64": 8,
    "fp8": 1,
    "int8": 1,
    "i8": 1,
    "uint8": 1,
    "u8": 1,
}
_DTYPE_RE = re.compile(r"(?:^|[\s;,&])dtype\s*[=:]\s*([A-Za-z0-9_.]+)")


def shuffle(data: _Bytes, itemsize: int) -> np.ndarray[Any, Any]:
    """Byte-plane shuffle: byte ``j`` of every element together, plane after plane.

    A tail shorter than one element stays at the end as it is. Returns a new uint8 array
    (a buffer the codecs accept without another copy).
    """
    src = np.frombuffer(data, dtype=np.uint8)
    if itemsize == 1:
        return src.copy()
    whole = len(src) - len(src) % itemsize
    rows = whole // itemsize
    out = np.empty(len(src), dtype=np.uint8)
    elements = src[:whole].reshape(rows, itemsize)
    planes = out[:whole].reshape(itemsize, rows)
    for start in range(0, rows, _SHUFFLE_ROWS):  # blocked: twice as fast as one big .T copy
        planes[:, start : start + _SHUFFLE_ROWS] = elements[start : start + _SHUFFLE_ROWS].T
    out[whole:] = src[whole:]
    return out


def unshuffle_into(planes_data: _Bytes, itemsize: int, out: np.ndarray[Any, Any]) -> None:
    """Inverse of :func:`shuffle`, written into ``out`` (a uint8 array of the same length)."""
    src = np.frombuffer(planes_data, dtype=np.uint8)
    if itemsize == 1:
        out[:] = src
        return
    whole = len(src) - len(src) % itemsize
    rows = whole // itemsize
    planes = src[:whole].reshape(itemsize, rows)
    elements = out[:whole].reshape(rows, itemsize)
    for plane in range(itemsize):
        elements[:, plane] = planes[plane]
    out[whole:] = src[whole:]


def unshuffle(planes_data: _Bytes, itemsize: int) -> bytes:
    """Inverse of :func:`shuffle`, as bytes."""
    out = np.empty(len(planes_data), dtype=np.uint8)
    unshuffle_into(planes_data, itemsize, out)
    return out.tobytes()


def itemsize_from_hint(hint: str | None) -> int:
    """The element size a hint names (``dtype=bf16`` → 2, ``dtype=fp32`` → 4), else 1."""
    if not hint:
        return 1
    match = _DTYPE_RE.search(hint)
    if match is None:
        return 1
    name = match.group(1).lower().removeprefix("torch.").removeprefix("np.")
    return DTYPE_ITEMSIZES.get(name, 1)


def plane_lengths(raw_length: int, itemsize: int) -> list[int]:
    """Lengths of the byte planes of ``raw_length`` shuffled bytes; the last plane carries the
    tail shorter than one element."""
    if itemsize == 1:
        return [raw_length]
    rows = raw_length // itemsize
    return [rows] * (itemsize - 1) + [raw_length - rows * (itemsize - 1)]
