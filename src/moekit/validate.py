"""Checks for user-supplied numbers: one place that says what a valid count, ratio or factor is.

Every check returns the value (as an ``int``/``float``) or raises a one-line ``MoekitError`` naming the
option. NaN and ±inf are never valid; neither are booleans where a number is expected. Torch-free, so
every layer (CLI, routing, steering) can use it.
"""

from __future__ import annotations

import math
import numbers

from moekit.errors import MoekitError


def finite_float(name: str, value: object, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float within [lo, hi] (``lo_open``/``hi_open``: exclude that bound)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MoekitError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise MoekitError(f"{name} must be a finite number, got {v}")
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and (v > hi or (hi_open and v == hi))):
        raise MoekitError(f"{name} must be in {_interval(lo, hi, lo_open, hi_open)}, got {_num(v)}")
    return v


def integer(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int within [lo, hi] (a float with an integral value is accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MoekitError(f"{name} must be an integer, got {value!r}")
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(value) or value != int(value):
            raise MoekitError(f"{name} must be an integer, got {value}")
        value = int(value)
    v = int(value)
    if lo is not None and v < lo:
        raise MoekitError(f"{name} must be >= {lo}, got {v}" if hi is None
                          else f"{name} must be in {_interval(lo, hi)}, got {v}")
    if hi is not None and v > hi:
        raise MoekitError(f"{name} must be <= {hi}, got {v}" if lo is None
                          else f"{name} must be in {_interval(lo, hi)}, got {v}")
    return v


def parse_float(name: str, text: str) -> float:
    """A decimal number from text (``"2.5"``); NaN, ±inf and non-numbers → MoekitError."""
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise MoekitError(f"{name}: {text!r} is not a number") from None
    return finite_float(name, v)


SEED_MAX = 2**63 - 1


def _num(v: float) -> str:
    return str(int(v)) if v == int(v) and abs(v) < 1e15 else repr(v)


def _interval(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    left = "-inf" if lo is None else _num(lo)
    right = "inf" if hi is None else _num(hi)
    return f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
