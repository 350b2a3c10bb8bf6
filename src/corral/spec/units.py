"""Human sizes ("512M", "1.5G") to bytes and back; binary units, as in cgroups."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE | re.ASCII)


def parse_size(value: str | int) -> int:
    """Return the number of bytes in `value` (an int, or "64K", "512M", "2G", "1.5GiB").

    Raises ValueError with the accepted forms when `value` is not a size.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError("a size must be a number of bytes or a string like '512M'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE.match(value)
    if match is None:
        raise ValueError(f"'{value}' is not a size: use bytes or a number with K, M, G or T")
    number, unit = match.groups()
    try:
        return int(float(number) * _UNITS[unit.lower()])
    except OverflowError:
        raise ValueError(f"'{value}' is too large a size") from None


def format_size(n: int) -> str:
    """The shortest exact binary-unit spelling of `n` bytes ("512M"), else bytes."""
    for suffix, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor and n % factor == 0:
            return f"{n // factor}{suffix}"
    return str(n)
