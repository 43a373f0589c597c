"""Byte units and size parsing shared by the engine, the CLI and the server."""

from __future__ import annotations

import re

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

_SUFFIX = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse "64K", "1G", "512", "4MiB" into bytes; raise ValueError with a readable message."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"invalid size {text!r} (expected a number with an optional K, M, G or T)")
    return int(m.group(1)) * _SUFFIX[m.group(2).upper()]


def format_size(n: int) -> str:
    """Render bytes with the largest exact binary unit: 65536 -> "64K"."""
    for suffix, unit in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def align_down(n: int, a: int) -> int:
    return n - n % a


def align_up(n: int, a: int) -> int:
    return -(-n // a) * a


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0
