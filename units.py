"""Quantities as people write them: memory sizes (80GB, 256MiB) and bandwidths (3.35TB/s, 100Gb/s)."""

from __future__ import annotations

import re

from stagemesh.errors import InvalidArgument

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
}
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int | float, what: str = "size") -> int:
    """'80GB' -> 80e9, '256MiB' -> 268435456, '1e9' -> 1e9 (decimal units are powers of 10)."""
    if isinstance(text, (int, float)):
        return int(text)
    m = _NUMBER.match(text)
    unit = m.group(2).lower() if m else None
    if unit not in _UNITS:
        raise InvalidArgument(f"{what} {text!r} does not parse: write e.g. 80GB, 256MiB or 1e9")
    return int(float(m.group(1)) * _UNITS[unit])


def parse_bandwidth(text: str | int | float, what: str = "bandwidth") -> float:
    """Bytes per second from '3.35TB/s', '450GB/s' or '100Gb/s' (lower-case b = bits)."""
    if isinstance(text, (int, float)):
        return float(text)
    body = text.strip()
    if not body.lower().endswith("/s"):
        raise InvalidArgument(f"{what} {text!r} does not parse: write e.g. 3.35TB/s or 100Gb/s")
    body = body[:-2]
    bits = body.endswith("b") and not body.endswith("B")
    value = parse_bytes(body[:-1] + "B" if bits else body, what)
    return value / 8 if bits else float(value)


def format_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
