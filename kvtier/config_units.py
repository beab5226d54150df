"""Sizes and durations as a TOML config writes them: ``"8GiB"``, ``"50ms"``, or numbers.

Both parsers raise :class:`~kvtier.errors.ConfigError` naming the key, the
value and what was expected, and refuse negative, infinite, NaN and absurdly
large values.
"""

from __future__ import annotations

import math
import re
from decimal import MAX_EMAX, MIN_EMIN, Context, Decimal, Inexact, localcontext
from typing import Final

from kvtier.errors import ConfigError

__all__ = ["parse_duration", "parse_size"]

# re.ASCII: with only re.IGNORECASE, "i" would match the dotless i (U+0131)
# and "k" the Kelvin sign (U+212A), and \s would match every Unicode space.
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*$", re.ASCII | re.IGNORECASE)
_SIZE_UNITS: Final = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_MAX_SIZE: Final = 1 << 60
"""1 EiB: more than any tier holds (and small enough for every index type)."""
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(us|ms|s)\s*$", re.ASCII)
_DURATION_UNITS: Final = {"us": Decimal("1e-6"), "ms": Decimal("1e-3"), "s": Decimal(1)}
_MAX_DURATION: Final = 86_400.0 * 365
"""A year: a longer timeout is a typo."""
_SHOWN_CHARS: Final = 60
"""How much of a bad value an error message quotes."""


def _shown(value: object) -> str:
    """``repr(value)``, cut short: a message quotes a 5,000-digit number only in part."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else f"{text[: _SHOWN_CHARS - 3]}..."


def _times(number: str, unit: Decimal | int) -> Decimal:
    """``number * unit``, exactly.

    The default context keeps 28 digits, so ``1.0000000000000000000000000001``
    GiB would round to a whole number of bytes, and its exponent range ends
    at a million digits. Here the precision fits every digit of the product
    (a unit has at most 13), and rounding it anyway would raise.
    """
    exact = Context(prec=len(number) + 20, Emax=MAX_EMAX, Emin=MIN_EMIN, traps=[Inexact])
    with localcontext(exact):
        return Decimal(number) * unit


def parse_size(value: object, *, key: str = "size") -> int:
    """Bytes from ``"8GiB"``, ``"1.5 GiB"``, ``"512 MB"``, ``"4096"`` or an integer.

    The result must be a whole number of bytes, at most 1 EiB.

    Raises:
        ConfigError: Not a size (the message names ``key``).
    """
    size: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value if value >= 0 else None
    else:
        match = _SIZE.match(value) if isinstance(value, str) else None
        if match is not None:
            number, unit = match.groups()
            exact = _times(number, _SIZE_UNITS[(unit or "B").lower()])
            if exact > _MAX_SIZE:
                raise ConfigError(f"{key}: {_shown(value)} is more than 1 EiB")
            # After the check above: the integral part has at most 19 digits,
            # so to_integral_value() is exact in any context.
            if exact != exact.to_integral_value():
                raise ConfigError(f"{key}: {_shown(value)} is not a whole number of bytes")
            size = int(exact)
    if size is None:
        raise ConfigError(
            f"{key}: {_shown(value)} is not a size; expected bytes or a number with a unit, "
            'like "8GiB", "512MiB" or "100GB"'
        )
    if size > _MAX_SIZE:
        raise ConfigError(f"{key}: {_shown(value)} is more than 1 EiB")
    return size


def parse_duration(value: object, *, key: str = "duration") -> float:
    """Seconds from ``"50ms"``, ``"2s"``, ``"500us"`` or a number of seconds.

    Raises:
        ConfigError: Not a duration of at most a year (the message names ``key``).
    """
    seconds: float | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        # Compared as an int: float() of one past 1.8e308 (TOML's integers
        # have no limit) raises OverflowError.
        if value >= 0:
            seconds = float(value) if value <= _MAX_DURATION else math.inf
    elif isinstance(value, float):
        seconds = value if math.isfinite(value) and value >= 0 else None
    else:
        match = _DURATION.match(value) if isinstance(value, str) else None
        if match is not None:
            number, unit = match.groups()
            seconds = float(_times(number, _DURATION_UNITS[unit]))
    if seconds is None:
        raise ConfigError(
            f"{key}: {_shown(value)} is not a duration; expected seconds or a number with a "
            'unit, like "50ms", "2s" or "500us"'
        )
    if seconds > _MAX_DURATION:
        raise ConfigError(f"{key}: {_shown(value)} is more than a year")
    return seconds
