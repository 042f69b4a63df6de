"""Sizes and durations: parsing user input and formatting for people.

Config accepts an integer number of bytes or a string with a unit (``"512MiB"``, ``"24GiB"``,
``"1.5GB"``); see CONTRACTS.md. Everything inside VRAMancer counts bytes as ``int``.

Why :func:`parse_size` and not pydantic's ``ByteSize``, which also reads decimal (``"1.5GB"``)
and binary (``"512MiB"``) units: ours refuses what ``ByteSize`` lets through or explains
poorly. It refuses sizes over 8 EiB (``ByteSize`` takes ``"10EiB"``, which overflows SQLite's
and numpy's signed 64-bit integers), ``True`` (``ByteSize`` reads it as 1 byte), negative and
infinite numbers, and strings longer than ``MAX_SIZE_CHARS`` before any parsing; and every
refusal names the accepted form (``SIZE_FORM``) or the 8 EiB limit, where ``ByteSize`` says
"could not parse value and unit". Nothing in VRAMancer uses ``ByteSize``.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
SIZE_FORM = "an integer number of bytes or a string such as '512MiB', '24GiB' or '1.5GB'"

#: Largest size accepted anywhere (fits SQLite's and numpy's signed 64-bit integers).
MAX_SIZE = 2**63 - 1

MIB = 1024**2
GIB = 1024**3


#: The longest size string accepted (``"18446744073709551615"`` with a unit fits many times).
MAX_SIZE_CHARS = 64


def parse_size(value: Any) -> int:
    """Return ``value`` as a whole number of bytes, or raise ``ValueError`` naming the form."""
    if isinstance(value, bool):
        raise ValueError(f"expected {SIZE_FORM}, got {_short(value)}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative (got {value})")
        return _bounded(value, value)
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected {SIZE_FORM}, got {_short(value)}")
        return _bounded(int(value), value)
    if isinstance(value, str):
        if len(value) > MAX_SIZE_CHARS:  # no size is written this long: refuse before parsing
            raise ValueError(f"expected {SIZE_FORM}, got a string of {len(value)} characters")
        match = _SIZE_RE.match(value)
        if match:
            number, unit = match.groups()
            factor = _UNITS.get(unit.lower())
            if factor is not None:
                if "." not in number:  # exact for whole numbers, however large
                    return _bounded(int(number) * factor, value)
                scaled = float(number) * factor
                if not math.isfinite(scaled):
                    raise ValueError(f"size {_short(value)} is too large (at most 8 EiB)")
                return _bounded(int(scaled), value)
    raise ValueError(f"expected {SIZE_FORM}, got {_short(value)}")


def _bounded(n_bytes: int, given: Any) -> int:
    if n_bytes > MAX_SIZE:
        raise ValueError(f"size {_short(given)} is too large (at most 8 EiB)")
    return n_bytes


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def format_size(n_bytes: float) -> str:
    """Format a byte count for people, in binary units (``1.5 GiB``)."""
    value = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover - loop always returns


#: A size field in settings and request bodies: accepts ``"512MiB"`` or bytes, holds ``int``.
Size = Annotated[int, BeforeValidator(parse_size), PlainSerializer(int, return_type=int)]


_PARAMS_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMbBtT]?)\s*$")


def parse_param_count(value: str) -> int:
    """Parse a parameter count such as ``7B``, ``1.5B``, ``350M`` or ``22000000``."""
    match = _PARAMS_RE.match(value)
    if not match:
        raise ValueError(
            f"expected a parameter count such as '7B', '350M' or '22000000', got {_short(value)}"
        )
    number, suffix = match.groups()
    factor = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}[suffix.lower()]
    return int(float(number) * factor)


def count_of(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and ``noun``, singular for one: ``1 block``, ``2 blocks``, ``0 blocks``."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
