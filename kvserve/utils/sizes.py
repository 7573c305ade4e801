"""Byte sizes written by people: one parser for every flag and tier spec that takes a size.

`--kv-cache-memory`, `--kv-tiers "cpu:4GiB,disk:PATH:20GB"` and the benchmarks all read
sizes here, so one spelling means one number everywhere.

- IEC units are powers of two: KiB, MiB, GiB, TiB.
- SI units are powers of ten: KB, MB, GB, TB.
- A bare letter (K, M, G, T) is binary, as in `free -h`, `ls -h` and Docker's `--memory`.
- Case does not matter; a space between the number and the unit is allowed; B is bytes.
"""
from __future__ import annotations

import re

_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 1 << 10, "kib": 1 << 10, "kb": 10**3,
    "m": 1 << 20, "mib": 1 << 20, "mb": 10**6,
    "g": 1 << 30, "gib": 1 << 30, "gb": 10**9,
    "t": 1 << 40, "tib": 1 << 40, "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """'4GiB' -> 4 * 2**30, '1.5GB' -> 1_500_000_000, '2g' -> 2 * 2**30, '1048576' -> 1048576.

    Raises ValueError (naming the text and the accepted units) for anything else, and for
    sizes that are not positive.
    """
    match = _SIZE_RE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"invalid size {text!r}: use bytes or a number with a unit "
                         "(KiB, MiB, GiB, TiB; KB, MB, GB, TB; K, M, G, T are binary)")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"size must be > 0, got {text!r}")
    return size
